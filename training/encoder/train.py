"""Two-tower contrastive fine-tuning of the text encoder (all-MiniLM-L6-v2).

One shared MiniLM embeds both sides: the user text (titles of recent
interactions, `featurizer.text.history_text`) and the item text
(`featurizer.text.item_text_expr`). The loss is InfoNCE / multiple-negatives
ranking loss over in-batch items plus hard negatives (`training.encoder.two_tower`: the model and
its loss).
Pairs and splits come from `training.encoder.pairs`.

The training loop is capped by wall time (`max_minutes`, periodic validation
included), validates with sampled-100 NDCG@10 / HR@10 at the start (the frozen
baseline), every `eval_every` steps and at the end, and keeps the best model
(by validation NDCG@10) in `OUT/encoder/` as a plain BertModel (safetensors),
loadable by `ranker.encoder.TextEncoder`.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import nn

from featurizer.contracts.schema import Dataset, has_impression_lists
from ranker.bundle import MANIFEST, EncoderRef
from ranker.encoder import BASE_MODEL, base_model_path
from ranker.user_tower import UserTower
from training import tracking
from training.encoder import distributed
from training.encoder.lora import ATTENTION_QV, apply_lora, lora_modules, merge_lora
from training.encoder.pairs import (
    NO_ITEM,
    EncoderData,
    SampledEvaluator,
    embed_texts,
    impression_pairs,
    length_batches,
    loo_pairs,
    sample_epoch,
)
from training.encoder.tower import TRAINING_JSON, record_tower
from training.encoder.two_tower import TwoTower, exclusion
from training.figures import pyplot, save_figure

log = logging.getLogger(__name__)

ENCODER_DIR = "encoder"
CURVES = "encoder_curves"
METHODS = ("full", "lora")
DEFAULT_METHOD = "full"
DEFAULT_LR = {"full": 5e-5, "lora": 5e-4}


@dataclass(frozen=True)
class EncoderTrainConfig:
    method: str = DEFAULT_METHOD
    seed: int = 0
    max_minutes: float = 25.0
    max_steps: int | None = None
    batch_size: int = 64
    lr: float | None = None  # None: DEFAULT_LR[method]
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # linear decay to this fraction of lr at the end of the budget
    weight_decay: float = 0.01
    scale: float = 20.0  # inverse temperature of the InfoNCE softmax
    tower: str = "pooled"  # the user tower trained through (ranker.user_tower): pooled item vectors or text
    history_items: int | None = None  # None: 10 pooled, 5 text
    tower_decay: float = 0.5  # the pooled tower's initial weight decay^i per position
    learn_tower: bool = True  # train the pooled tower's position weights with the encoder
    tower_lr: float = 1e-2  # their learning rate (log weights)
    # Pooled: history positions whose item vectors get gradients (None: all); the others come from a table of
    # every item's vector, re-embedded every `history_cache_steps` steps. 2 keeps a step near the text tower's
    # cost (Beauty, 2 cores, 30 steps: 2.6 s a step against 2.4 s for text and 5.7 s with all 10 positions;
    # a refresh of the 12k items' table 27 s), and the first 2 of the default weights hold 75% of their mass.
    history_grad: int | None = 2
    history_cache_steps: int = 200
    max_length_user: int = 96
    max_length_item: int = 48
    pairs_per_user: int = 2  # per epoch
    recency_half_life: float = 3.0  # positions; a pair 3 positions older is half as likely
    hard_negatives: int = 1  # per pair, where impression lists exist
    val_users: int = 1000
    val_negatives: int = 100
    val_negative_pool: int | None = 3000  # negatives come from a fixed random slice of the catalog
    eval_every: int = 40  # steps
    test_days: float = 4.0  # impression data: the ranker's held-out days, never read
    valid_days: float = 3.0
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ATTENTION_QV
    num_threads: int = 2
    bf16: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.batch_size < 2:
            raise ValueError("batch_size must be >= 2 (in-batch negatives)")
        self.initial_tower()  # a bad tower is an error now, not after the split
        if self.history_grad is not None and self.history_grad < 0 or self.history_cache_steps < 1:
            raise ValueError(f"history_grad must be >= 0 and history_cache_steps >= 1: {self}")

    @property
    def n_history(self) -> int:
        return self.history_items or (10 if self.tower == "pooled" else 5)

    def initial_tower(self) -> UserTower:
        if self.tower == "text":
            return UserTower.text(self.n_history)
        if self.tower != "pooled":
            raise ValueError(f"tower must be pooled or text, got {self.tower!r}")
        return UserTower.pooled(self.n_history, self.tower_decay)

    @property
    def grad_positions(self) -> int:
        """Pooled: the history positions whose item vectors get gradients."""
        return self.n_history if self.history_grad is None else min(self.history_grad, self.n_history)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]


def build_data(ds: Dataset, cfg: EncoderTrainConfig) -> EncoderData:
    common = dict(history_items=cfg.n_history, val_users=cfg.val_users, n_negatives=cfg.val_negatives,
                  negative_pool=cfg.val_negative_pool, seed=cfg.seed)
    if has_impression_lists(ds.events):
        return impression_pairs(ds, test_days=cfg.test_days, valid_days=cfg.valid_days, **common)
    return loo_pairs(ds, **common)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_base(cfg: EncoderTrainConfig):
    from transformers import AutoModel, AutoTokenizer

    path = base_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True)
    if cfg.method == "lora":
        apply_lora(model, cfg.lora_targets, cfg.lora_rank, cfg.lora_alpha)
    return tokenizer, model.train()


def save_encoder(model: nn.Module, tokenizer, enc_dir: Path, training: dict, tower: UserTower) -> None:
    """Write a plain BertModel (LoRA merged) + tokenizer + the user tower it was trained with
    (`training.encoder.tower`) + training.json, replacing `enc_dir` at the end."""
    tmp, old = enc_dir.with_name(f".{enc_dir.name}.tmp"), enc_dir.with_name(f".{enc_dir.name}.old")
    for d in (tmp, old):
        shutil.rmtree(d, ignore_errors=True)
    plain = merge_lora(copy.deepcopy(model)) if lora_modules(model) else model
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if not (tmp / "model.safetensors").is_file():
        raise RuntimeError(f"{tmp}: save_pretrained wrote no model.safetensors")
    training["user_tower"] = record_tower(tmp, tower)
    (tmp / TRAINING_JSON).write_text(json.dumps(training, indent=2, default=str) + "\n")
    if enc_dir.exists():
        enc_dir.rename(old)
    tmp.rename(enc_dir)
    shutil.rmtree(old, ignore_errors=True)


class _Batcher:
    """Tokenized batches: the target item texts (+ hard negatives, + the pooled tower's history items),
    the text tower's user texts, weights, exclusion mask."""

    def __init__(self, data: EncoderData, tokenizer, cfg: EncoderTrainConfig):
        self.data, self.tok, self.cfg = data, tokenizer, cfg
        self.rng = np.random.default_rng(cfg.seed + 1)  # the global batches: the same in every process
        self.cache: torch.Tensor | None = None  # pooled, history_grad < history_items: every item's vector
        if cfg.tower == "text":
            self.user_text_len = np.array([len(data.user_text(h, cfg.n_history)) for h in data.pairs.history])
        else:  # batches of similar history size: less padding among their item texts
            self.user_text_len = (data.pairs.history != NO_ITEM).sum(axis=1)

    def epochs(self):
        epoch, made = 0, 0
        while True:
            chosen = sample_epoch(self.data.pairs, self.rng, self.cfg.pairs_per_user, self.cfg.recency_half_life)
            batches = length_batches(chosen, self.user_text_len, self.cfg.batch_size, self.rng)
            if not batches:
                raise ValueError(f"{chosen.size} training pairs per epoch is less than one batch of {self.cfg.batch_size}; lower --batch-size")
            for b in batches:
                yield epoch, self.make(distributed.my_slice(b), key=made)  # (one process: the whole batch)
                made += 1
            epoch += 1

    def make(self, rows: np.ndarray, key: int = 0) -> dict:
        """The batch of pair `rows`; `key` (the global batch's number) seeds each row's hard-negative
        draw, so a row gets the same negatives in whichever process takes it."""
        d, c, p = self.data, self.cfg, self.data.pairs
        targets = p.target[rows]
        hard = []
        if c.hard_negatives and p.hard_negatives:
            for r in rows:
                negs = p.hard_negatives[r]
                if negs.size:
                    rng = np.random.default_rng([c.seed + 1, 7, key, int(r)])
                    hard.extend(rng.choice(negs, min(c.hard_negatives, negs.size), replace=False).tolist())
        cands = np.concatenate([targets, np.asarray(hard, dtype=np.int64)])
        known = [d.known[p.user[r]] for r in rows]
        tok = lambda texts, n: self.tok(texts, padding=True, truncation=True, max_length=n, return_tensors="pt")  # noqa: E731
        out = {"weights": torch.from_numpy(p.weight[rows].astype(np.float32)),
               "exclude": torch.from_numpy(exclusion(cands, targets, known)), "n_candidates": int(cands.size),
               "cand_ids": cands, "target_ids": targets, "known": known}  # the ids: for the global batch (torchrun)
        encoded = cands
        if c.tower == "text":
            out["users"] = tok([d.user_text(p.history[r], c.n_history) for r in rows], c.max_length_user)
        else:
            hist = p.history[rows]
            g = c.grad_positions
            grad = hist[:, :g]
            extra = np.setdiff1d(grad[grad != NO_ITEM], cands)  # history items not among the candidates
            encoded = np.concatenate([cands, extra])
            pos_of: dict[int, int] = {}
            for k, i in enumerate(encoded.tolist()):
                pos_of.setdefault(i, k)
            pos = [pos_of.get(i, -1) for i in grad.ravel().tolist()]  # NO_ITEM: -1
            out["history_pos"] = torch.tensor(pos, dtype=torch.int64).reshape(grad.shape)
            if g < hist.shape[1]:
                if self.cache is None:
                    raise RuntimeError("the history cache is not built; call refresh_cache first")
                rest = hist[:, g:]
                out["history_cached"] = self.cache[torch.from_numpy(np.where(rest == NO_ITEM, 0, rest))]
                out["history_cached_mask"] = torch.from_numpy(rest != NO_ITEM)
        out["items"] = tok([d.item_texts[i] for i in encoded], c.max_length_item)
        return out

    def refresh_cache(self, model: nn.Module) -> float:
        """Re-embed every catalog item (no gradients) for the history positions past `history_grad`;
        returns the seconds it took."""
        t = time.monotonic()
        self.cache = torch.from_numpy(embed_texts(model, self.tok, self.data.item_texts, self.cfg.max_length_item,
                                                  bf16=self.cfg.bf16))
        return time.monotonic() - t


def train_step(net: nn.Module, b: dict, world: int, params: list, bf16: bool) -> tuple[float, int]:
    """Forward and backward of one batch, gradients clipped to norm 1; returns (the global batch's loss,
    its rows). Under torchrun `net` is the DDP-wrapped model and `b` this process's slice: its loss
    share is backpropagated `world` times over, as DDP averages the processes' gradients."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = net(b)
    (loss * world if world > 1 else loss).backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    rows = torch.tensor(float(len(b["weights"])))
    if world > 1:
        loss, rows = distributed.all_sum(loss), distributed.all_sum(rows)
    return float(loss.detach()), int(rows)


def _lr_factor(step: int, elapsed: float, cfg: EncoderTrainConfig, budget_s: float) -> float:
    warm = min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
    progress = elapsed / budget_s
    if cfg.max_steps:
        progress = max(progress, step / cfg.max_steps)
    return warm * max(cfg.min_lr_ratio, 1.0 - (1.0 - cfg.min_lr_ratio) * min(progress, 1.0))


def train_encoder(ds: Dataset, out_dir: str | Path, cfg: EncoderTrainConfig, data_source: str = "") -> dict:
    """Fine-tune, keep the best model in OUT/encoder/, write curves; returns the training summary.
    Started by torchrun with several processes, trains data-parallel (`training.encoder.distributed`):
    process 0 validates, saves and returns the summary; the others return {"rank": r, "steps": n}."""
    started = distributed.init_from_env()
    try:
        return _train(ds, out_dir, cfg, data_source)
    finally:
        if started:
            torch.distributed.destroy_process_group()


def _train(ds: Dataset, out_dir: str | Path, cfg: EncoderTrainConfig, data_source: str) -> dict:
    from tqdm import tqdm

    t_start = time.monotonic()
    torch.set_num_threads(cfg.num_threads)
    _seed_everything(cfg.seed)
    world, lead = distributed.world_size(), distributed.rank() == 0
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    enc_dir = out / ENCODER_DIR
    data = build_data(ds, cfg)
    log.info("split %s: %d candidate pairs, %d validation users", data.split["kind"], len(data.pairs), len(data.valid.target))
    tokenizer, model = load_base(cfg)
    two = TwoTower(model, cfg.scale, cfg.initial_tower(), cfg.learn_tower)
    # DDP all-reduces (averages) the gradients; the pooler is never used, hence find_unused_parameters.
    net = torch.nn.parallel.DistributedDataParallel(two, find_unused_parameters=True) if world > 1 else two
    current_tower = (lambda: two.tower()) if cfg.tower == "pooled" else cfg.initial_tower  # noqa: E731
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": params, "lr": cfg.learning_rate}]
    if cfg.tower == "pooled" and cfg.learn_tower:
        groups.append({"params": [two.log_weights], "lr": cfg.tower_lr, "weight_decay": 0.0, "base_lr": cfg.tower_lr})
    opt = torch.optim.AdamW(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=True)
    evaluate = SampledEvaluator(data, tokenizer, cfg)
    batcher = _Batcher(data, tokenizer, cfg)
    cache_s: list[float] = []
    budget_s = cfg.max_minutes * 60.0
    summary = {
        "base_model": BASE_MODEL,
        "method": cfg.method,
        "status": "running",
        "data": {"source": data_source, "items": len(data.item_ids), "events": ds.events.height, "split": data.split,
                 "candidate_pairs": len(data.pairs), "validation_users": len(data.valid.target)},
        "hyper_parameters": {**asdict(cfg), "learning_rate": cfg.learning_rate,
                             "trainable_parameters": sum(p.numel() for g in groups for p in g["params"])},
        "lora": {"layers": lora_modules(model), "merged_on_save": True} if cfg.method == "lora" else None,
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        # Wall-time numbers depend on what else runs on the machine: record the load.
        "host": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "loadavg_start": os.getloadavg(),
                 "processes": world},
        "created_at": datetime.now(timezone.utc).isoformat(),
    }
    curves: dict[str, list] = {"loss": [], "valid": []}

    t0 = time.monotonic()  # the budget covers the loop, periodic validation included
    frozen, eval_s, best = {}, 0.0, {}
    if lead:
        frozen = evaluate(model, current_tower())
        eval_s = time.monotonic() - t0
        curves["valid"].append({"step": 0, "elapsed_s": round(eval_s, 1), **frozen})
        tracking.scalars("valid", frozen, 0)
        best = {**frozen, "step": 0}
        log.info("frozen baseline: ndcg@10 %.4f hr@10 %.4f (%.0f s)", frozen["ndcg@10"], frozen["hr@10"], eval_s)
        summary["metrics"] = {"frozen": frozen, "best": best}
        save_encoder(model, tokenizer, enc_dir, summary, current_tower())

    def validate(step: int, best: dict) -> tuple[dict, float]:
        """Process 0 validates (and saves a better model); the others wait for it."""
        out = _validate(model, tokenizer, evaluate, step, t0, curves, best, summary, enc_dir, current_tower()) if lead \
            else (best, 0.0)
        if world > 1:
            torch.distributed.barrier()
        return out

    step, seen, epoch, train_s, status = 0, 0, 0, 0.0, "finished"
    bar = tqdm(total=cfg.max_steps, unit="step", desc=f"encoder {cfg.method}", dynamic_ncols=True, disable=not lead)
    batches = batcher.epochs()
    uses_cache = cfg.tower == "pooled" and cfg.grad_positions < cfg.n_history
    try:
        while not (cfg.max_steps and step >= cfg.max_steps):
            elapsed = time.monotonic() - t0
            step_s = train_s / step if step else 0.0
            stop = elapsed + step_s + 1.1 * eval_s > budget_s
            if distributed.agree(stop) if world > 1 else stop:  # process 0's clock decides for all
                break
            if uses_cache and step % cfg.history_cache_steps == 0:
                cache_s.append(batcher.refresh_cache(model))
            epoch, b = next(batches)
            for g in opt.param_groups:
                g["lr"] = g.get("base_lr", cfg.learning_rate) * _lr_factor(step, elapsed, cfg, budget_s)
            ts = time.monotonic()
            loss, rows = train_step(net, b, world, params, cfg.bf16)
            opt.step()
            opt.zero_grad(set_to_none=True)
            train_s += time.monotonic() - ts
            step += 1
            seen += rows
            if lead:
                curves["loss"].append({"step": step, "elapsed_s": round(time.monotonic() - t0, 1), "loss": loss, "lr": opt.param_groups[0]["lr"]})
                tracking.scalars("train", curves["loss"][-1], step)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", ex_s=f"{seen / train_s:.1f}", best=f"{best['ndcg@10']:.4f}")
            if step % cfg.eval_every == 0:
                best, eval_s = validate(step, best)
    except KeyboardInterrupt:
        status = "interrupted"
        log.warning("interrupted at step %d; the best model so far is in %s", step, enc_dir)
    bar.close()
    if not lead:
        if step % cfg.eval_every:  # process 0 validates the last step
            torch.distributed.barrier()
        return {"rank": distributed.rank(), "steps": step}
    if not curves["valid"] or curves["valid"][-1]["step"] != step:
        best, eval_s = validate(step, best)
    loop_s = time.monotonic() - t0
    summary.update(
        status=status, steps=step, examples_seen=seen, epochs_started=epoch + (1 if step else 0),
        train_loop_seconds=round(loop_s, 1), train_step_seconds=round(train_s, 1), wall_seconds=round(time.monotonic() - t_start, 1),
        steps_per_second=round(step / train_s, 4) if train_s else None,
        examples_per_second=round(seen / train_s, 2) if train_s else None,
        history_cache={"refreshes": len(cache_s), "seconds": round(sum(cache_s), 1)} if uses_cache else None,
        final_tower=current_tower().manifest_entry(),
    )
    summary["host"]["loadavg_end"] = os.getloadavg()
    summary["metrics"] = {"frozen": frozen, "final": {k: v for k, v in curves["valid"][-1].items() if k not in ("step", "elapsed_s")}, "best": best}
    if tracking.describe() is not None:  # the run that made this encoder (training.tracking)
        summary["tracking"] = tracking.describe()
    (enc_dir / TRAINING_JSON).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    save_curves(out / CURVES, curves, title=f"{cfg.method} fine-tuning ({data_source or 'data'})")
    ref = EncoderRef(model_dir=ENCODER_DIR, base_model=BASE_MODEL, max_length=cfg.max_length_user, history_items=cfg.n_history)
    update_manifest(out / MANIFEST, ref, summary)
    return summary


def _validate(model, tokenizer, evaluate, step, t0, curves, best, summary, enc_dir, tower: UserTower):
    ts = time.monotonic()
    m = evaluate(model, tower)
    curves["valid"].append({"step": step, "elapsed_s": round(time.monotonic() - t0, 1), **m})
    tracking.scalars("valid", m, step)
    log.info("step %d: valid ndcg@10 %.4f hr@10 %.4f (best %.4f at step %d)", step, m["ndcg@10"], m["hr@10"], best["ndcg@10"], best["step"])
    if m["ndcg@10"] > best["ndcg@10"]:
        best = {**m, "step": step}
        summary["metrics"]["best"] = best
        save_encoder(model, tokenizer, enc_dir, summary, tower)
    return best, time.monotonic() - ts


def save_curves(stem: Path, curves: dict, title: str) -> None:
    """`stem.json` (loss per step, validation metrics per evaluation) and `stem.png`."""
    plt = pyplot()

    stem.with_suffix(".json").write_text(json.dumps(curves, indent=1) + "\n")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    if curves["loss"]:
        steps = np.array([r["step"] for r in curves["loss"]])
        loss = np.array([r["loss"] for r in curves["loss"]])
        ax1.plot(steps, loss, alpha=0.35, label="batch loss")
        w = max(1, min(20, loss.size // 5))
        ax1.plot(steps[w - 1 :], np.convolve(loss, np.ones(w) / w, mode="valid"), label=f"mean of {w}")
        ax1.legend()
    ax1.set(xlabel="step", ylabel="InfoNCE loss", title="training loss")
    steps = [r["step"] for r in curves["valid"]]
    for key in ("ndcg@10", "hr@10"):
        ax2.plot(steps, [r[key] for r in curves["valid"]], marker="o", label=key)
    ax2.set(xlabel="step", ylabel="sampled-100 metric", title="validation (step 0 = frozen)")
    ax2.legend()
    fig.suptitle(title)
    save_figure(fig, stem.with_suffix(".png"), dpi=100)


def update_manifest(path: Path, ref: EncoderRef, summary: dict) -> bool:
    """Point an existing bundle manifest at the fine-tuned encoder; returns False when there is none."""
    if not path.is_file():
        log.info("no %s yet: `semrank train ranker` should reference %s/ when it writes the bundle", path, ref.model_dir)
        return False
    manifest = json.loads(path.read_text())
    manifest["encoder"] = asdict(ref)
    manifest["encoder_training"] = {
        k: summary.get(k) for k in ("base_model", "method", "status", "steps", "train_loop_seconds", "metrics", "created_at")
    } | {"details": f"{ref.model_dir}/{TRAINING_JSON}"}
    if "feature_names" in manifest:
        log.warning("%s: the ranker in this bundle was trained on interest scores of the previous encoder; retrain it", path)
        manifest["encoder_training"]["note"] = "ranker.txt predates this encoder; retrain the ranker with it"
    path.write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    return True
