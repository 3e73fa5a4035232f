import lightgbm as lgb
import numpy as np
import pytest

from featurizer.definitions import FAMILIES
from ranker.bundle import EncoderRef, load_bundle, save_bundle
from ranker.explain import explain, feature_families

FEATURES = ["interest_score", "item_clicks_7d", "user_item_engagements_all", "item_price", "position"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, len(FEATURES))).astype(np.float32)
    y = ((X[:, 0] + 0.5 * X[:, 1]) > 0).astype(int)
    ds = lgb.Dataset(X, label=y, group=[20] * 20, feature_name=FEATURES)
    booster = lgb.train({"objective": "lambdarank", "verbosity": -1, "min_data_in_leaf": 5, "seed": 0}, ds, num_boost_round=20)
    out = tmp_path_factory.mktemp("bundle")
    save_bundle(out, booster, FEATURES, EncoderRef(), {})
    return load_bundle(out), X


def test_family_contributions_sum_to_the_score(bundle):
    b, X = bundle
    contrib, bias = explain(b, X[:50])
    assert contrib.shape == (50, len(FAMILIES))
    np.testing.assert_allclose(contrib.sum(axis=1) + bias, b.score(X[:50]), rtol=1e-6, atol=1e-6)


def test_the_driving_feature_shows_up_in_its_family(bundle):
    b, X = bundle
    contrib, _ = explain(b, X)
    spread = np.abs(contrib).mean(axis=0)
    assert spread[FAMILIES.index("text")] == spread.max()  # interest_score drives the label
    assert spread[FAMILIES.index("cooccurrence")] == 0.0  # no co-occurrence feature in this model


def test_families_of_features():
    assert feature_families(FEATURES) == ["text", "popularity", "personal", "price", "context"]
    with pytest.raises(ValueError, match="no family"):
        feature_families(["mystery_feature"])


def test_empty_input(bundle):
    b, _ = bundle
    contrib, bias = explain(b, np.zeros((0, len(FEATURES)), dtype=np.float32))
    assert contrib.shape == (0, len(FAMILIES)) and bias.shape == (0,)
