"""The compiled trees (`ranker.compiled_trees`): the same scores as LightGBM, and LightGBM where
there is no compiler."""

import logging
import sys

import numpy as np
import pytest

import ranker.compiled_trees as compiled_trees
from ranker.bundle import load_bundle
from tests.serving.ranking.ranking_kit import FEATURES, write_bundle


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("compiled") / "bundle"
    write_bundle(path, seed=3)
    return path


def rows(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, len(FEATURES))).astype(np.float32)
    X[rng.random(X.shape) < 0.15] = np.nan  # missing values take LightGBM's default branches
    return X


def test_compiled_scores_equal_lightgbms(bundle_dir):
    bundle = load_bundle(bundle_dir)
    assert bundle.compiled is not None, "lleaves is a dependency: the bundle should be compiled here"
    for n in (1, 100, 1000):
        X = rows(n, seed=n)
        np.testing.assert_allclose(bundle.score(X), bundle.booster.predict(X, num_threads=1), rtol=1e-6, atol=1e-9)


def test_one_compilation_per_model_text(bundle_dir):
    a, b = load_bundle(bundle_dir), load_bundle(bundle_dir)
    assert a.compiled._model is b.compiled._model and a.compiled.digest == b.compiled.digest


def test_without_a_compiler_the_bundle_scores_with_lightgbm(bundle_dir, monkeypatch, caplog):
    """Fault injection: no lleaves in this process (as where llvmlite cannot be installed)."""
    compiled = load_bundle(bundle_dir)
    monkeypatch.setitem(sys.modules, "lleaves", None)  # `import lleaves` raises ImportError
    monkeypatch.setattr(compiled_trees, "_models", type(compiled_trees._models)())
    monkeypatch.setattr(compiled_trees, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="ranker.compiled_trees"):
        fallback = load_bundle(bundle_dir)
    assert fallback.compiled is None and "scoring with LightGBM" in caplog.text
    X = rows(300, seed=7)
    np.testing.assert_allclose(fallback.score(X), compiled.score(X), rtol=1e-6, atol=1e-9)


def test_loading_without_compiling(bundle_dir):
    assert load_bundle(bundle_dir, compile_trees=False).compiled is None
