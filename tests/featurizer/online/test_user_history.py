"""The user's recent items (the items of the user text): `offline.user_recent_items` for training and
`OnlineFeatures.history` for serving must pick the same items in the same order.

Ported from the walking skeleton's tests of `featurizer.features.user_histories` (deleted), which
ordered ties at one instant by event strength; the one definition now orders them by item id."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import polars as pl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from featurizer.contracts.schema import EVENT_TYPES, validate_events, validate_items
from featurizer.offline.pipeline import user_recent_items
from featurizer.online.features import OnlineFeatures
from featurizer.store.in_process import InProcessStore

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
USERS = ["u0", "u1", "u2"]
ITEMS = validate_items(pl.DataFrame({"item_id": ["i0", "i1", "i2", "i3"], "title": ["a", "b", "c", "d"]}))
CANDIDATES = ["i0", "i1", "i2", "i3", "i4"]  # i4: events but not in the catalog


def make_events(rows) -> pl.DataFrame:
    """rows: (minute, user, item, event)"""
    return validate_events(
        pl.DataFrame(
            {
                "ts": [T0 + timedelta(minutes=m) for m, *_ in rows],
                "user_id": [r[1] for r in rows],
                "item_id": [r[2] for r in rows],
                "event": [r[3] for r in rows],
            },
            schema={"ts": pl.Datetime("us", "UTC"), "user_id": pl.Utf8, "item_id": pl.Utf8, "event": pl.Utf8},
        )
    )


def queries(users, minutes) -> pl.DataFrame:
    return pl.DataFrame({"user_id": users, "ts": [T0 + timedelta(minutes=m) for m in minutes], "row": range(len(users))}
                        ).with_columns(pl.col("ts").cast(pl.Datetime("us", "UTC")))


def offline(ev: pl.DataFrame, q: pl.DataFrame, n: int) -> list[list[str]]:
    out = user_recent_items(ev.lazy(), ITEMS.lazy(), q.lazy(), n).collect()
    assert out.drop("history").equals(q)  # rows, order and columns preserved
    return out["history"].to_list()


def test_most_recent_first_distinct_ties_at_one_instant_by_item_id():
    ev = make_events([(0, "u0", "i0", "click"), (1, "u0", "i1", "click"), (2, "u0", "i0", "click"),
                      (3, "u0", "i3", "purchase"), (3, "u0", "i2", "click"), (3, "u0", "i1", "impression")])
    # At minute 3 both i2 (click) and i3 (purchase) are engaged: by item id, not by event strength.
    assert offline(ev, queries(["u0", "u0", "u0", "u1"], [3, 4, 4, 4]), 3) == [["i0", "i1"], ["i2", "i3", "i0"],
                                                                               ["i2", "i3", "i0"], []]


def test_repeats_of_one_item_never_shorten_the_history():
    """The skeleton looked back only 4 * n engagements, so many repeats of one item hid older items."""
    ev = make_events([(0, "u0", "i0", "click"), (1, "u0", "i1", "click")] + [(2 + k, "u0", "i1", "click") for k in range(8)])
    assert offline(ev, queries(["u0"], [60]), 2) == [["i1", "i0"]]


minutes = st.integers(0, 3 * 24 * 60)
event_rows = st.lists(
    st.tuples(st.one_of(minutes, st.sampled_from([0, 1, 2])), st.sampled_from(USERS), st.sampled_from(CANDIDATES),
              st.sampled_from(EVENT_TYPES)),
    max_size=40,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(past=event_rows, future=event_rows, t=st.integers(1, 3 * 24 * 60))
def test_no_future_leakage(past, future, t):
    """Changing or adding events at or after t never changes the history at t."""
    before = [r for r in past if r[0] < t]
    q = queries(USERS, [t] * len(USERS))
    changed = make_events(before + [(t + m, u, i, e) for m, u, i, e in future])
    assert offline(make_events(past), q, 3) == offline(changed, q, 3)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=event_rows, after=st.sampled_from([0, 1, 60]))
def test_online_history_equals_offline(rows, after):
    """What serving puts into the user text (OnlineFeatures.history) is what training used."""
    ev = make_events(rows)
    t = (max(r[0] for r in rows) if rows else 0) + after
    online = OnlineFeatures(InProcessStore(), ITEMS)
    online.apply(ev)
    users = [*USERS, "new-user"]
    at = T0 + timedelta(minutes=t)
    for n in (1, 3):
        assert [online.history(u, at, n) for u in users] == offline(ev, queries(users, [t] * len(users)), n)
