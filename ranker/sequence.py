"""The sequence model of a bundle: a SASRec-style causal transformer over a user's item sequence
(issue 31), its inputs and its score, in one definition that training, evaluation and serving
share. `training.sequence.sasrec` trains it. The torch model is in `ranker.sequence_torch` (training
and evaluation); this module needs numpy only, as a server does.

    state, meta = SequenceState.load(model_dir)         # model.safetensors + sasrec.json (item ids in table order)
    user = state.user_vector(rows)                      # after a history of catalog indices, oldest first
    scores = state.scores(user, rows)                   # of candidates (catalog indices)
    model, meta = sequence_torch.load(model_dir)        # the torch model: last_scores, last_states, item_vectors

- **Inputs** (`sequence_torch.left_padded`): a user's last `max_len` items, oldest first, as table rows (catalog
  item k is row k + 1; row 0 is padding), left-padded. An item's input vector is its id embedding
  plus, with text, a learned projection of its text vector: an item nobody interacted with still
  has a vector through its text. The same table scores the next item (tied input and output
  embeddings, as SASRec).
- **Model**: learned positions, `layers` pre-LayerNorm causal transformer blocks (GELU). Attention
  never reads a padding slot (a per-sequence mask), so a history's scores do not depend on the batch
  it is scored in.
- **Score** (`sequence_torch.last_scores`, `SequenceState.scores`): the last position's state against every item's vector; a ranker reads
  it per candidate as `sequence_score` (`ranker.feature_matrix.GIVEN`).
- **Files**: `model.safetensors` (the weights, text vectors included) and `sasrec.json` (the
  configuration, the catalog's item ids in the table's order, how it was trained). Safe formats only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "sasrec.json"
BUNDLE_DIR = "sequence"  # a bundle's copy of its sequence model (`semrank train ranker --sequence`)
FORMAT = 1


@dataclass(frozen=True)
class SASRecConfig:
    max_len: int = 50  # items of history the model reads (the most recent)
    dim: int = 64
    layers: int = 2
    heads: int = 2
    dropout: float = 0.2
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 128
    epochs: int = 200  # at most; early stopping usually ends sooner
    max_minutes: float = 60.0  # wall-time cap (issue 31: 60 minutes on 2 cores per dataset)
    eval_every: int = 5  # epochs between validations
    patience: int = 4  # validations without a better NDCG@10 before stopping
    valid_users: int = 5000  # seeded sample of users for validation (all if fewer)
    seed: int = 0
    text: bool = False  # item text vectors as an input (needs `text_vectors` at training)
    # Items of each sequence before its validation item left out of training (0: train on seq[:-2]).
    # 1 trains on seq[:-3], so a ranker can take seq[-3] as its training target with this model's
    # score as a feature that never saw it (`sequence_score`, training.lambdarank.leave_one_out).
    hold_out: int = 0

    def __post_init__(self):
        if self.dim % self.heads:
            raise ValueError(f"dim={self.dim} must be a multiple of heads={self.heads}")
        for name in ("max_len", "dim", "layers", "heads", "batch_size", "epochs", "eval_every", "patience", "valid_users"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.hold_out < 0:
            raise ValueError(f"hold_out={self.hold_out} must be >= 0")
        if not 0 <= self.dropout < 1 or self.lr <= 0 or self.max_minutes <= 0:
            raise ValueError(f"need 0 <= dropout < 1, lr > 0 and max_minutes > 0, got {self.dropout}, {self.lr}, "
                             f"{self.max_minutes}")


def read_meta(model_dir: Path) -> dict:
    """A model directory's sasrec.json (configuration, `item_ids`, how it was trained)."""
    meta = json.loads((model_dir / CONFIG_FILE).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{model_dir / CONFIG_FILE}: format {meta.get('format')}, this semrank reads {FORMAT}")
    return meta


class SequenceState:
    """The sequence model's forward pass in numpy, from its weights (no torch): what a server runs per
    user (`user_vector`, cached per user and history) and per candidate (`scores`). Equal to
    `last_scores` within float32 rounding (tests/ranker/test_sequence.py).

    `weights`: the model's tensors by name (`model.safetensors` read with `safetensors.numpy`);
    `item_ids`: the catalog of its table, in order (`sasrec.json`'s), which `index` maps back."""

    def __init__(self, cfg: SASRecConfig, weights: dict[str, np.ndarray], item_ids: Sequence[str] = ()):
        self.cfg = cfg
        self.item_ids = list(item_ids)
        self.index = {i: k for k, i in enumerate(self.item_ids)}  # item id -> catalog index (table row - 1)
        w = {k: np.asarray(v, dtype=np.float32) for k, v in weights.items()}
        table = w["item.weight"].copy()
        if cfg.text:
            table[1:] += w["text"][1:] @ w["text_proj.weight"].T
        self.table = table  # (n_items + 1, dim): row k + 1 is catalog item k
        self.pos = w["pos.weight"]
        self.layers = []
        for k in range(cfg.layers):
            p = f"blocks.layers.{k}."
            self.layers.append({name: w[p + name] for name in (
                "self_attn.in_proj_weight", "self_attn.in_proj_bias", "self_attn.out_proj.weight",
                "self_attn.out_proj.bias", "linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias",
                "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias")})
        self.norm = (w["norm.weight"], w["norm.bias"])
        if self.item_ids and len(self.item_ids) != len(table) - 1:
            raise ValueError(f"{len(self.item_ids)} item ids for a table of {len(table) - 1} items")

    @classmethod
    def load(cls, model_dir: str | Path) -> tuple[SequenceState, dict]:
        """From a model directory (`sasrec.json` + `model.safetensors`), without torch."""
        from safetensors.numpy import load_file

        d = Path(model_dir)
        meta = read_meta(d)
        return cls(SASRecConfig(**meta["config"]), load_file(str(d / MODEL_FILE)), meta["item_ids"]), meta

    def user_vector(self, history: np.ndarray) -> np.ndarray | None:
        """(dim,) state after `history` (catalog item indices, oldest first; the last `max_len` are
        read); None for an empty history."""
        rows = np.asarray(history, dtype=np.int64)[-self.cfg.max_len:] + 1
        n = rows.size
        if n == 0:
            return None
        d, heads = self.cfg.dim, self.cfg.heads
        x = self.table[rows] * np.float32(math.sqrt(d)) + self.pos[self.cfg.max_len - n:]
        causal = np.triu(np.ones((n, n), dtype=bool), 1)
        for k, p in enumerate(self.layers):
            last = k == len(self.layers) - 1  # the last block: only the last position's output is read
            h = _layer_norm(x, p["norm1.weight"], p["norm1.bias"])
            qkv = h @ p["self_attn.in_proj_weight"].T + p["self_attn.in_proj_bias"]
            q, kk, v = (qkv[:, j * d:(j + 1) * d].reshape(n, heads, d // heads).transpose(1, 0, 2) for j in range(3))
            if last:
                q = q[:, -1:]
            att = q @ kk.transpose(0, 2, 1) / np.float32(math.sqrt(d // heads))
            att = np.where(causal[-1:] if last else causal, -np.inf, att)
            att = np.exp(att - att.max(axis=-1, keepdims=True))
            att /= att.sum(axis=-1, keepdims=True)
            o = (att @ v).transpose(1, 0, 2).reshape(-1, d)
            x = (x[-1:] if last else x) + o @ p["self_attn.out_proj.weight"].T + p["self_attn.out_proj.bias"]
            h = _layer_norm(x, p["norm2.weight"], p["norm2.bias"])
            h = _gelu(h @ p["linear1.weight"].T + p["linear1.bias"])
            x = x + h @ p["linear2.weight"].T + p["linear2.bias"]
        return _layer_norm(x[-1], *self.norm)

    def scores(self, user: np.ndarray, items: np.ndarray) -> np.ndarray:
        """The score of each catalog item index in `items` after the history `user` came from."""
        # einsum, never BLAS gemv: gemv wakes OpenBLAS's other threads per call (serving.ranking.engine)
        return np.einsum("id,d->i", self.table[np.asarray(items, dtype=np.int64) + 1], user)


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    # sums, not ndarray.mean, whose Python wrapper cost more than the sums (a cache miss runs 5 of these)
    scale = np.float32(1.0 / x.shape[-1])
    centred = x - np.add.reduce(x, axis=-1, keepdims=True) * scale
    var = np.add.reduce(centred * centred, axis=-1, keepdims=True) * scale
    return centred / np.sqrt(var + np.float32(eps)) * weight + bias


def _gelu(x: np.ndarray) -> np.ndarray:
    """The exact GELU (erf), as torch's default."""
    from scipy.special import erf

    return (0.5 * x * (1.0 + erf(x / np.float32(math.sqrt(2.0))))).astype(np.float32)
