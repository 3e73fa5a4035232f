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


@pytest.mark.parametrize("names", [[*NAMES, "sequence_score"], ["sequence_score", *NAMES[:10], "position"]])
def test_a_given_score_takes_its_column_and_must_be_given(names):
    """`sequence_score` (the bundle's sequence model) is given by the caller, in `matrix` and as a frame
    column; a bundle that takes it never gets NaN silently for it."""
    import polars as pl

    rng = np.random.default_rng(4)
    inputs = BundleInputs(names, {"position": 0.0}, UserTower.pooled())
    assert inputs.given == ["sequence_score"]
    features = rng.normal(size=(9, len(NAMES)))
    seq = rng.normal(size=9)
    X = inputs.matrix(features, given={"sequence_score": seq})
    want = _reference([n if n != "sequence_score" else NAMES[0] for n in names], {"position": 0.0}, features)
    k = names.index("sequence_score")
    want[:, k] = seq.astype(np.float32)
    np.testing.assert_array_equal(X, want)
    with pytest.raises(ValueError, match="sequence_score"):
        inputs.matrix(features)
    frame = pl.DataFrame(features, schema=list(NAMES)).with_columns(pl.Series("sequence_score", seq))
    np.testing.assert_array_equal(inputs.frame_matrix(frame), X)
    with pytest.raises(ValueError, match="sequence_score"):
        inputs.frame_matrix(frame.drop("sequence_score"))
    assert BundleInputs(list(NAMES), {}, UserTower.pooled()).given == []
