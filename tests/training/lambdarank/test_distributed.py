"""Ranker training on Ray (issue 32 item 2, `training.lambdarank.distributed`): LightGBM's data-parallel
mode on 2 workers of a real local Ray, whole query groups per worker, and a model as good as one
process's on the same groups."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from featurizer.definitions import NAMES
from ranker.feature_matrix import BundleInputs
from ranker.user_tower import UserTower
from training.lambdarank.booster import train_lambdarank
from training.lambdarank.distributed import deal, shard_owner
from training.lambdarank.example_store import ExampleStore, group_sizes
from training.lambdarank.params import LightGBMParams
from training.ranking_metrics import mean_metrics


def shard_rows(sizes: np.ndarray, workers: int) -> list[np.ndarray]:
    """The row indices of each worker's shard, as `shard_owner` deals them."""
    owner = shard_owner(sizes, workers)
    return [np.flatnonzero(owner == w) for w in range(workers)]


def test_shards_are_whole_groups_dealt_round_robin():
    sizes = np.array([3, 1, 4, 2, 5])
    shards = shard_rows(sizes, 2)
    starts = np.r_[0, np.cumsum(sizes)[:-1]]
    rows = {g: set(range(starts[g], starts[g] + sizes[g])) for g in range(sizes.size)}
    assert set(shards[0]) == rows[0] | rows[2] | rows[4] and set(shards[1]) == rows[1] | rows[3]
    assert sorted(np.concatenate(shards).tolist()) == list(range(sizes.sum()))  # every row once
    for shard in shards:  # no group has rows in two shards
        assert all(rows[g] <= set(shard) or not rows[g] & set(shard) for g in rows)
    assert [s.size for s in shard_rows(np.array([2]), 3)] == [2, 0, 0]


def test_deal_gives_each_worker_its_rows_in_order_one_batch_at_a_time():
    sizes = np.array([3, 1, 4, 2, 5, 2])
    X = np.arange(sizes.sum() * 2, dtype=np.float32).reshape(-1, 2)
    owner = shard_owner(sizes, 2)
    held = []

    def put(rows):
        held.append(rows.shape[0])
        return rows.copy()

    batches = (X[a: a + 4] for a in range(0, X.shape[0], 4))  # batch edges cut groups: 17 rows in 5 batches
    shards = deal(batches, owner, 2, put)
    for w, shard in enumerate(shards):
        assert np.array_equal(np.concatenate(shard), X[shard_rows(sizes, 2)[w]])
    assert max(held) <= 4  # never more than a batch at once
    with pytest.raises(ValueError, match="held 4 rows, the groups 17"):
        deal([X[:4]], owner, 2, put)


def _groups(n_groups: int, seed: int, per_group: int = 12) -> pl.DataFrame:
    """Groups of `per_group` candidates whose one positive is, most of the time, the one with the
    highest weighted sum of three features."""
    rng = np.random.default_rng(seed)
    n = n_groups * per_group
    x = rng.normal(size=(n, len(NAMES)))
    signal = x[:, 1] + 0.5 * x[:, 5] - 0.3 * x[:, 9] + rng.normal(scale=0.5, size=n)
    label = np.zeros(n, dtype=np.int32)
    best = signal.reshape(n_groups, per_group).argmax(axis=1)
    label[np.arange(n_groups) * per_group + best] = 1
    return pl.DataFrame(x, schema=list(NAMES)).with_columns(
        pl.Series("request_id", np.repeat(np.arange(n_groups), per_group)), pl.Series("label", label))


def _store(inputs: BundleInputs, train: pl.DataFrame, valid: pl.DataFrame, tmp_path, batch_rows: int = 500) -> ExampleStore:
    store = ExampleStore(inputs, tmp_path, batch_rows=batch_rows)
    store.add("train", train)
    store.add("valid", valid)
    return store


def test_two_ray_workers_train_as_well_as_one_process(tmp_path, monkeypatch):
    pytest.importorskip("ray")
    train, valid, test = _groups(400, 0), _groups(100, 1), _groups(300, 2)
    inputs = BundleInputs(list(NAMES), {}, UserTower.pooled(), source="test")
    cfg = LightGBMParams(num_boost_round=30, early_stopping_rounds=10, min_data_in_leaf=20)
    store = _store(inputs, train, valid, tmp_path)  # 4,800 rows in batches of 500: shards dealt batch by batch
    local, _, _ = train_lambdarank(store, cfg)

    def whole(*_):
        raise AssertionError("the Ray engine read a whole matrix")

    monkeypatch.setattr(ExampleStore, "matrix", whole)
    on_ray, params, evals = train_lambdarank(store, LightGBMParams(**{**cfg.__dict__, "engine": "ray"}))
    assert params["tree_learner"] == "data" and params["num_machines"] == 2 and "machines" not in params
    assert evals["valid"]["ndcg@10"] and on_ray.num_trees() > 0
    X, y, sizes = inputs.frame_matrix(test), test["label"].to_numpy().astype(float), group_sizes(test)
    ndcg = {name: mean_metrics(b.predict(X, num_iteration=b.best_iteration or None), y, sizes)["ndcg@10"]
            for name, b in (("local", local), ("ray", on_ray))}
    assert ndcg["ray"] > 0.6 and abs(ndcg["ray"] - ndcg["local"]) < 0.05, ndcg  # held-out groups: the same quality
    with pytest.raises(ValueError, match="every worker needs a group"):
        train_lambdarank(_store(inputs, train.head(12), valid, tmp_path), LightGBMParams(engine="ray", ray_workers=2))
