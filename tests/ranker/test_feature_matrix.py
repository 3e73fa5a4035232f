"""`BundleInputs.matrix`: each model column takes its feature (or constant), whatever the layout."""

from __future__ import annotations

import numpy as np
import pytest

from featurizer.definitions import NAMES
from ranker.feature_matrix import BundleInputs
from ranker.user_tower import UserTower


def _reference(names: list[str], constants: dict[str, float], features: np.ndarray) -> np.ndarray:
    cols = [np.full(len(features), constants[n]) if n in constants else features[:, NAMES.index(n)] for n in names]
    return np.stack(cols, axis=1).astype(np.float32)


@pytest.mark.parametrize("layout", ["names then constant", "shuffled, constant inside", "a run not at the start"])
def test_every_column_takes_its_feature_or_constant(layout):
    rng = np.random.default_rng(3)
    if layout == "names then constant":
        names = [*NAMES, "position"]
    elif layout == "shuffled, constant inside":
        names = [str(n) for n in rng.permutation(NAMES)[:30]]
        names.insert(7, "position")
    else:
        names = ["position", *NAMES[5:20]]
    inputs = BundleInputs(names, {"position": 0.0}, UserTower.pooled())
    features = rng.normal(size=(17, len(NAMES)))
    features[rng.random(features.shape) < 0.2] = np.nan
    X = inputs.matrix(features)
    assert X.dtype == np.float32 and X.shape == (17, len(names))
    np.testing.assert_array_equal(X, _reference(names, {"position": 0.0}, features))
