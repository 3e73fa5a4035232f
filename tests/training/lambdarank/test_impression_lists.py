"""The impression-list trainer (`training.lambdarank.impression_lists`): feature-set variants."""

import pytest

from featurizer.contracts.schema import read_dataset
from featurizer.definitions import CONTEXT_TRAINING_ONLY, NAMES
from ranker.bundle import load_bundle
from training.lambdarank.impression_lists import train_ranker
from training.lambdarank.params import RankerTrainConfig


def test_behavioural_variant_drops_the_text_family(small_shop, encoder, tmp_path):
    cfg = RankerTrainConfig(test_days=3, valid_days=3, seed=0, variant="behavioural", num_boost_round=20)
    extra = train_ranker(read_dataset(small_shop), tmp_path / "b", cfg, encoder)
    bundle = load_bundle(tmp_path / "b")
    assert bundle.feature_names == [n for n in NAMES if n != "interest_score"] + list(CONTEXT_TRAINING_ONLY)
    assert extra["variant"] == "behavioural" and "interest_score" not in extra["feature_importance_gain"]
    with pytest.raises(ValueError, match="variant must be one of"):
        train_ranker(read_dataset(small_shop), tmp_path / "x", RankerTrainConfig(variant="text-only"), encoder)
