"""A bundle's inputs: its ordered feature columns, filled from the featurizer's features, and its user tower.

    inputs = BundleInputs.of(bundle)                       # or BundleInputs(names, constants, tower)
    X = inputs.matrix(online_features)                     # (n, len(NAMES)) in NAMES order -> (n, len(names)) float32
    X = inputs.frame_matrix(offline_frame)                 # the same from a frame with NAMES columns
    inputs.tower                                           # the user side of interest_score (ranker.user_tower)
    X = inputs.matrix(features, given={"sequence_score": s})  # a bundle with a sequence model's score

Columns come from the featurizer's features (`featurizer.definitions.NAMES`), from a constant, or are
**given**: a score that another model of the bundle computes per candidate (`GIVEN`:
`sequence_score`, the bundle's sequence model, `ranker.sequence`), passed to `matrix` by whoever ran
that model, or read from a frame column of that name.

The service (`serving.ranking.engine`), training (`training.lambdarank`) and the evaluation
(`training.evaluation.rankers`) all build a bundle's matrix here, so the columns, the float32
rounding and the training-only context constants (`inference_constants` in the manifest, e.g.
`position`) are applied in one place. Training fits on the observed context instead
(`frame_matrix(..., observed_context=True)`); at inference every candidate gets the constant.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import polars as pl

from featurizer.definitions import NAMES
from ranker.bundle import Bundle, BundleError
from ranker.user_tower import UserTower

_COLUMN = {name: k for k, name in enumerate(NAMES)}
# Scores a model of the bundle computes per candidate: never a featurizer feature, never a constant.
GIVEN: dict[str, str] = {
    "sequence_score": "the bundle's sequence model (ranker.sequence): its next-item score of the candidate after "
                      "the user's history, strictly before t",
}


class BundleInputs:
    """How a bundle's columns are filled: from the features of `featurizer.definitions.NAMES`, or a constant."""

    def __init__(self, feature_names: Sequence[str], constants: Mapping[str, float], tower: UserTower, source: str = "bundle"):
        names = list(feature_names)
        unknown = [n for n in names if n not in _COLUMN and n not in constants and n not in GIVEN]
        if unknown:
            raise BundleError(f"{source} needs features this version of semrank cannot compute: {unknown}")
        if not isinstance(tower, UserTower):
            raise TypeError(f"{source}: tower must be a ranker.user_tower.UserTower, got {type(tower).__name__}")
        self.feature_names = names
        self.constants = {n: float(v) for n, v in constants.items() if n in names}
        self.tower = tower
        self.uses_text = "interest_score" in names
        self.given = [n for n in names if n in GIVEN and n not in self.constants]  # passed to `matrix`
        self._given_cols = [names.index(n) for n in self.given]
        # Model column k takes feature column src[k]; a constant column takes its value.
        self._dst = np.array([k for k, n in enumerate(names) if n not in self.constants and n not in GIVEN],
                             dtype=np.int64)
        self._src = np.array([_COLUMN[names[k]] for k in self._dst], dtype=np.int64)
        self._const_cols = np.array([names.index(n) for n in self.constants], dtype=np.int64)
        # The usual layout: the features in NAMES order, then the constants; one strided copy, which
        # costs a tenth of the fancy-indexed one at 1000 candidates.
        self._runs = (slice(self._dst[0], self._dst[-1] + 1), slice(self._src[0], self._src[-1] + 1)) if (
            self._dst.size and _is_run(self._dst) and _is_run(self._src)) else None
        self._const_vals = np.array(list(self.constants.values()), dtype=np.float32)

    @classmethod
    def of(cls, bundle: Bundle) -> BundleInputs:
        return cls(bundle.feature_names, bundle.manifest.get("inference_constants", {}), bundle.tower,
                   source=f"bundle {bundle.version}")

    def matrix(self, features: np.ndarray, given: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """(n, len(feature_names)) float32 from (n, len(NAMES)) features in NAMES order; NaN stays missing.
        `given`: one array of n per name of `self.given` (a missing one is an error, not NaN)."""
        if features.ndim != 2 or features.shape[1] != len(NAMES):
            raise ValueError(f"expected (n, {len(NAMES)}) features in NAMES order, got {features.shape}")
        X = np.empty((features.shape[0], len(self.feature_names)), dtype=np.float32)
        if self._runs is not None:
            X[:, self._runs[0]] = features[:, self._runs[1]]
        elif self._dst.size:
            X[:, self._dst] = features[:, self._src]
        if self._const_cols.size:
            X[:, self._const_cols] = self._const_vals
        for name, col in zip(self.given, self._given_cols):
            if given is None or name not in given:
                raise ValueError(f"this bundle needs {name!r} ({GIVEN[name]}): pass it as given")
            X[:, col] = np.asarray(given[name], dtype=np.float64).reshape(features.shape[0])
        return X

    def frame_matrix(self, frame: pl.DataFrame, observed_context: bool = False) -> np.ndarray:
        """`matrix` of a frame with the NAMES columns (offline features) and a column per `given` name.
        With `observed_context` (training), the constant columns are read from the frame instead (e.g.
        the logged position)."""
        missing = [n for n in self.given if n not in frame.columns]
        if missing:
            raise ValueError(f"the frame lacks column(s) {missing} that this bundle takes as given ({GIVEN[missing[0]]})")
        X = self.matrix(frame.select(NAMES).to_numpy().astype(np.float64, copy=False),
                        {n: frame[n].to_numpy() for n in self.given})
        if observed_context and self._const_cols.size:
            observed = list(self.constants)
            X[:, self._const_cols] = frame.select(observed).to_numpy().astype(np.float32)
        return X

    @property
    def history_items(self) -> int:
        """The recent items the user side reads (the tower's)."""
        return self.tower.history_items


def _is_run(idx: np.ndarray) -> bool:
    """Consecutive ascending integers."""
    return bool((np.diff(idx) == 1).all())
