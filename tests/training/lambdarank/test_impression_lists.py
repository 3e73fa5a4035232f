"""The impression-list trainer (`training.lambdarank.impression_lists`): feature-set variants, chunked examples."""

from dataclasses import replace

import pytest
from polars.testing import assert_frame_equal

from featurizer.contracts.schema import read_dataset
from featurizer.definitions import CONTEXT_TRAINING_ONLY, NAMES
from featurizer.errors import ConfigError
from ranker.bundle import load_bundle
from ranker.feature_matrix import BundleInputs
from ranker.user_tower import UserTower
from training.lambdarank.impression_lists import build_examples, impression_lists, list_chunks, train_ranker
from training.lambdarank.params import RankerTrainConfig


def test_behavioural_variant_drops_the_text_family(small_shop, encoder, tmp_path):
    cfg = RankerTrainConfig(test_days=3, valid_days=3, seed=0, variant="behavioural", num_boost_round=20)
    extra = train_ranker(read_dataset(small_shop), tmp_path / "b", cfg, encoder)
    bundle = load_bundle(tmp_path / "b")
    assert bundle.feature_names == [n for n in NAMES if n != "interest_score"] + list(CONTEXT_TRAINING_ONLY)
    assert extra["variant"] == "behavioural" and "interest_score" not in extra["feature_importance_gain"]
    with pytest.raises(ValueError, match="variant must be one of"):
        train_ranker(read_dataset(small_shop), tmp_path / "x", RankerTrainConfig(variant="text-only"), encoder)


def test_the_bundle_does_not_depend_on_the_chunk_size(small_shop, encoder, tmp_path):
    """Memory follows `feature_chunk_rows` (issue 32 item 1); the examples, the trees and the test table
    must not (one shuffle stream runs through the chunks; LightGBM reads the same rows back)."""
    ds = read_dataset(small_shop)
    rows = impression_lists(ds.events)
    assert len(list_chunks(rows, 700)) > 3
    assert sum(b - a for a, b in list_chunks(rows, 700)) == rows.height
    inputs = BundleInputs(list(NAMES), {}, UserTower.pooled(), source="test")
    # equal but for a float sum's order (co-occurrence sums differ by about 1e-16 in a few rows)
    assert_frame_equal(build_examples(ds, encoder, inputs, chunk_rows=700), build_examples(ds, encoder, inputs),
                       rel_tol=1e-12, abs_tol=1e-12)
    cfg = RankerTrainConfig(test_days=3, valid_days=3, seed=0, num_boost_round=20)
    whole = train_ranker(ds, tmp_path / "whole", cfg, encoder)
    chunked = train_ranker(ds, tmp_path / "chunked", replace(cfg, feature_chunk_rows=700), encoder)
    assert (tmp_path / "whole" / "ranker.txt").read_text() == (tmp_path / "chunked" / "ranker.txt").read_text()
    assert whole["metrics"] == chunked["metrics"] and whole["training_data"] == chunked["training_data"]
    assert set(whole["metrics"]["test"]) == {"logged-order", "popularity", "encoder-frozen", "lightgbm-bundle"}
    with pytest.raises(ConfigError, match="feature_chunk_rows"):
        RankerTrainConfig(feature_chunk_rows=0)
