"""The user tower: the user side of the interest score, defined once.

    tower = UserTower.pooled(history_items=10, decay=0.5)     # the default of new bundles
    tower = UserTower.text(history_items=5)                   # the encoder over the history text
    users = tower.pool(vectors, mask)                         # pooled: (n, k, d), (n, k) -> (n, d)
    users = tower.pool_rows(histories, item_vectors, has)     # the same from rows of an item table
    text = tower.user_text(titles_most_recent_first)          # text: what the encoder embeds
    users = user_vectors(tower, histories, item_vectors, titles, encode)   # either kind, in batch (training)

Two kinds, one bundle setting (`manifest.json` "user_tower"; `user_tower.safetensors` holds the
pooled tower's weights):

- **pooled**: u = normalize(sum_i w_i e_i) over the item vectors e_i of the user's last
  `history_items` distinct engaged items, most recent first (i = 0), with one learned weight per
  position (`position_weights`, initialised at decay^i). The vectors are the item tower's, which
  the service already holds for every item it knows, so the user side needs no encoder call: a
  gather of k rows and a weighted sum, about 20 us. A history item without a vector (an id never
  upserted, a text not yet re-embedded) is left out; the others keep their weights (the
  normalisation makes a rescale moot). A user with no item vector gets a NaN row, which gives a
  NaN score (missing for LightGBM), as a user without history always has.
- **text**: the encoder over the titles of the last `history_items` items (`history_text`), the
  tower of bundles made before this one. It costs one encoder call after every event of the user
  (the history text changes): kept as an option where it measures better.

Every place that builds a user vector goes through this class: the service
(`serving.ranking.engine`), ranker training (impression lists and leave-one-out), hard negatives,
the evaluation, batch-scoring prefetch, and the encoder's fine-tuning, which trains the item tower
through `pool_torch` (the same arithmetic, tests/ranker/test_user_tower.py checks it at rtol 1e-6).
The sums run in float64 and the result is rounded to float32 once, so that numpy and torch agree.

A manifest without "user_tower" (bundles from before it) reads as the text tower with the
encoder's `history_items`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from featurizer.definitions import FeatureParams
from featurizer.text import history_text
from ranker.errors import BundleError

KINDS = ("pooled", "text")
WEIGHTS_FILE = "user_tower.safetensors"
WEIGHTS_TENSOR = "position_weights"
# The online feature state keeps this many recent items per user: the pooled tower's history fits in it.
MAX_POOLED_HISTORY = FeatureParams().history_items
DEFAULT_DECAY = 0.5
DEFAULT_POOLED_HISTORY = 10


@dataclass(frozen=True, eq=False)
class UserTower:
    kind: str
    history_items: int
    position_weights: np.ndarray | None = None  # pooled: (history_items,) float32, most recent first

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise BundleError(f"user tower kind must be one of {KINDS}, got {self.kind!r}")
        if self.history_items < 1:
            raise BundleError(f"user tower: history_items must be >= 1, got {self.history_items}")
        if self.kind == "pooled":
            if self.history_items > MAX_POOLED_HISTORY:
                raise BundleError(f"pooled user tower: history_items {self.history_items} is more than the "
                                  f"{MAX_POOLED_HISTORY} recent items the online state keeps per user")
            w = self.position_weights
            if w is None or np.shape(w) != (self.history_items,) or not np.isfinite(w).all() or (np.asarray(w) < 0).any():
                raise BundleError(f"pooled user tower: position_weights must be {self.history_items} finite, "
                                  f"non-negative numbers, got {None if w is None else np.asarray(w).tolist()}")
            object.__setattr__(self, "position_weights", np.asarray(w, dtype=np.float32).copy())
            self.position_weights.setflags(write=False)

    @classmethod
    def pooled(cls, history_items: int = DEFAULT_POOLED_HISTORY, decay: float = DEFAULT_DECAY) -> UserTower:
        """Recency-weighted mean: weight decay^i for the i-th most recent item."""
        if not 0.0 < decay <= 1.0:
            raise BundleError(f"pooled user tower: decay must be in (0, 1], got {decay}")
        return cls("pooled", history_items, decay ** np.arange(history_items, dtype=np.float64))

    @classmethod
    def text(cls, history_items: int = 5) -> UserTower:
        return cls("text", history_items)

    @property
    def uses_encoder(self) -> bool:
        """Whether the user side calls the encoder (after every event of the user)."""
        return self.kind == "text"

    @cached_property
    def key(self) -> str:
        """What a user vector depends on besides the history and the item vectors: kind, size and
        weights. Caches of user vectors are keyed by it, so two bundles never share an entry.
        Computed once (every Rank asks)."""
        h = hashlib.sha256(f"{self.kind}/{self.history_items}/".encode())
        if self.position_weights is not None:
            h.update(self.position_weights.tobytes())
        return f"{self.kind}{self.history_items}-{h.hexdigest()[:12]}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UserTower) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)

    def describe(self) -> str:
        if self.kind == "text":
            return f"text tower: the encoder over the titles of the last {self.history_items} items"
        w = ", ".join(f"{x:.3g}" for x in self.position_weights)
        return f"pooled tower: weighted mean of the last {self.history_items} item vectors (weights {w})"

    # ------------------------------------------------------------------ the text tower

    def user_text(self, titles_most_recent_first: Sequence[str]) -> str:
        """The text tower's user text: its last `history_items` titles."""
        return history_text(titles_most_recent_first, self.history_items)

    # ------------------------------------------------------------------ the pooled tower

    def pool(self, vectors: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """(n, d) float32 unit rows from (n, k, d) item vectors (k <= history_items, most recent
        first) and a (n, k) mask of the ones present; NaN rows where none is."""
        self._require("pooled")
        v = np.asarray(vectors)
        if v.ndim != 3 or v.shape[1] > self.history_items:
            raise ValueError(f"pool needs (n, k <= {self.history_items}, d) vectors, got {v.shape}")
        n, k, d = v.shape
        m = np.ones((n, k), dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
        w = np.where(m, self.position_weights[:k].astype(np.float64)[None, :], 0.0)
        v = np.where(m[:, :, None], v, 0.0)  # a masked row may hold NaN
        s = np.einsum("nk,nkd->nd", w, v.astype(np.float64, copy=False))
        norm = np.sqrt(np.einsum("nd,nd->n", s, s))[:, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            out = np.where(norm > 0, s / norm, np.nan)
        return out.astype(np.float32)

    def pool_rows(self, histories: Sequence[Sequence[int]], item_vectors: Any, has: np.ndarray | None = None) -> np.ndarray:
        """`pool` of each history given as rows of `item_vectors` ((n_items, d), an array or the
        service's RowTable), most recent first; rows < 0, past `history_items`, or without a vector
        (`has[row]` False, or a NaN row) are left out."""
        self._require("pooled")
        n, k = len(histories), self.history_items
        rows = np.full((n, k), -1, dtype=np.int64)
        for r, h in enumerate(histories):
            h = np.asarray(h, dtype=np.int64)[:k]
            rows[r, : h.size] = h
        ok = rows >= 0
        if has is not None:
            ok[ok] = np.asarray(has)[rows[ok]]
        d = item_vectors.shape[1]
        vectors = np.zeros((n, k, d), dtype=np.float32)
        if ok.any():
            vectors[ok] = item_vectors[rows[ok]]
            ok[ok] = np.isfinite(vectors[ok]).all(axis=1)
        return self.pool(vectors, ok)

    def _require(self, kind: str) -> None:
        if self.kind != kind:
            raise ValueError(f"this is a {self.kind} user tower; the call needs a {kind} one")

    # ------------------------------------------------------------------ the bundle

    def manifest_entry(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"kind": self.kind, "history_items": self.history_items}
        if self.kind == "pooled":
            entry |= {"weights_file": WEIGHTS_FILE, "position_weights": [float(x) for x in self.position_weights]}
        return entry

    def save(self, bundle_dir: str | Path) -> dict[str, Any]:
        """Write the weights (pooled) into the bundle; returns the manifest entry."""
        if self.kind == "pooled":
            from safetensors.numpy import save_file

            save_file({WEIGHTS_TENSOR: self.position_weights.copy()}, str(Path(bundle_dir) / WEIGHTS_FILE),
                      metadata={"kind": self.kind, "history_items": str(self.history_items)})
        return self.manifest_entry()

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any], bundle_dir: str | Path) -> UserTower:
        """The bundle's tower; BundleError naming the file and the problem. The weights come from the
        safetensors file (the manifest's copy is for people, and must agree)."""
        entry = manifest.get("user_tower")
        if entry is None:  # a bundle from before the pooled tower
            return cls.text(int(manifest.get("encoder", {}).get("history_items", 5)))
        where = Path(bundle_dir) / "manifest.json"
        if not isinstance(entry, dict) or entry.get("kind") not in KINDS or not isinstance(entry.get("history_items"), int):
            raise BundleError(f"{where}: 'user_tower' must be {{\"kind\": one of {KINDS}, \"history_items\": int, ...}}, "
                              f"got {json.dumps(entry)[:200]}")
        if entry["kind"] == "text":
            return cls.text(entry["history_items"])
        path = Path(bundle_dir) / entry.get("weights_file", WEIGHTS_FILE)
        if path.resolve().parent != Path(bundle_dir).resolve():
            raise BundleError(f"{where}: user_tower.weights_file must name a file in the bundle directory")
        if not path.is_file():
            raise BundleError(f"{path}: missing; a pooled user tower keeps its weights there")
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise BundleError(f"{path}: not a safetensors file ({e})") from e
        if WEIGHTS_TENSOR not in tensors:
            raise BundleError(f"{path}: no '{WEIGHTS_TENSOR}' tensor")
        try:
            tower = cls("pooled", entry["history_items"], tensors[WEIGHTS_TENSOR])
        except BundleError as e:
            raise BundleError(f"{path}: {e}") from e
        listed = entry.get("position_weights")
        if listed is not None and not np.allclose(listed, tower.position_weights, rtol=1e-6):
            raise BundleError(f"{where}: user_tower.position_weights {listed} differ from {path.name}")
        return tower


def user_vectors(tower: UserTower, histories: Sequence[Sequence[int]], item_vectors: Any,
                 titles: Sequence[str | None] | None = None,
                 encode_texts: Callable[[list[str]], np.ndarray] | None = None) -> np.ndarray:
    """(len(histories), d) float32 user vectors by `tower`, NaN rows where there is none. Each
    history is rows of `item_vectors` (and `titles`), most recent first; -1 for an item outside
    the catalog. The text tower encodes each distinct history text once through `encode_texts`
    (texts -> unit rows); the pooled tower needs neither it nor the titles."""
    if tower.kind == "pooled":
        return tower.pool_rows(histories, item_vectors)
    if titles is None or encode_texts is None:
        raise ValueError("a text user tower needs the item titles and an encoder")
    texts = [tower.user_text([t for t in (titles[i] for i in h[: tower.history_items] if i >= 0) if t]) for h in histories]
    out = np.full((len(histories), item_vectors.shape[1]), np.nan, dtype=np.float32)
    distinct = sorted({t for t in texts if t})
    if distinct:
        emb = np.asarray(encode_texts(distinct), dtype=np.float32)
        row = {t: k for k, t in enumerate(distinct)}
        for k, t in enumerate(texts):
            if t:
                out[k] = emb[row[t]]
    return out


def pool_torch(vectors, mask, weights):
    """`UserTower.pool` in torch, differentiable in the vectors and the weights (the encoder's
    fine-tuning): (n, k, d) vectors, (n, k) bool mask, (>= k,) weights -> (n, d) float32 unit rows
    (a row with no item stays zero instead of NaN: the loss skips it)."""
    import torch

    k = vectors.shape[1]
    w = torch.where(mask, weights[:k].to(torch.float64)[None, :], torch.zeros((), dtype=torch.float64))
    v = torch.where(mask[:, :, None], vectors.to(torch.float64), torch.zeros((), dtype=torch.float64))
    s = torch.einsum("nk,nkd->nd", w, v)
    norm = torch.sqrt(torch.einsum("nd,nd->n", s, s)).clamp_min(1e-30)[:, None]
    return (s / norm).to(torch.float32)
