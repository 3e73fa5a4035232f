"""Training the sequence model (`ranker.sequence`: SASRec-CE over item ids and, optionally, the
items' text vectors; issue 31 item 1) on a leave-one-out split.

    model, summary = train_sasrec(split, SASRecConfig(), out_dir)   # writes OUT/sasrec.json, model.safetensors
    scorer = SASRecScorer.load(name, out_dir, split.item_ids)         # a CatalogScorer for `semrank eval`

- **Loss**: at every position of every training sequence, cross-entropy of the next item over the
  whole catalog (full softmax: what made SASRec strong in the recent replications, against the
  original's one sampled negative).
- **Data** (leave-one-out, `training.data.loo.LooSplit`, the SASRec protocol): training sequences end
  before the validation item (`seq[:-2]`, plus the users too short to evaluate; `hold_out` k ends
  them k items sooner, for a ranker that trains on those items with `sequence_score`); validation ranks
  the validation item after `seq[:-2]` over the full catalog, history masked (NDCG@10 on a seeded
  sample of users) every `eval_every` epochs, and the best epoch's weights are kept (patience
  `patience` evaluations); the test then scores `seq[:-1]` with those weights, as `semrank eval` does.
- **Files**: those of `ranker.sequence` (`model.safetensors`, `sasrec.json` with the validation
  curve) and `sasrec_curves.png` (that curve).

Progress: a tqdm bar per epoch; the loss and the validation metrics go to TensorBoard (and MLflow)
through `training.tracking` when a tracked run is open (`semrank train sequence`).
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ranker.sequence import CONFIG_FILE, FORMAT, MODEL_FILE, SASRecConfig
from ranker.sequence_torch import SASRec, last_scores, left_padded, load
from training import tracking

log = logging.getLogger(__name__)

CURVES_PNG = "sasrec_curves.png"


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
    train = [s[:-2 - cfg.hold_out] for s in split.sequences] + list(split.train_only)
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
