"""The sequence model of a bundle: a SASRec-style causal transformer over a user's item sequence
(issue 31), its inputs and its score, in one definition that training, evaluation and (later)
serving share. `training.sequence.sasrec` trains it.

    model, meta = load(model_dir)                       # model.safetensors + sasrec.json (item ids in table order)
    scores = last_scores(model, histories)              # (len(histories), n_items): next-item scores after each

- **Inputs** (`left_padded`): a user's last `max_len` items, oldest first, as table rows (catalog
  item k is row k + 1; row 0 is padding), left-padded. An item's input vector is its id embedding
  plus, with text, a learned projection of its text vector: an item nobody interacted with still
  has a vector through its text. The same table scores the next item (tied input and output
  embeddings, as SASRec).
- **Model**: learned positions, `layers` pre-LayerNorm causal transformer blocks (GELU). Attention
  never reads a padding slot (a per-sequence mask), so a history's scores do not depend on the batch
  it is scored in.
- **Score** (`last_scores`): the last position's state against every item's vector; a ranker reads
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
import torch
from torch import nn

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "sasrec.json"
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


class SASRec(nn.Module):
    """Item k of the catalog is row k + 1 of the tables; row 0 is padding."""

    def __init__(self, n_items: int, cfg: SASRecConfig, text_vectors: np.ndarray | None = None):
        super().__init__()
        if cfg.text != (text_vectors is not None):
            raise ValueError("SASRecConfig.text needs text_vectors, and text_vectors need text=True")
        self.cfg, self.n_items = cfg, n_items
        self.item = nn.Embedding(n_items + 1, cfg.dim, padding_idx=0)
        self.pos = nn.Embedding(cfg.max_len, cfg.dim)
        if text_vectors is not None:
            if text_vectors.shape[0] != n_items:
                raise ValueError(f"text_vectors has {text_vectors.shape[0]} rows for {n_items} items")
            pad = np.zeros((1, text_vectors.shape[1]), dtype=np.float32)
            self.register_buffer("text", torch.from_numpy(np.concatenate([pad, text_vectors.astype(np.float32)])))
            self.text_proj = nn.Linear(text_vectors.shape[1], cfg.dim, bias=False)
        layer = nn.TransformerEncoderLayer(cfg.dim, cfg.heads, 4 * cfg.dim, cfg.dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)
        nn.init.normal_(self.item.weight, std=cfg.dim ** -0.5)
        with torch.no_grad():
            self.item.weight[0].zero_()

    def table(self) -> torch.Tensor:
        """(n_items + 1, dim): every item's vector, padding first."""
        w = self.item.weight
        if self.cfg.text:
            w = w + self.text_proj(self.text) * (torch.arange(w.shape[0], device=w.device) > 0)[:, None]
        return w

    def forward(self, seqs: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) table rows, left-padded with 0 -> (B, L, dim) states; position t has read items <= t."""
        table = self.table() if table is None else table
        b, length = seqs.shape
        pad = seqs == 0
        x = table[seqs] * math.sqrt(self.cfg.dim) + self.pos.weight[self.cfg.max_len - length:][None]
        x = self.drop(x).masked_fill(pad[..., None], 0.0)
        # A query reads earlier items and itself, never a padding slot other than itself (a padding
        # query then reads only itself: no row of the softmax is empty).
        causal = torch.ones(length, length, dtype=torch.bool, device=seqs.device).triu(1)
        eye = torch.eye(length, dtype=torch.bool, device=seqs.device)
        blocked = causal[None] | (pad[:, None, :] & ~eye[None])
        mask = blocked.repeat_interleave(self.cfg.heads, dim=0)
        return self.norm(self.blocks(x, mask=mask))


def left_padded(histories: Sequence[np.ndarray], max_len: int) -> torch.Tensor:
    """The last `max_len` items of each history as table rows (item + 1), left-padded with 0, to the
    longest of them."""
    tails = [np.asarray(h[-max_len:], dtype=np.int64) + 1 for h in histories]
    width = max(1, max((t.size for t in tails), default=1))
    out = np.zeros((len(tails), width), dtype=np.int64)
    for k, t in enumerate(tails):
        if t.size:
            out[k, width - t.size:] = t
    return torch.from_numpy(out)


@torch.no_grad()
def last_scores(model: SASRec, histories: Sequence[np.ndarray]) -> np.ndarray:
    """(len(histories), n_items) next-item scores after each history (eval mode)."""
    model.eval()
    table = model.table()
    return (_last(model, histories, table) @ table[1:].T).numpy()


@torch.no_grad()
def last_states(model: SASRec, histories: Sequence[np.ndarray]) -> np.ndarray:
    """(len(histories), dim) the state after each history (eval mode): `last_scores` is it against
    `item_vectors`. For scoring a few items per history, or the same history twice."""
    model.eval()
    return _last(model, histories, model.table()).numpy()


@torch.no_grad()
def item_vectors(model: SASRec) -> np.ndarray:
    """(n_items, dim): the vector each catalog item is scored by."""
    return model.table()[1:].numpy()


def _last(model: SASRec, histories: Sequence[np.ndarray], table: torch.Tensor) -> torch.Tensor:
    return model(left_padded(histories, model.cfg.max_len), table)[:, -1]


def load(model_dir: str | Path) -> tuple[SASRec, dict]:
    """The model (eval mode) and its sasrec.json (with `item_ids`)."""
    from safetensors.torch import load_file

    d = Path(model_dir)
    meta = json.loads((d / CONFIG_FILE).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{d / CONFIG_FILE}: format {meta.get('format')}, this semrank reads {FORMAT}")
    cfg = SASRecConfig(**meta["config"])
    weights = load_file(str(d / MODEL_FILE))
    text = weights["text"][1:].numpy() if cfg.text else None
    model = SASRec(meta["n_items"], cfg, text)
    model.load_state_dict(weights)
    model.eval()
    return model, meta


class SequenceState:
    """The sequence model's forward pass in numpy, from its weights (no torch): what a server runs per
    user (`user_vector`, cached per user and history) and per candidate (`scores`). Equal to
    `last_scores` within float32 rounding (tests/ranker/test_sequence.py).

    `weights`: the model's tensors by name (`model.safetensors` read with `safetensors.numpy`)."""

    def __init__(self, cfg: SASRecConfig, weights: dict[str, np.ndarray]):
        self.cfg = cfg
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

    @classmethod
    def load(cls, model_dir: str | Path) -> tuple[SequenceState, dict]:
        """From a model directory (`sasrec.json` + `model.safetensors`), without torch."""
        from safetensors.numpy import load_file

        d = Path(model_dir)
        meta = json.loads((d / CONFIG_FILE).read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{d / CONFIG_FILE}: format {meta.get('format')}, this semrank reads {FORMAT}")
        return cls(SASRecConfig(**meta["config"]), load_file(str(d / MODEL_FILE))), meta

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
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + np.float32(eps)) * weight + bias


def _gelu(x: np.ndarray) -> np.ndarray:
    """The exact GELU (erf), as torch's default."""
    from scipy.special import erf

    return (0.5 * x * (1.0 + erf(x / np.float32(math.sqrt(2.0))))).astype(np.float32)
