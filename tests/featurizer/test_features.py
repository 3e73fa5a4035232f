from datetime import datetime, timedelta, timezone

import numpy as np
import polars as pl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from featurizer.features import (
    BEHAVIOURAL_FEATURES,
    ITEM_FEATURES,
    OnlineSnapshot,
    point_in_time_features,
    smoothed_rate,
    user_histories,
)
from featurizer.schema import EVENT_TYPES, validate_events

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
USERS, ITEMS = ["u0", "u1", "u2"], ["i0", "i1", "i2", "i3"]


def make_events(rows):
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


def queries(pairs, minute):
    return pl.DataFrame(
        {"user_id": [u for u, _ in pairs], "item_id": [i for _, i in pairs], "ts": [T0 + timedelta(minutes=minute)] * len(pairs)}
    ).with_columns(pl.col("ts").cast(pl.Datetime("us", "UTC")))


event_rows = st.lists(
    st.tuples(st.integers(0, 20 * 24 * 60), st.sampled_from(USERS), st.sampled_from(ITEMS), st.sampled_from(EVENT_TYPES)),
    max_size=40,
)
ALL_PAIRS = [(u, i) for u in USERS for i in ITEMS]


def pit(events, q):
    return point_in_time_features(events.lazy(), q.lazy()).collect()


def test_counts_only_strictly_earlier_events():
    ev = make_events([(0, "u0", "i0", "impression"), (0, "u0", "i0", "click"), (10, "u1", "i0", "impression"), (10, "u1", "i0", "click")])
    out = pit(ev, queries([("u1", "i0")], 10))
    assert out["item_impressions_all"][0] == 1 and out["item_clicks_all"][0] == 1
    assert out["user_item_impressions_all"][0] == 0  # u1's own impression is at t, not before
    assert out["item_ctr_all"][0] == np.float32(smoothed_rate(1, 1))


def test_seven_day_window():
    ev = make_events([(0, "u0", "i0", "click"), (8 * 24 * 60, "u1", "i0", "click")])
    out = pit(ev, queries([("u2", "i0")], 9 * 24 * 60))
    assert out["item_clicks_all"][0] == 2 and out["item_clicks_7d"][0] == 1


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(past=event_rows, future=event_rows, t=st.integers(1, 20 * 24 * 60))
def test_no_future_leakage(past, future, t):
    """Changing or adding events at or after t never changes the features at t."""
    before = [r for r in past if r[0] < t]
    base = make_events(past)
    # Replace everything at or after t by unrelated future events shifted to >= t.
    changed = make_events(before + [(t + m, u, i, e) for m, u, i, e in future])
    q = queries(ALL_PAIRS, t)
    a, b = pit(base, q), pit(changed, q)
    assert a.select(BEHAVIOURAL_FEATURES).equals(b.select(BEHAVIOURAL_FEATURES))
    ha = user_histories(base.lazy(), q.lazy(), 3).collect()["history"]
    hb = user_histories(changed.lazy(), q.lazy(), 3).collect()["history"]
    assert ha.to_list() == hb.to_list()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=event_rows, t=st.integers(1, 20 * 24 * 60))
def test_rows_preserved_and_online_equals_offline(rows, t):
    ev = make_events(rows)
    q = queries(ALL_PAIRS, t)
    off = pit(ev, q)
    assert off.height == q.height and off.select("user_id", "item_id").equals(q.select("user_id", "item_id"))
    snap = OnlineSnapshot.build(ev, ITEMS, T0 + timedelta(minutes=t), history_items=3)
    for u in USERS:
        online = snap.gather(u, ITEMS)
        offline = off.filter(pl.col("user_id") == u).select(BEHAVIOURAL_FEATURES).to_numpy()
        np.testing.assert_array_equal(online, offline)
    hist = user_histories(ev.lazy(), q.lazy(), 3).collect()
    for u, h in zip(hist["user_id"], hist["history"]):
        assert snap.histories.get(u, []) == h.to_list()


def test_history_most_recent_first_distinct_stronger_event_first():
    ev = make_events(
        [(0, "u0", "i0", "click"), (1, "u0", "i1", "click"), (2, "u0", "i0", "click"), (3, "u0", "i2", "click"), (3, "u0", "i3", "purchase"), (3, "u0", "i3", "impression")]
    )
    h = user_histories(ev.lazy(), queries([("u0", "i0")], 4).lazy(), 3).collect()["history"][0].to_list()
    assert h == ["i3", "i2", "i0"]


def test_unknown_item_gets_cold_row():
    ev = make_events([(0, "u0", "i0", "impression")])
    snap = OnlineSnapshot.build(ev, ["i0"], T0 + timedelta(minutes=5), history_items=3)
    row = snap.gather("u0", ["never-seen"])[0, : len(ITEM_FEATURES)]
    assert row.tolist() == [0, 0, 0, 0, np.float32(smoothed_rate(0, 0))]
