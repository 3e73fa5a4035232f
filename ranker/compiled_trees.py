"""A bundle's LightGBM trees compiled to native code, for `Bundle.score`.

    trees = compile_trees(model_path, model_text)   # None: no compiler here, or it failed (logged)
    scores = trees.predict(X)                        # what booster.predict(X) gives, to ~1e-15

lleaves (LLVM, through llvmlite) compiles the model's text file into one function per forest. On
the bench bundle (87 trees, 51 features; 2 cores) LightGBM's own `predict` took 0.167 ms for 100
rows and 3.40 ms for 1000, the compiled form 0.019 ms and 0.190 ms: 8.8x and 17.9x, with scores
equal to 1e-15 (missing values included); compiling took 2.1 s. docs/serving.md has the numbers.

Compiled once per model text (by its sha256, kept in this process: A/B arms and reloads of one
model share it) when the bundle loads. Nothing compiled is written to disk, so a bundle stays
data only (safetensors, LightGBM text, JSON). Where llvmlite is missing or compiling fails, the
bundle scores with LightGBM, which gives the same scores, and the log says why once.
Explanations (`pred_contrib`) always come from LightGBM.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

MAX_MODELS = 8  # compiled models kept in this process (least recently used go first)
_models: OrderedDict[str, Any] = OrderedDict()
_lock = threading.Lock()
_warned: set[str] = set()


class CompiledTrees:
    """A compiled model; `predict` as LightGBM's, one thread."""

    def __init__(self, model: Any, digest: str):
        self._model, self.digest = model, digest

    def predict(self, features: np.ndarray) -> np.ndarray:
        return self._model.predict(np.ascontiguousarray(features, dtype=np.float64), n_jobs=1)


def compile_trees(model_path: str | Path, model_text: str) -> CompiledTrees | None:
    """The compiled form of the LightGBM text model at `model_path` (whose text is `model_text`), or
    None when it cannot be had here (then score with LightGBM)."""
    digest = hashlib.sha256(model_text.encode()).hexdigest()
    with _lock:
        model = _models.get(digest)
        if model is not None:
            _models.move_to_end(digest)
            return CompiledTrees(model, digest)
    try:
        import lleaves

        model = lleaves.Model(model_file=str(model_path))
        model.compile()
    except Exception as e:  # noqa: BLE001 - no llvmlite, an unsupported model or CPU: LightGBM scores it
        why = f"{type(e).__name__}: {str(e)[:200]}"
        if why not in _warned:
            _warned.add(why)
            log.warning("LightGBM trees not compiled (%s); scoring with LightGBM, which gives the same scores", why)
        return None
    with _lock:
        _models[digest] = model
        while len(_models) > MAX_MODELS:
            _models.popitem(last=False)
    return CompiledTrees(model, digest)
