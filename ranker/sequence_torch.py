"""The sequence model in torch (`ranker.sequence` holds its configuration, files and the numpy
forward pass a server runs, without torch): the module training and evaluation use.

    model, meta = load(model_dir)                       # model.safetensors + sasrec.json (item ids in table order)
    scores = last_scores(model, histories)              # (len(histories), n_items): next-item scores after each

See `ranker.sequence` for the inputs, the model and the score.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ranker.sequence import MODEL_FILE, SASRecConfig, read_meta


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
    meta = read_meta(d)
    cfg = SASRecConfig(**meta["config"])
    weights = load_file(str(d / MODEL_FILE))
    text = weights["text"][1:].numpy() if cfg.text else None
    model = SASRec(meta["n_items"], cfg, text)
    model.load_state_dict(weights)
    model.eval()
    return model, meta
