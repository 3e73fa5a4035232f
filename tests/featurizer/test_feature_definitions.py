"""Feature definitions: hand-computed values per family, no future leakage, rows preserved, and
online (incremental, both store backends) == offline."""

from __future__ import annotations

import math
import re
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from featurizer.contracts.schema import EVENT_TYPES, validate_events, validate_items
from featurizer.definitions import (
    FAMILIES,
    FEATURES,
    NAMES,
    FeatureParams,
    family_columns,
    smoothed_rate,
)
from featurizer.offline.pipeline import offline_features, prepare_events
from featurizer.offline.point_in_time import recent_items
from featurizer.online.features import OnlineFeatures, StaleQueryError
from featurizer.online.user_state import UserState
from featurizer.store.config import InProcessConfig, RedisConfig
from featurizer.store.in_process import InProcessStore
from featurizer.store.redis import RedisStore

REDIS_URL = "redis://127.0.0.1:6379/0"
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)  # a Thursday
USERS = ["u0", "u1", "u2"]
ITEMS = validate_items(
    pl.DataFrame(
        {
            "item_id": ["i0", "i1", "i2", "i3"],
            "title": ["a", "b", "c", "d"],
            "category": ["shoes", "shoes", "bags", None],
            "brand": ["acme", "zeta", "acme", "zeta"],
            "price": [10.0, 40.0, 20.0, None],
        }
    )
)
CANDIDATES = ["i0", "i1", "i2", "i3", "i4"]  # i4: events but not in the catalog
M = 1  # one minute, the unit of event offsets below
H, D = 60 * M, 24 * 60 * M
# Floats whose online value is a sum in another order or goes through exp: equal to rounding only.
ROUNDED = {"user_price_typical_all", "item_price_rel_user_all", "cooc_cosine_sum_recent"}


def make_events(rows) -> pl.DataFrame:
    """rows: (minute offset from T0, user, item, event)"""
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


def at(minute: float) -> datetime:
    return T0 + timedelta(minutes=minute)


def queries(pairs, t: datetime) -> pl.DataFrame:
    return pl.DataFrame({"user_id": [u for u, _ in pairs], "item_id": [i for _, i in pairs], "ts": [t] * len(pairs)}).with_columns(
        pl.col("ts").cast(pl.Datetime("us", "UTC"))
    )


def offline(ev: pl.DataFrame, pairs, t: datetime, params=FeatureParams()) -> pl.DataFrame:
    return offline_features(ev.lazy(), ITEMS.lazy(), queries(pairs, t).lazy(), params).collect()


def assert_same(online: np.ndarray, off: np.ndarray) -> None:
    exact = [k for k, n in enumerate(NAMES) if n not in ROUNDED]
    rounded = [k for k, n in enumerate(NAMES) if n in ROUNDED]
    np.testing.assert_array_equal(online[:, exact], off[:, exact], err_msg=str([NAMES[k] for k in exact]))
    np.testing.assert_allclose(online[:, rounded], off[:, rounded], rtol=1e-12, atol=1e-15)


def features(ev: pl.DataFrame, user: str, items: list[str], t: datetime) -> dict[str, np.ndarray]:
    """Offline features of (user, item) at t, after checking that online (in-process) agrees."""
    off = offline(ev, [(user, i) for i in items], t)
    online = OnlineFeatures(InProcessStore(), ITEMS)
    online.apply(ev.filter(pl.col("ts") <= t))
    assert_same(online.features(user, items, t), off.select(NAMES).to_numpy())
    return {n: off[n].to_numpy() for n in NAMES}


# ---------------------------------------------------------------- registry


def test_registry_names_families_and_docs():
    assert NAMES[0] == "interest_score" and len(NAMES) == len(set(NAMES))
    assert {f.family for f in FEATURES} == set(FAMILIES)
    cols = family_columns()
    assert sorted(k for ks in cols.values() for k in ks) == list(range(len(NAMES)))
    for name in NAMES:  # names carry their window (or, for ages, their unit)
        assert re.search(r"_(1h|1d|7d|30d|all|7d_30d|recent|utc)$", name) or "_hours_" in name or name in {"interest_score", "item_price"}, name
    doc = (Path(__file__).parents[2] / "docs" / "features.md").read_text()
    assert [n for n in NAMES if f"`{n}`" not in doc] == []


# ---------------------------------------------------------------- hand-computed values per family

T = 30 * D + 10 * H + 32 * M  # 2026-01-31 10:32, a Saturday


def test_windows_are_tiled_and_strictly_before_t():
    # 1h: [09:30, t) (5-minute tiles); 1d: [01-30 10:00, t) (hours); 7d: [01-24 00:00, t); 30d: [01-01 00:00, t)
    offsets = [T - 1, T - 62, T - 63, T - 24 * H - 32, T - 24 * H - 33, 23 * D, 23 * D - 1, 0, -1, T, T + 5]
    ev = make_events([(m, "u1", "i0", "click") for m in offsets] + [(T - 2, "u1", "i0", "impression")])
    f = features(ev, "u0", ["i0"], at(T))
    assert [f[f"item_clicks_{w}"][0] for w in ("1h", "1d", "7d", "30d", "all")] == [2, 4, 6, 8, 9]
    assert f["item_impressions_1h"][0] == 1 and f["item_purchases_all"][0] == 0
    assert f["item_hours_since_first_seen"][0] == pytest.approx((T + 1) / H, rel=1e-15)
    assert f["user_clicks_7d"][0] == 0 and math.isnan(f["user_hours_since_last_engagement"][0])  # u0 did nothing


def test_smoothed_rates_trend_and_unseen_items():
    ev = make_events(
        [(T - 10 * M - k, "u1", "i0", "impression") for k in range(10)]
        + [(T - 5, "u1", "i0", "click"), (T - 4, "u2", "i0", "click"), (T - 3, "u2", "i0", "purchase")]
    )
    f = features(ev, "u0", ["i0", "i3"], at(T))
    assert f["item_ctr_7d"][0] == f["item_ctr_all"][0] == (2 + 0.05 * 20) / (10 + 20)
    assert f["item_cvr_30d"][0] == (1 + 0.1 * 10) / (2 + 10)
    assert f["item_click_trend_7d_30d"][0] == pytest.approx((2 / 7 + 0.5) / (2 / 30 + 0.5), rel=1e-15)
    assert f["item_ctr_trend_7d_30d"][0] == 1.0 and f["item_users_engaged_all"][0] == 2
    assert f["item_ctr_all"][1] == 0.05 and f["item_cvr_all"][1] == 0.1 and f["item_click_trend_7d_30d"][1] == 1.0
    assert math.isnan(f["item_hours_since_first_seen"][1])
    assert f["item_ctr_all"][0] == smoothed_rate(2, 10) and f["item_cvr_all"][1] == smoothed_rate(0, 0, 0.1, 10)


def test_user_activity_affinity_price_and_recency():
    ev = make_events(
        [
            (T - 3 * D, "u0", "i0", "click"),  # shoes, acme, 10
            (T - 2 * D, "u0", "i1", "click"),  # shoes, zeta, 40
            (T - 10 * D, "u0", "i2", "purchase"),  # bags, acme, 20
            (T - 90, "u0", "i4", "add_to_cart"),  # not in the catalog: counts, has no category/brand/price
            (T - 60, "u0", "i3", "impression"),  # impressions are not engagements
            (T, "u0", "i1", "purchase"),  # at t: not yet known
        ]
    )
    f = features(ev, "u0", ["i0", "i1", "i2", "i3", "i4"], at(T))
    assert f["user_engagements_all"][0] == 4 and f["user_clicks_7d"][0] == 2 and f["user_purchases_7d"][0] == 0
    assert f["user_purchases_30d"][0] == 1
    assert f["user_hours_since_last_engagement"][0] == pytest.approx(1.5, rel=1e-15)
    np.testing.assert_array_equal(f["user_category_share_all"], [2 / 4, 2 / 4, 1 / 4, np.nan, np.nan])
    np.testing.assert_array_equal(f["user_brand_share_all"], [2 / 4, 1 / 4, 2 / 4, 1 / 4, np.nan])
    np.testing.assert_allclose(f["user_price_typical_all"], 20.0, rtol=1e-12)  # (10 * 40 * 20) ** (1/3)
    np.testing.assert_allclose(f["item_price_rel_user_all"], [0.5, 2.0, 1.0, np.nan, np.nan], rtol=1e-12)
    np.testing.assert_array_equal(f["item_price"], [10.0, 40.0, 20.0, np.nan, np.nan])


def test_user_item_history():
    ev = make_events(
        [
            (T - 3 * H, "u0", "i0", "impression"),
            (T - 2 * H, "u0", "i0", "impression"),
            (T - 2 * H, "u0", "i0", "click"),
            (T - 1 * H, "u0", "i0", "purchase"),
            (T - 1 * H, "u1", "i1", "purchase"),
            (T, "u0", "i0", "impression"),
        ]
    )
    f = features(ev, "u0", ["i0", "i1"], at(T))
    assert f["user_item_impressions_all"].tolist() == [2, 0]
    assert f["user_item_engagements_all"].tolist() == [2, 0] and f["user_item_purchases_all"].tolist() == [1, 0]
    assert f["user_item_hours_since_last_impression"][0] == pytest.approx(2.0, rel=1e-15)
    assert f["user_item_hours_since_last_engagement"][0] == pytest.approx(1.0, rel=1e-15)
    assert math.isnan(f["user_item_hours_since_last_impression"][1])


def test_cooccurrence_counts_users_first_touches_within_the_window():
    ev = make_events(
        [
            (0, "a", "i0", "click"), (1 * H, "a", "i1", "click"), (1 * H, "a", "i1", "purchase"),  # pair i0-i1
            (0, "b", "i0", "click"), (30 * H, "b", "i1", "click"),  # 30h apart: no pair
            (2 * H, "c", "i0", "click"), (3 * H, "c", "i2", "click"), (4 * H, "c", "i0", "click"),  # pair i0-i2
            (40 * H, "d", "i1", "click"), (41 * H, "d", "i2", "add_to_cart"),  # pair i1-i2
            (50 * H, "f", "i0", "click"), (74 * H, "f", "i3", "click"),  # exactly 24h: a pair
        ]
    )
    # n_i0 = 4 users (a, b, c, f), n_i1 = 3 (a, b, d), n_i2 = 2 (c, d), n_i3 = 1
    f = features(ev, "d", ["i0", "i1", "i3"], at(48 * H))  # d's history: i2, i1
    np.testing.assert_allclose(f["cooc_cosine_max_recent"], [1 / math.sqrt(3 * 2), 1 / math.sqrt(3 * 2), 0.0], rtol=1e-15)
    np.testing.assert_allclose(f["cooc_cosine_sum_recent"], [1 / math.sqrt(3 * 2) + 1 / math.sqrt(3 * 3), 1 / math.sqrt(3 * 2), 0.0], rtol=1e-15)
    assert f["item_users_engaged_all"].tolist() == [3, 3, 0]  # f's i0 touch is at 50h, after t
    f = features(ev, "f", ["i0", "i3"], at(100 * H))
    np.testing.assert_allclose(f["cooc_cosine_max_recent"], [1 / math.sqrt(4 * 1), 1 / math.sqrt(4 * 1)])
    f = features(ev, "d", ["i0"], at(41 * H))  # d's i2 is at t: not history yet, pair i1-i2 not known
    np.testing.assert_allclose(f["cooc_cosine_sum_recent"], [1 / math.sqrt(3 * 3)])
    assert features(ev, "nobody", ["i0"], at(100 * H))["cooc_cosine_sum_recent"][0] == 0.0


def test_recent_items_offline_and_online_agree_on_ties_and_repeats():
    rows = [(0, "u", "i0", "click"), (1, "u", "i1", "click"), (2, "u", "i0", "click"), (3, "u", "i3", "click"), (3, "u", "i2", "purchase")]
    ev = make_events(rows)
    keys = pl.LazyFrame({"user_id": ["u", "u", "u"], "__t": [int(at(m).timestamp() * 1e6) for m in (3, 4, 100)]})
    got = recent_items(prepare_events(ev.lazy(), ITEMS.lazy()), keys, 3).sort("__t").collect()["__hist"].to_list()
    assert got == [["i0", "i1"], ["i2", "i3", "i0"], ["i2", "i3", "i0"]]  # ties at one instant: by item id
    state = UserState()
    for m, _, item, event in rows:
        state.add(int(at(m).timestamp() * 1e6), EVENT_TYPES.index(event), item, None, None, None, True, 3, 0)
    assert [state.history(int(at(m).timestamp() * 1e6), 3) for m in (3, 4)] == got[:2]


def test_context_hour_and_weekday_utc():
    ev = make_events([(0, "u0", "i0", "click")])
    for t in (datetime(2026, 1, 1, 13, 45, tzinfo=timezone.utc), datetime(2026, 1, 4, 23, 59, tzinfo=timezone.utc)):
        f = features(ev, "u0", ["i0"], t)
        assert (f["hour_of_day_utc"][0], f["day_of_week_utc"][0]) == (t.hour, t.weekday())


def test_query_contract_errors_and_passthrough():
    ev = make_events([(0, "u0", "i0", "click")])
    q = queries([("u0", "i0")], at(5)).with_columns(pl.lit(0.7).alias("interest_score"), pl.lit("r1").alias("request_id"))
    out = offline_features(ev.lazy(), ITEMS.lazy(), q.lazy()).collect()
    assert out.columns == ["user_id", "item_id", "ts", "request_id", *NAMES] and out["interest_score"][0] == 0.7
    with pytest.raises(ValueError, match=r"lack column\(s\) \['ts'\]"):
        offline_features(ev.lazy(), ITEMS.lazy(), q.drop("ts").lazy())
    with pytest.raises(ValueError, match="item_price"):
        offline_features(ev.lazy(), ITEMS.lazy(), q.with_columns(item_price=1.0).lazy())


def test_online_refuses_stale_t_and_foreign_state():
    store = InProcessStore()
    online = OnlineFeatures(store, ITEMS)
    online.apply(make_events([(10, "u0", "i0", "click")]))
    assert online.watermark == at(10)
    with pytest.raises(StaleQueryError, match="before the latest applied event"):
        online.features("u0", ["i0"], at(9))
    x = online.features("u0", ["i0", "i1"], at(10), interest_score=np.array([0.5, 0.25]))
    assert x.shape == (2, len(NAMES)) and x[:, 0].tolist() == [0.5, 0.25] and x[0, NAMES.index("item_clicks_all")] == 0
    assert online.features("u0", [], at(11)).shape == (0, len(NAMES))
    with pytest.raises(ValueError, match="other feature definitions"):
        OnlineFeatures(store, ITEMS, FeatureParams(history_items=3))


def test_late_events_are_still_counted():
    ev = make_events([(m, USERS[m % 3], f"i{m % 4}", EVENT_TYPES[m % 4]) for m in range(0, 600, 7)])
    online = OnlineFeatures(InProcessStore(), ITEMS)
    online.apply(ev.filter(pl.col("ts") >= at(300)))
    online.apply(ev.filter(pl.col("ts") < at(300)))  # late: older than what was applied
    off = offline(ev, [(u, i) for u in USERS for i in CANDIDATES], at(600))
    totals = [n for n in NAMES if n.endswith("_all") and ("impressions" in n or "clicks" in n or "purchases" in n)]
    got = np.vstack([online.features(u, CANDIDATES, at(600)) for u in USERS])
    np.testing.assert_array_equal(got[:, [NAMES.index(n) for n in totals]], off.select(totals).to_numpy())


# ---------------------------------------------------------------- properties

minutes = st.one_of(st.integers(0, 40 * D), st.sampled_from([0, 1, 5, H, D, D + 1, 7 * D, 30 * D, 30 * D + 1]))
event_rows = st.lists(
    st.tuples(minutes, st.sampled_from(USERS), st.sampled_from(CANDIDATES), st.sampled_from(EVENT_TYPES)), max_size=40
)
ALL_PAIRS = [(u, i) for u in [*USERS, "new-user"] for i in CANDIDATES]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(past=event_rows, future=event_rows, t=st.integers(1, 40 * D))
def test_no_future_leakage(past, future, t):
    """Changing or adding events at or after t never changes the features at t."""
    before = [r for r in past if r[0] < t]
    a = offline(make_events(past), ALL_PAIRS, at(t)).select(NAMES).to_numpy()
    b = offline(make_events(before + [(t + m, u, i, e) for m, u, i, e in future]), ALL_PAIRS, at(t)).select(NAMES).to_numpy()
    np.testing.assert_array_equal(a, b)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(past=event_rows, future=event_rows, t=st.integers(1, 40 * D), same_tick=event_rows)
def test_coarse_clock_no_leakage_and_other_users_same_tick_unseen(past, future, t, same_tick):
    """With a clock of one hour: events at or after t never count, and neither do other users' events
    earlier in t's hour (their order against t is unknown); the user's own earlier ones do."""
    res_us = 3_600_000_000
    start = t - t % H  # first minute of t's hour

    def feats(rows, pairs):
        q = queries(pairs, at(t))
        return offline_features(make_events(rows).lazy(), ITEMS.lazy(), q.lazy(), resolution_us=res_us).collect().select(NAMES).to_numpy()

    before = [r for r in past if r[0] < t]
    a = feats(past, ALL_PAIRS)
    np.testing.assert_array_equal(a, feats(before + [(t + m, u, i, e) for m, u, i, e in future], ALL_PAIRS))
    u0_pairs = [p for p in ALL_PAIRS if p[0] == "u0"]
    others_in_tick = [(start + m % max(t - start, 1), u, i, e) for m, u, i, e in same_tick if u != "u0"]
    base = [r for r in before if r[0] < start or r[1] == "u0"]
    np.testing.assert_array_equal(feats(base, u0_pairs), feats(base + [r for r in others_in_tick if r[0] < t], u0_pairs))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=event_rows, times=st.lists(st.integers(0, 40 * D), min_size=1, max_size=12), data=st.data())
def test_rows_and_order_preserved(rows, times, data):
    pairs = [data.draw(st.sampled_from(ALL_PAIRS)) for _ in times]
    q = pl.DataFrame(
        {"user_id": [u for u, _ in pairs], "item_id": [i for _, i in pairs], "ts": [at(m) for m in times], "row": list(range(len(times)))}
    ).with_columns(pl.col("ts").cast(pl.Datetime("us", "UTC")))
    out = offline_features(make_events(rows).lazy(), ITEMS.lazy(), q.lazy()).collect()
    assert out.select(q.columns).equals(q)
    # each row equals the same query asked alone
    k = data.draw(st.integers(0, len(times) - 1))
    alone = offline(make_events(rows), [pairs[k]], at(times[k])).select(NAMES).to_numpy()
    np.testing.assert_array_equal(out.select(NAMES).to_numpy()[k : k + 1], alone)


@pytest.fixture(scope="module")
def redis_up():
    try:
        redis.Redis.from_url(REDIS_URL, socket_timeout=2).ping()
    except redis.ConnectionError as e:
        pytest.fail(f"the parity test needs the Redis server at {REDIS_URL} ({e}); start it with `redis-server`")


def drop_namespace(namespace: str) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{namespace}:*", count=10_000))
    if keys:
        client.delete(*keys)
    client.close()


PARAMS = FeatureParams(history_items=2, cooc_window_s=2 * 24 * 3600)  # a short history exercises its pruning


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(rows=event_rows, cuts=st.lists(st.integers(0, 40), max_size=4), after=st.sampled_from([0, 1, 4, 5, H, D + 7, 9 * D, 45 * D]))
def test_online_equals_offline_for_both_backends(redis_up, tmp_path, rows, cuts, after):
    ev = make_events(rows)  # sorted by ts
    t = at((max(r[0] for r in rows) if rows else 0) + after)
    off = offline(ev, ALL_PAIRS, t, PARAMS).select(NAMES).to_numpy()
    bounds = [0, *sorted(min(c, ev.height) for c in cuts), ev.height]
    chunks = [ev.slice(a, b - a) for a, b in zip(bounds, bounds[1:])]

    path = str(tmp_path / f"{uuid.uuid4().hex}.npz")
    for chunk in chunks:  # a restart between chunks: the state reloads from the file
        store = InProcessStore(InProcessConfig(path=path))
        OnlineFeatures(store, ITEMS, PARAMS).apply(chunk)
        store.close()
    inproc = OnlineFeatures(InProcessStore(InProcessConfig(path=path)), ITEMS, PARAMS)

    namespace = f"test-parity-{uuid.uuid4().hex}"
    store = RedisStore(RedisConfig(url=REDIS_URL, namespace=namespace))
    try:
        on_redis = OnlineFeatures(store, ITEMS, PARAMS)
        for chunk in chunks:
            on_redis.apply(chunk)
        for online in (inproc, on_redis):
            got = np.vstack([online.features(u, CANDIDATES, t) for u in [*USERS, "new-user"]])
            assert_same(got, off)
    finally:
        store.close()
        drop_namespace(namespace)
