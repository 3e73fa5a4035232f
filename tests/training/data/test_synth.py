import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from featurizer.contracts.schema import EVENT_TYPES, read_dataset
from training.data.synth import (
    CATEGORIES,
    SynthConfig,
    load_truth,
    synthesize,
    true_interest,
)

SMALL = SynthConfig(n_users=200, n_items=120, n_days=7)
TABLES = ("items.parquet", "events.parquet", "truth/users.parquet", "truth/items.parquet")


@pytest.fixture(scope="module")
def shop(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth_seed0")
    return out, synthesize(out, seed=0, config=SMALL)


@pytest.fixture(scope="module")
def events(shop) -> pl.DataFrame:
    return read_dataset(shop[0]).events


@pytest.fixture(scope="module")
def labelled_impressions(events) -> pl.DataFrame:
    """Impressions with clicked = 0/1 (a click on the same request and item)."""
    clicks = events.filter(pl.col("event") == "click").select("request_id", "item_id", pl.lit(1).alias("clicked"))
    return (
        events.filter(pl.col("event") == "impression")
        .join(clicks, on=["request_id", "item_id"], how="left")
        .with_columns(pl.col("clicked").fill_null(0))
    )


def test_output_follows_the_contract(shop):
    out, summary = shop
    ds = read_dataset(out)
    assert ds.items.height == SMALL.n_items
    assert ds.report.events_unknown_item == 0
    assert ds.items["item_id"].str.contains(r"^i\d{6}$").all()
    assert ds.events["user_id"].str.contains(r"^u\d{5}$").all()
    assert ds.events["request_id"].str.contains(r"^r\d{7}$").all()
    assert ds.items["description"].null_count() == 0 and ds.items["price"].min() > 0
    assert set(ds.events["event"].unique().to_list()) == set(EVENT_TYPES)
    assert summary["events"] == {e: ds.events.filter(pl.col("event") == e).height for e in EVENT_TYPES}
    assert json.loads((out / "summary.json").read_text()) == summary
    assert 0.02 < summary["ctr"] < 0.12


def test_truth_tables(shop):
    out, _ = shop
    meta = json.loads((out / "truth" / "meta.json").read_text())
    users = pl.read_parquet(out / "truth" / "users.parquet")
    items = pl.read_parquet(out / "truth" / "items.parquet")
    assert meta["categories"] == [c.name for c in CATEGORIES]
    assert users.height == SMALL.n_users and items.height == SMALL.n_items
    assert (users["affinity"].list.len() == len(meta["categories"])).all()
    np.testing.assert_allclose(users["affinity"].list.sum().to_numpy(), 1.0)
    assert users["preferred_attributes"].list.len().min() >= 1
    assert set(users["preferred_tier"].unique()) <= {"budget", "mid", "premium"}
    assert {"item_id", "category", "attributes", "base_quality", "drift_slope", "launch_boost"} <= set(items.columns)
    truth, _, _ = load_truth(out)
    assert truth.affinity.shape == (SMALL.n_users, len(CATEGORIES))


def test_same_seed_same_data_other_seed_differs(shop, tmp_path):
    out, summary = shop
    again = tmp_path / "again"
    assert synthesize(again, seed=0, config=SMALL) == summary
    for table in TABLES:
        assert pl.read_parquet(again / table).equals(pl.read_parquet(out / table)), table
        assert (again / table).read_bytes() == (out / table).read_bytes(), table
    other = tmp_path / "other"
    synthesize(other, seed=1, config=SMALL)
    for table in ("items.parquet", "events.parquet"):
        assert not pl.read_parquet(other / table).equals(pl.read_parquet(out / table)), table


def test_at_least_twelve_categories(shop):
    items = read_dataset(shop[0]).items
    assert items["category"].n_unique() >= 12
    assert items["brand"].null_count() == 0


def test_each_request_is_one_full_list(events):
    lists = (
        events.filter(pl.col("event") == "impression")
        .group_by("request_id")
        .agg(pl.len().alias("n"), pl.col("position").sort().alias("positions"), pl.col("user_id").n_unique().alias("u"),
             pl.col("item_id").n_unique().alias("distinct_items"), pl.col("ts").n_unique().alias("times"))
    )
    assert (lists["n"] == SMALL.list_size).all()
    assert lists["positions"].to_list() == [list(range(SMALL.list_size))] * lists.height
    assert (lists["u"] == 1).all() and (lists["distinct_items"] == SMALL.list_size).all()
    assert (lists["times"] == 1).all()
    requests = events.filter(pl.col("event") == "impression")["request_id"].unique()
    assert set(events["request_id"].unique().to_list()) == set(requests.to_list())


def _check_follows(events: pl.DataFrame, later: str, earlier: str) -> None:
    """Every `later` event has an `earlier` event on the same (user, item, request) strictly before it."""
    keys = ["user_id", "item_id", "request_id"]
    first = events.filter(pl.col("event") == earlier).group_by(keys).agg(pl.col("ts").min().alias("t0"))
    joined = events.filter(pl.col("event") == later).join(first, on=keys, how="left")
    assert joined.height > 0
    assert joined["t0"].null_count() == 0, f"{later} without a {earlier}"
    assert (joined["ts"] > joined["t0"]).all(), f"{later} not after its {earlier}"


def test_funnel_order(events):
    _check_follows(events, "click", "impression")
    _check_follows(events, "add_to_cart", "click")
    _check_follows(events, "purchase", "add_to_cart")
    keys = ["user_id", "item_id", "request_id", "event"]
    assert events.filter(pl.col("event") != "impression").select(keys).is_duplicated().sum() == 0


def test_position_bias(labelled_impressions):
    ctr = labelled_impressions.group_by("position").agg(pl.col("clicked").mean()).sort("position")["clicked"]
    assert ctr[0] > ctr[10]
    assert ctr[0] > 2 * ctr[10:].mean()


def test_clicks_follow_true_interest(shop, labelled_impressions):
    interest = true_interest(shop[0], labelled_impressions)
    clicked = labelled_impressions["clicked"].to_numpy() == 1
    assert clicked.sum() > 50
    assert interest[clicked].mean() > 2 * interest[~clicked].mean()
    # The logging policy does not rank by true interest, so a better ranking exists.
    top = labelled_impressions.with_columns(interest=pl.Series(interest)).group_by("request_id").agg(
        (pl.col("interest").arg_max() == pl.col("position").arg_min()).alias("best_first"))
    assert top["best_first"].mean() < 0.5


def test_items_not_shown_before_created(shop, events):
    items = read_dataset(shop[0]).items
    shown = events.filter(pl.col("event") == "impression").join(items.select("item_id", "created_at"), on="item_id")
    assert (shown["ts"] >= shown["created_at"]).all()
    start = SMALL.start
    new_items = items.filter(pl.col("created_at") > start)
    assert new_items.height > 0  # some items launch inside the period...
    assert shown.filter(pl.col("created_at") > start).height > 0  # ...and are shown after launch


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="list_size"):
        replace(SMALL, n_items=10)
    with pytest.raises(ValueError, match="sessions_per_user_per_day"):
        replace(SMALL, sessions_per_user_per_day=0.0)
