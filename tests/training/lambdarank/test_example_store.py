"""Bounded-memory ranker training (issue 32 item 1): examples are computed one chunk of groups at a time
(`training.lambdarank.leave_one_out.example_chunks`) into an on-disk `ExampleStore` that LightGBM reads
back in batches. What must not change: the examples (any chunk size gives the rows of one pass) and
the model (the same trees as LightGBM trained on the whole matrix in memory)."""

from __future__ import annotations

import os

import numpy as np
import polars as pl
import pytest

from featurizer.definitions import NAMES
from ranker.feature_matrix import BundleInputs
from ranker.user_tower import UserTower
from training.lambdarank.booster import train_lambdarank
from training.lambdarank.example_store import ExampleStore, group_sizes, with_positives
from training.lambdarank.params import LightGBMParams

INPUTS = BundleInputs([*NAMES, "position"], {"position": 0.0}, UserTower.pooled(), source="test")


def _groups(n_groups: int, seed: int, per_group: int = 9, first: int = 0) -> pl.DataFrame:
    """Groups whose positive is mostly the row with the highest weighted sum of three features; NaNs
    sprinkled in (LightGBM's missing values must survive the file); every fifth group has no positive;
    one feature is rare (nonzero in 30 rows: below min_data_in_leaf, so LightGBM pre-filters it)."""
    rng = np.random.default_rng(seed)
    n = n_groups * per_group
    x = rng.normal(size=(n, len(NAMES)))
    x[rng.random(x.shape) < 0.05] = np.nan
    x[:, 7] = 0.0
    x[rng.choice(n, size=min(30, n), replace=False), 7] = 1.0
    signal = np.nan_to_num(x[:, 1]) + 0.5 * np.nan_to_num(x[:, 5]) + rng.normal(scale=0.5, size=n)
    label = np.zeros(n, dtype=np.int32)
    best = signal.reshape(n_groups, per_group).argmax(axis=1)
    label[np.arange(n_groups) * per_group + best] = 1 + (best % 2)
    label[np.repeat(np.arange(n_groups) % 5 == 4, per_group)] = 0
    return pl.DataFrame(x, schema=list(NAMES)).with_columns(
        pl.Series("request_id", np.repeat(np.arange(first, first + n_groups), per_group)), pl.Series("label", label),
        pl.Series("position", np.tile(np.arange(per_group), n_groups).astype(np.float64)))


def test_the_store_gives_back_the_matrix_labels_and_groups_of_its_chunks(tmp_path):
    train = _groups(300, 0)
    with ExampleStore(INPUTS, tmp_path, batch_rows=100) as store:
        for a in range(0, 300, 70):  # chunks of whole groups
            store.add("train", train.filter(pl.col("request_id").is_between(a, a + 69)), keep=["interest_score", "position"])
        store.add("test", train, observed_context=False)
        kept = with_positives(train)
        X = INPUTS.frame_matrix(kept, observed_context=True)
        assert store.rows("train") == kept.height and np.array_equal(store.matrix("train"), X, equal_nan=True)
        assert np.array_equal(store.labels("train"), kept["label"].to_numpy())
        assert np.array_equal(store.sizes("train"), group_sizes(kept))
        assert np.array_equal(store.column("train", "position"), kept["position"].to_numpy())
        assert store.column("test", "position") is None  # not kept there
        # the test part is as served: the context at the bundle's constant, not as logged
        assert (store.matrix("test")[:, -1] == 0.0).all() and store.matrix("train")[:, -1].max() == 8
        rows = store.sequence("train")
        assert np.array_equal(rows[5], X[5], equal_nan=True) and np.array_equal(rows[-1], X[-1], equal_nan=True)
        assert np.array_equal(rows[10:250], X[10:250], equal_nan=True)
        with pytest.raises(IndexError):
            rows[len(rows)]
        with pytest.raises(ValueError, match="split between two chunks"):
            store.add("train", train.filter(pl.col("request_id") == 298))
        with pytest.raises(ValueError, match="observed_context"):
            store.add("test", _groups(2, 1, first=1000))
        directory = store._tmp.name
    assert not list(tmp_path.iterdir()) and directory  # closed: the files are gone


def test_lightgbm_on_the_store_grows_the_trees_of_the_matrix_in_memory(tmp_path):
    import lightgbm as lgb

    train, valid = with_positives(_groups(600, 2)), with_positives(_groups(150, 3))
    cfg = LightGBMParams(num_boost_round=25, early_stopping_rounds=10)  # min_data_in_leaf 50, LightGBM's default 20
    with ExampleStore(INPUTS, tmp_path, batch_rows=333) as store:
        for a in range(0, 600, 128):
            store.add("train", train.filter(pl.col("request_id").is_between(a, a + 127)))
        store.add("valid", valid)
        booster, params, evals = train_lambdarank(store, cfg)
        predicted = store.predict("valid", booster)

    def dataset(df, ref=None):
        return lgb.Dataset(INPUTS.frame_matrix(df, observed_context=True), label=df["label"].to_numpy(),
                           group=group_sizes(df), feature_name=INPUTS.feature_names, reference=ref, free_raw_data=False)

    dtrain = dataset(train)
    evals_mem: dict = {}
    in_memory = lgb.train(params, dtrain, num_boost_round=cfg.num_boost_round, valid_sets=[dataset(valid, dtrain)],
                          valid_names=["valid"], callbacks=[lgb.early_stopping(cfg.early_stopping_rounds, verbose=False),
                                                            lgb.record_evaluation(evals_mem)])
    assert booster.model_to_string() == in_memory.model_to_string()
    assert evals["valid"]["ndcg@10"] == evals_mem["valid"]["ndcg@10"] and booster.num_trees() > 0
    assert np.allclose(predicted, in_memory.predict(INPUTS.frame_matrix(valid, observed_context=True)), rtol=0, atol=1e-12)


def test_a_sampled_dataset_finds_the_bins_of_the_matrix_in_memory(tmp_path):
    """Beyond `bin_construct_sample_cnt` rows LightGBM finds the bins on a sample; the store's Dataset
    must draw the rows a matrix Dataset draws (its seed) and pre-filter as it does (min_data_in_leaf)."""
    import lightgbm as lgb

    train = with_positives(_groups(600, 4))
    params = {"objective": "lambdarank", "seed": 5, "bin_construct_sample_cnt": 700, "min_data_in_leaf": 50,
              "feature_fraction": 0.9, "num_leaves": 7, "deterministic": True, "force_row_wise": True, "verbosity": -1}
    with ExampleStore(INPUTS, tmp_path) as store:
        store.add("train", train)
        from_store = lgb.train(params, store.dataset("train"), num_boost_round=5)
    in_memory = lgb.train(params, lgb.Dataset(INPUTS.frame_matrix(train, observed_context=True),
                                              label=train["label"].to_numpy(), group=group_sizes(train),
                                              feature_name=INPUTS.feature_names), num_boost_round=5)
    assert from_store.model_to_string() == in_memory.model_to_string()


def test_a_killed_runs_example_files_are_removed_by_the_next_store(tmp_path):
    import subprocess
    import sys

    from training.lambdarank.example_store import OWNER_FILE, PREFIX

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    abandoned = tmp_path / f"{PREFIX}killed"
    abandoned.mkdir()
    (abandoned / OWNER_FILE).write_text(dead.stdout)  # a process that has exited
    (abandoned / "train.f32").write_bytes(b"x" * 1024)
    running = tmp_path / f"{PREFIX}running"
    running.mkdir()
    (running / OWNER_FILE).write_text(f"{os.getppid()}\n")  # a live process: another run's files
    unowned = tmp_path / f"{PREFIX}unowned"
    unowned.mkdir()
    inputs = BundleInputs(list(NAMES), {}, UserTower.pooled(), source="test")
    with ExampleStore(inputs, tmp_path):
        assert not abandoned.exists() and running.exists() and unowned.exists()
        mine = [d for d in tmp_path.glob(PREFIX + "*") if d not in (running, unowned)]
        assert len(mine) == 1 and (mine[0] / OWNER_FILE).read_text().strip() == str(os.getpid())
    assert not mine[0].exists()
