"""The two ways `offline_features` counts co-occurrence, a pair table ("pairs") and a dense sweep
("dense", for catalogs like MovieLens-1M whose pair table does not fit in memory), give the same
features, on random logs with same-instant ties, several windows and clock resolutions."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import polars as pl
import pytest

from featurizer.contracts.schema import EVENT_TYPES, validate_events, validate_items
from featurizer.definitions import NAMES, FeatureParams
from featurizer.offline.pipeline import offline_features

T0 = datetime(2026, 3, 2, tzinfo=timezone.utc)
ITEMS = validate_items(pl.DataFrame({"item_id": [f"i{k}" for k in range(12)], "title": [f"t{k}" for k in range(12)]}))


def random_log(seed: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """~300 events of 8 users on 13 items (i12 is not in the catalog), minutes apart with ties; 120 queries."""
    rng = np.random.default_rng(seed)
    n = 300
    minutes = np.sort(rng.integers(0, 3 * 24 * 60, n))
    minutes[rng.random(n) < 0.3] = minutes[0]  # a burst of same-instant events
    events = validate_events(pl.DataFrame({
        "ts": [T0 + timedelta(minutes=int(m)) for m in minutes],
        "user_id": [f"u{k}" for k in rng.integers(0, 8, n)],
        "item_id": [f"i{k}" for k in rng.integers(0, 13, n)],
        "event": [EVENT_TYPES[k] for k in rng.integers(0, len(EVENT_TYPES), n)],
    }, schema={"ts": pl.Datetime("us", "UTC"), "user_id": pl.Utf8, "item_id": pl.Utf8, "event": pl.Utf8}))
    q_minutes = np.where(rng.random(120) < 0.5, rng.choice(minutes, 120), rng.integers(0, 4 * 24 * 60, 120))
    queries = pl.DataFrame({
        "user_id": [f"u{k}" for k in rng.integers(0, 9, 120)],  # u8 has no events
        "item_id": [f"i{k}" for k in rng.integers(0, 13, 120)],
        "ts": [T0 + timedelta(minutes=int(m)) for m in q_minutes],
    }).with_columns(pl.col("ts").cast(pl.Datetime("us", "UTC")))
    return events, queries


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("window_s,resolution_us", [(0, 1), (3600, 1), (24 * 3600, 1), (24 * 3600, 3_600_000_000)])
def test_dense_sweep_equals_pair_table(seed, window_s, resolution_us):
    events, queries = random_log(seed)
    params = FeatureParams(history_items=4, cooc_window_s=window_s)
    out = {m: offline_features(events.lazy(), ITEMS.lazy(), queries.lazy(), params, resolution_us, cooc=m).collect()
           for m in ("pairs", "dense")}
    assert out["pairs"]["cooc_cosine_sum_recent"].sum() > 0  # the logs do co-occur
    np.testing.assert_array_equal(out["pairs"].select(n for n in NAMES if n != "cooc_cosine_sum_recent").to_numpy(),
                                  out["dense"].select(n for n in NAMES if n != "cooc_cosine_sum_recent").to_numpy())
    np.testing.assert_allclose(out["pairs"]["cooc_cosine_sum_recent"].to_numpy(),
                               out["dense"]["cooc_cosine_sum_recent"].to_numpy(), rtol=1e-12)


def test_auto_picks_dense_for_small_catalogs_and_rejects_unknown_methods():
    events, queries = random_log(0)
    auto = offline_features(events.lazy(), ITEMS.lazy(), queries.lazy()).collect()
    dense = offline_features(events.lazy(), ITEMS.lazy(), queries.lazy(), cooc="dense").collect()
    assert auto.equals(dense)
    with pytest.raises(ValueError, match="cooc must be one of"):
        offline_features(events.lazy(), ITEMS.lazy(), queries.lazy(), cooc="sparse")
    no_history = queries.with_columns(pl.lit("u8").alias("user_id"))
    out = offline_features(events.lazy(), ITEMS.lazy(), no_history.lazy(), cooc="dense").collect()
    assert (out["cooc_cosine_max_recent"] == 0).all() and out.height == queries.height
