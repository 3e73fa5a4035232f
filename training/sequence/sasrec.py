"""A SASRec-style sequence model trained with full-softmax cross-entropy (SASRec-CE), over item ids
and, optionally, the items' text vectors (issue 31 item 1).

    model, summary = train_sasrec(split, SASRecConfig(), out_dir)   # writes OUT/sasrec.json, model.safetensors
    scorer = SASRecScorer.load(out_dir, split)                       # a CatalogScorer for `semrank eval`

- **Inputs**: a user's last `max_len` items, oldest first, left-padded. An item's input vector is its
  id embedding plus, with text, a learned projection of its text vector (the fine-tuned encoder's
  item embedding): an item nobody interacted with still has a vector through its text. The same
  table scores the next item (tied input and output embeddings, as SASRec).
- **Model**: learned positions, `layers` pre-LayerNorm causal transformer blocks (GELU). Attention
  never reads a padding slot (a per-sequence mask), so a history's scores do not depend on the batch
  it is scored in.
- **Loss**: at every position of every training sequence, cross-entropy of the next item over the
  whole catalog (full softmax: what made SASRec strong in the recent replications, against the
  original's one sampled negative).
- **Data** (leave-one-out, `training.data.loo.LooSplit`, the SASRec protocol): training sequences end
  before the validation item (`seq[:-2]`, plus the users too short to evaluate); validation ranks
  the validation item after `seq[:-2]` over the full catalog, history masked (NDCG@10 on a seeded
  sample of users) every `eval_every` epochs, and the best epoch's weights are kept (patience
  `patience` evaluations); the test then scores `seq[:-1]` with those weights, as `semrank eval` does.
- **Files**: `model.safetensors` (the weights, text vectors included), `sasrec.json` (the
  configuration, the catalog's item ids in the table's order, the validation curve) and
  `sasrec_curves.png` (that curve).

Progress: a tqdm bar per epoch; the loss and the validation metrics go to TensorBoard (and MLflow)
through `training.tracking` when a tracked run is open (`semrank train sequence`).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training import tracking

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "sasrec.json"
CURVES_PNG = "sasrec_curves.png"
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

    def __post_init__(self):
        if self.dim % self.heads:
            raise ValueError(f"dim={self.dim} must be a multiple of heads={self.heads}")
        for name in ("max_len", "dim", "layers", "heads", "batch_size", "epochs", "eval_every", "patience", "valid_users"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
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
    seqs = left_padded(histories, model.cfg.max_len)
    h = model(seqs, table)[:, -1]
    return (h @ table[1:].T).numpy()


def _batches(seqs: list[np.ndarray], cfg: SASRecConfig, rng: np.random.Generator):
    """Shuffled training batches: (input table rows, next-item indices (-100 on padding)), each (B, L)."""
    order = rng.permutation(len(seqs))
    for start in range(0, len(order), cfg.batch_size):
        chunk = [seqs[k][-(cfg.max_len + 1):] for k in order[start:start + cfg.batch_size]]
        inputs = left_padded([c[:-1] for c in chunk], cfg.max_len)
        targets = torch.full_like(inputs, -100)
        for k, c in enumerate(chunk):
            n = c.size - 1
            targets[k, inputs.shape[1] - n:] = torch.from_numpy(np.asarray(c[1:], dtype=np.int64))
        yield inputs, targets


def validate(model: SASRec, histories: list[np.ndarray], targets: np.ndarray, batch: int = 512) -> dict[str, float]:
    """Full-ranking metrics of `targets` after `histories` (history items masked), as `semrank eval`."""
    from training.evaluation.protocol import full_ranks, rank_metrics

    ranks = np.concatenate([full_ranks(last_scores(model, histories[s:s + batch]), targets[s:s + batch],
                                       histories[s:s + batch]) for s in range(0, len(histories), batch)])
    return {k: float(v.mean()) for k, v in rank_metrics(ranks).items()}


def train_sasrec(split, cfg: SASRecConfig, out_dir: str | Path | None = None,
                 text_vectors: np.ndarray | None = None, progress: bool = True) -> tuple[SASRec, dict]:
    """Train on `split` (a LooSplit) as the module docstring says; write the model to `out_dir` when
    given. Returns the best model (eval mode) and the summary written to sasrec.json."""
    from tqdm import tqdm

    from training.evaluation.protocol import sample_users

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    n_items = len(split.item_ids)
    train = [s[:-2] for s in split.sequences] + list(split.train_only)
    train = [s for s in train if s.size >= 2]  # a sequence of one item has no next item
    if not train:
        raise ValueError("no training sequence has two items")
    users = sample_users(len(split.users), cfg.valid_users, cfg.seed)
    v_hist = [split.history(int(u), "valid") for u in users]
    v_target = np.array([split.target(int(u), "valid") for u in users], dtype=np.int64)
    model = SASRec(n_items, cfg, text_vectors)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    curve: list[dict] = []
    best, best_state, waited = -1.0, None, 0
    t0 = time.monotonic()
    log.info("SASRec-CE: %d training sequences, %d items, %d validation users", len(train), n_items, len(users))
    stopped = "epochs"
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        losses = []
        n_batches = -(-len(train) // cfg.batch_size)
        for inputs, targets in tqdm(_batches(train, cfg, rng), total=n_batches, desc=f"sasrec epoch {epoch}",
                                    unit="batch", disable=not progress, leave=False):
            keep = targets != -100
            table = model.table()
            h = model(inputs, table)[keep]
            loss = F.cross_entropy(h @ table[1:].T, targets[keep])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        tracking.scalar("train/loss", float(np.mean(losses)), epoch)
        out_of_time = (time.monotonic() - t0) / 60 > cfg.max_minutes
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs or out_of_time:
            m = validate(model, v_hist, v_target)
            curve.append({"epoch": epoch, "loss": float(np.mean(losses)), "seconds": time.monotonic() - t0, **m})
            tracking.scalars("valid", m, epoch)
            log.info("epoch %d: loss %.4f, valid NDCG@10 %.4f, HR@10 %.4f (%.0f s)", epoch, np.mean(losses),
                     m["ndcg@10"], m["hr@10"], time.monotonic() - t0)
            if m["ndcg@10"] > best:
                best, best_state, waited = m["ndcg@10"], copy.deepcopy(model.state_dict()), 0
            else:
                waited += 1
                if waited >= cfg.patience:
                    stopped = "patience"
                    break
        if out_of_time:
            stopped = "max_minutes"
            break
    model.load_state_dict(best_state)
    model.eval()
    summary = {"format": FORMAT, "config": asdict(cfg), "n_items": n_items, "train_sequences": len(train),
               "valid_users": len(users), "best_valid_ndcg@10": best, "stopped_by": stopped,
               "train_seconds": time.monotonic() - t0, "curve": curve}
    if out_dir is not None:
        save(model, split.item_ids, summary, out_dir)
    return model, summary


def save(model: SASRec, item_ids: Sequence[str], summary: dict, out_dir: str | Path) -> Path:
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / MODEL_FILE))
    (out / CONFIG_FILE).write_text(json.dumps({**summary, "item_ids": list(item_ids)}, indent=1))
    if summary["curve"]:
        plot_curve(summary["curve"], out / CURVES_PNG)
    return out


def plot_curve(curve: list[dict], path: Path) -> Path:
    """The training loss and the validation NDCG@10 / HR@10 by epoch."""
    from training.figures import pyplot, save_figure

    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    epochs = [c["epoch"] for c in curve]
    a.plot(epochs, [c["loss"] for c in curve], marker="o")
    a.set(xlabel="epoch", ylabel="training loss (cross-entropy)")
    for key in ("ndcg@10", "hr@10"):
        b.plot(epochs, [c[key] for c in curve], marker="o", label=key)
    b.set(xlabel="epoch", ylabel="validation, full ranking")
    b.legend()
    return save_figure(fig, path)


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


class SASRecScorer:
    """A trained model as an evaluated model (`training.evaluation.models.CatalogScorer`)."""

    def __init__(self, name: str, model: SASRec, description: str = ""):
        self.name, self.model = name, model
        kind = "ids and item text" if model.cfg.text else "ids only"
        self.description = description or (
            f"{name}: SASRec-CE over the last {model.cfg.max_len} items ({kind}; {model.cfg.layers} blocks, "
            f"dim {model.cfg.dim}), full-softmax cross-entropy, trained on the sequences before each validation item")

    @classmethod
    def load(cls, name: str, model_dir: str | Path, item_ids: Sequence[str]) -> SASRecScorer:
        model, meta = load(model_dir)
        if list(meta["item_ids"]) != list(item_ids):
            raise ValueError(f"{model_dir}: trained on another catalog (or another item order) than this dataset's")
        return cls(name, model)

    def score(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        return last_scores(self.model, histories)
