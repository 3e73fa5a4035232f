"""Per-candidate explanations: LightGBM feature contributions grouped into readable families.

LightGBM's `pred_contrib` gives, per row, one additive contribution per feature plus
the expected value (bias); they sum to the raw score. Summing the contributions of
each feature family (text, popularity, personal history, co-occurrence, price,
context) keeps that property: family contributions + bias == score.
"""

from __future__ import annotations

import numpy as np

from featurizer.definitions import FAMILIES, FAMILY
from ranker.bundle import Bundle

# Training-only context features (e.g. position) belong to the context family.
EXTRA_FAMILY = {"position": "context"}


def feature_families(feature_names: list[str]) -> list[str]:
    unknown = [n for n in feature_names if n not in FAMILY and n not in EXTRA_FAMILY]
    if unknown:
        raise ValueError(f"no family for feature(s) {unknown}; add them to featurizer.definitions")
    return [FAMILY.get(n) or EXTRA_FAMILY[n] for n in feature_names]


def family_matrix(feature_names: list[str]) -> np.ndarray:
    """(n_features, n_families) 0/1 matrix mapping each feature to its family."""
    fams = feature_families(feature_names)
    m = np.zeros((len(feature_names), len(FAMILIES)))
    for k, f in enumerate(fams):
        m[k, FAMILIES.index(f)] = 1.0
    return m


def explain(bundle: Bundle, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(contributions (n, len(FAMILIES)), bias (n,)) for a (n, n_features) matrix; they sum to the score."""
    if features.shape[0] == 0:
        return np.zeros((0, len(FAMILIES))), np.zeros(0)
    contrib = bundle.booster.predict(features, pred_contrib=True, num_threads=1)
    per_feature, bias = contrib[:, :-1], contrib[:, -1]
    return per_feature @ family_matrix(bundle.feature_names), bias
