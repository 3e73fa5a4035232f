"""Train/serve parity of the sequence model (issue 31 item 3): a bundle trained by the leave-one-out
ranker training with `sequence_score` (`training.lambdarank.leave_one_out`, the torch model over
each group's history seq[:pos]) is served by the engine (`serving.ranking.sequence_scores`: the numpy
forward pass over the user's sequence as the online state folds it). For the same groups at their
times, the engine's `sequence_score` and its final scores equal training's."""

from __future__ import annotations

import asyncio
import shutil

import numpy as np
import polars as pl
import pytest

from featurizer.contracts.schema import read_dataset
from featurizer.definitions import FeatureParams
from featurizer.online.features import OnlineFeatures
from featurizer.store.in_process import InProcessStore
from ranker.bundle import load_bundle
from ranker.feature_matrix import BundleInputs
from ranker.sequence import BUNDLE_DIR, CONFIG_FILE, MODEL_FILE, SASRecConfig
from serving.ranking.engine import BundleRuntime, RankingEngine, serving_inputs
from serving.ranking.outcome import Candidate
from serving.ranking.item_store import ItemStore
from training.data.loo import loo_data
from training.lambdarank.leave_one_out import build_examples, train_loo_ranker
from training.lambdarank.params import LooRankerConfig
from training.sequence.sasrec import train_sasrec

GROUPS = 6  # groups compared, spread over the data


@pytest.fixture(scope="module")
def trained(small_shop, tmp_path_factory):
    """(dataset and split of the leave-one-out path, the ranker config, the bundle directory)."""
    ds, split = loo_data(read_dataset(small_shop))
    out = tmp_path_factory.mktemp("seq_bundle")
    # max_len 4 < most histories: the served sequence must be cut where training cut it
    cfg = SASRecConfig(max_len=4, dim=16, heads=2, layers=2, epochs=2, eval_every=1, patience=2, valid_users=100,
                       hold_out=1, dropout=0.0)
    train_sasrec(split, cfg, out / "seq", progress=False)
    (out / "bundle" / BUNDLE_DIR).mkdir(parents=True)
    for name in (CONFIG_FILE, MODEL_FILE):
        shutil.copyfile(out / "seq" / name, out / "bundle" / BUNDLE_DIR / name)
    rcfg = LooRankerConfig(variant="behavioural", hard_negatives=0, negatives=8, max_users=300, num_boost_round=20,
                           sequence_dir=BUNDLE_DIR, held_out_targets=1)
    train_loo_ranker(ds, split, out / "bundle", rcfg, progress=False)
    return ds, split, rcfg, out / "bundle"


def test_served_sequence_scores_and_scores_equal_trainings(trained):
    from ranker.sequence_torch import load

    ds, split, rcfg, path = trained
    bundle = load_bundle(path)
    assert bundle.sequence is not None and "sequence_score" in bundle.feature_names
    model = load(path / BUNDLE_DIR)[0]
    examples = build_examples(ds, split, rcfg, sequence_model=model, progress=False)
    groups = examples.group_by("group", maintain_order=True).agg(pl.col("user_id").first(), pl.col("ts").first())
    picked = groups.gather(np.linspace(0, groups.height - 1, GROUPS).astype(int))
    runtime = BundleRuntime(bundle, "", None)
    items = ItemStore(ds.items)
    compared, long_histories = 0, 0
    for group, user, ts in picked.iter_rows():
        rows = examples.filter(pl.col("group") == group)
        ids = rows["item_id"].to_list()
        train_X = BundleInputs.of(bundle).frame_matrix(rows)
        online = OnlineFeatures(InProcessStore(), ds.items, FeatureParams())
        online.apply(ds.events.filter(pl.col("ts") < ts))
        serving_inputs(bundle, online)  # this state can serve the bundle
        engine = RankingEngine(items=items, online=online, clock=lambda ts=ts: ts)
        served = asyncio.run(engine.sequence_scores(runtime, user, items.rows(ids), ts, None, []))
        np.testing.assert_allclose(served, rows["sequence_score"].to_numpy(), rtol=1e-4, atol=1e-4)
        outcome = asyncio.run(engine.rank(runtime, user, [Candidate(item_id=i) for i in ids]))
        got = dict(zip(outcome.item_ids, outcome.scores.tolist()))
        np.testing.assert_allclose([got[i] for i in ids], bundle.score(train_X), rtol=1e-5, atol=1e-5)
        compared += len(ids)
        long_histories += len(online.sequence(user, ts)) > 4
    assert compared >= GROUPS * 5 and long_histories >= 1


def test_a_state_without_complete_sequences_or_with_shorter_ones_is_refused(trained):
    from ranker.bundle import BundleError

    ds, _, _, path = trained
    bundle = load_bundle(path)
    with pytest.raises(BundleError, match="keeps 3"):
        serving_inputs(bundle, OnlineFeatures(InProcessStore(), ds.items, FeatureParams(sequence_items=3)))
    old = OnlineFeatures(InProcessStore(), ds.items)
    old.sequence_complete = False  # as a store written before semrank kept sequences opens
    with pytest.raises(BundleError, match="partial"):
        serving_inputs(bundle, old)
