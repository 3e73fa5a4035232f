"""Training pairs and validation sets for the two-tower encoder fine-tuning.

A pair is (user history -> target item) with a weight and optional hard
negatives. Histories are item indices, most recent first, strictly before the
target, cut to `history_items`; the user text is `featurizer.text.history_text`
of their titles, as serving builds it. With impression lists the history is
`featurizer.offline.pipeline.user_recent_items`, the offline twin of the serving
history `OnlineFeatures.history` (ties at one instant: by item id).

Two time-respecting splits:

- `loo_pairs` (data without impression lists, e.g. the imported public sets):
  the leave-one-out split of `training.data.loo`. Per user the test item (last) and
  the validation item (second to last) are never targets nor history of a
  training pair: for every k >= 1 in seq[:-2], history seq[:k] -> seq[k].
  Validation = the second-to-last item with history seq[:-2].
- `impression_pairs` (data with impression lists, e.g. `semrank data synth`):
  the same day-based split as `training.lambdarank.impression_lists.split_bounds`. Training pairs are
  engaged items of lists shown before the validation window; their hard
  negatives are the items of the same list that were not engaged. Validation =
  each user's first newly engaged item inside the validation window. The test
  window (the ranker's held-out days) is never read, so the ranker's test table
  stays clean when it later uses this encoder.

Validation (`SampledEvaluator`): each validation user's target is ranked against
`n_negatives` items the user never engaged with (sampled-100 NDCG@10 / HR@10);
negatives are drawn from a fixed, seeded slice of the catalog (`negative_pool`)
so that one evaluation re-embeds a few thousand items, not the whole catalog.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import timedelta

import numpy as np
import polars as pl
import torch

from featurizer.contracts.schema import ENGAGEMENTS, EVENT_STRENGTH, Dataset
from featurizer.offline.pipeline import user_recent_items
from featurizer.text import history_text, item_text_expr
from ranker.encoder import mean_pool
from ranker.interest import interest_scores
from ranker.user_tower import UserTower, user_vectors
from training.data.loo import loo_split
from training.lambdarank.impression_lists import impression_lists

log = logging.getLogger(__name__)

NO_ITEM = -1


@dataclass
class PairSet:
    """Candidate training pairs (all of them; `sample_epoch` picks a bounded number per user)."""

    user: np.ndarray  # (n,) user index
    history: np.ndarray  # (n, history_items) item indices, most recent first, NO_ITEM padded
    target: np.ndarray  # (n,) item index
    weight: np.ndarray  # (n,) event strength of the target
    recency: np.ndarray  # (n,) 0 = the user's most recent training pair, 1 = the one before, ...
    hard_negatives: list[np.ndarray] = field(default_factory=list)  # per pair; empty list = none at all

    def __len__(self) -> int:
        return int(self.target.size)


@dataclass
class ValidationSet:
    """Sampled-ranking validation: each user's target against `negatives` never engaged by the user."""

    users: list[str]
    history: np.ndarray  # (m, history_items)
    target: np.ndarray  # (m,)
    negatives: np.ndarray  # (m, n_negatives)


@dataclass
class EncoderData:
    item_ids: list[str]
    titles: list[str]
    item_texts: list[str]
    users: list[str]  # user index -> user id (sequences too short for the split: "<short k>")
    pairs: PairSet
    known: list[np.ndarray]  # per user index: sorted item indices the user engaged with in training
    valid: ValidationSet
    split: dict  # what was used, for training.json

    def user_text(self, history_row: np.ndarray, history_items: int) -> str:
        return history_text([self.titles[i] for i in history_row if i != NO_ITEM], history_items)


def _catalog(ds: Dataset) -> tuple[list[str], list[str], list[str]]:
    texts = ds.items.select("item_id", "title", item_text_expr())
    return texts["item_id"].to_list(), texts["title"].to_list(), texts["item_text"].to_list()


def _history_matrix(histories: list, history_items: int) -> np.ndarray:
    out = np.full((len(histories), history_items), NO_ITEM, dtype=np.int64)
    for r, h in enumerate(histories):
        h = list(h)[:history_items]
        out[r, : len(h)] = h
    return out


def _sample_negatives(
    rng: np.random.Generator, exclude: list[np.ndarray], n_items: int, n_negatives: int, pool: np.ndarray | None
) -> np.ndarray:
    """Per row, distinct items outside `exclude[row]`, drawn from `pool` (or the catalog).

    `n_negatives` per row, or fewer for every row (with a warning) when a small catalog
    leaves some user fewer allowed items.
    """
    candidates = np.arange(n_items) if pool is None else pool
    allowed = [candidates[~np.isin(candidates, ex)] for ex in exclude]
    n = min([n_negatives, *(a.size for a in allowed)])
    if n < 1:
        raise ValueError("a validation user has engaged with every candidate item; no negatives are left to sample")
    if n < n_negatives:
        log.warning("catalog too small for %d validation negatives per user; using %d", n_negatives, n)
    out = np.empty((len(exclude), n), dtype=np.int64)
    for r, a in enumerate(allowed):
        out[r] = rng.choice(a, n, replace=False)
    return out


def _negative_pool(rng: np.random.Generator, n_items: int, pool_size: int | None) -> np.ndarray | None:
    if pool_size is None or pool_size >= n_items:
        return None
    return np.sort(rng.choice(n_items, pool_size, replace=False))


def _engagement_strength(ds: Dataset, item_index: dict[str, int], user_index: dict[str, int]) -> dict[tuple[int, int], int]:
    strength = pl.col("event").cast(pl.Utf8).replace_strict(EVENT_STRENGTH, return_dtype=pl.Int64)
    df = (
        ds.events.filter(pl.col("event").is_in(list(ENGAGEMENTS)))
        .group_by("user_id", "item_id")
        .agg(strength.max().alias("s"))
    )
    return {
        (user_index[u], item_index[i]): s
        for u, i, s in zip(df["user_id"].to_list(), df["item_id"].to_list(), df["s"].to_list())
        if u in user_index and i in item_index
    }


def loo_pairs(ds: Dataset, history_items: int, val_users: int, n_negatives: int, negative_pool: int | None, seed: int) -> EncoderData:
    """Leave-one-out pairs; see the module docstring."""
    split = loo_split(ds)
    if not split.users:
        raise ValueError("no user has 3 or more engaged items; the leave-one-out split needs sequences of length >= 3")
    item_ids, titles, item_texts = _catalog(ds)
    if item_ids != split.item_ids:
        raise RuntimeError("item order differs between the catalog and the leave-one-out split")
    # Evaluated users first (index u <-> split.users[u]), then the short sequences (training only).
    seqs = [s[:-2] for s in split.sequences] + list(split.train_only)
    strength = _engagement_strength(ds, split.item_index, {u: k for k, u in enumerate(split.users)})
    users, hists, targets, weights, recency = [], [], [], [], []
    for u, seq in enumerate(seqs):
        for k in range(1, len(seq)):
            users.append(u)
            hists.append(seq[:k][::-1][:history_items])
            targets.append(int(seq[k]))
            weights.append(strength.get((u, int(seq[k])), EVENT_STRENGTH["click"]))  # short sequences: no user id kept
            recency.append(len(seq) - 1 - k)
    pairs = PairSet(
        user=np.asarray(users, dtype=np.int64),
        history=_history_matrix(hists, history_items),
        target=np.asarray(targets, dtype=np.int64),
        weight=np.asarray(weights, dtype=np.float32),
        recency=np.asarray(recency, dtype=np.int64),
    )
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(len(split.users), min(val_users, len(split.users)), replace=False))
    pool = _negative_pool(rng, len(item_ids), negative_pool)
    valid = ValidationSet(
        users=[split.users[u] for u in chosen],
        history=_history_matrix([split.history(u, "valid")[::-1] for u in chosen], history_items),
        target=np.asarray([split.target(u, "valid") for u in chosen], dtype=np.int64),
        # Never-interacted negatives: the whole sequence (test item included) is excluded.
        negatives=_sample_negatives(rng, [split.sequences[u] for u in chosen], len(item_ids), n_negatives, pool),
    )
    info = {
        "kind": "leave-one-out",
        "why": "no impression lists with request_id in the events",
        "rule": "per user: last item = test (never read), second-to-last = validation, "
        "training pairs seq[:k] -> seq[k] for k >= 1 within seq[:-2]",
        "users_evaluable": len(split.users),
        "users_short_training_only": len(split.train_only),
        "time_range": [ds.events["ts"].min().isoformat(), ds.events["ts"].max().isoformat()],
    }
    users = list(split.users) + [f"<short {k}>" for k in range(len(split.train_only))]
    return EncoderData(item_ids, titles, item_texts, users, pairs, [np.unique(s) for s in seqs], valid, info)


def _histories(ds: Dataset, queries: pl.DataFrame, history_items: int) -> pl.DataFrame:
    """`queries` (user_id, ts, ...) plus `history`: the user text's items as serving picks them
    (`OnlineFeatures.history`): last distinct engaged items before ts, most recent first, ties by item id."""
    return user_recent_items(ds.events.lazy(), ds.items.lazy(), queries.lazy(), history_items).collect()


def impression_pairs(
    ds: Dataset,
    history_items: int,
    val_users: int,
    n_negatives: int,
    negative_pool: int | None,
    seed: int,
    test_days: float,
    valid_days: float,
) -> EncoderData:
    """Time-split pairs from impression lists; see the module docstring."""
    item_ids, titles, item_texts = _catalog(ds)
    item_index = {i: k for k, i in enumerate(item_ids)}
    rows = impression_lists(ds.events).filter(pl.col("item_id").is_in(list(item_index)))
    end = rows["ts"].max()
    test_start = end - timedelta(days=test_days)
    valid_start = test_start - timedelta(days=valid_days)
    train = rows.filter(pl.col("ts") < valid_start)
    valid_rows = rows.filter((pl.col("ts") >= valid_start) & (pl.col("ts") < test_start) & (pl.col("label") > 0))
    if train.filter(pl.col("label") > 0).is_empty() or valid_rows.is_empty():
        raise ValueError(
            f"time split left no engaged training or validation lists (lists span {rows['ts'].min()} .. {end}, "
            f"validation from {valid_start}, test from {test_start}); lower --test-days/--valid-days"
        )
    # Training positives with their list's non-engaged items as hard negatives.
    pos_all = train.filter(pl.col("label") > 0)
    negs = train.filter(pl.col("label") == 0).group_by("request_id").agg(pl.col("item_id").alias("_neg"))
    pos = _histories(ds, pos_all.join(negs, on="request_id", how="left"), history_items)
    pos = pos.filter(pl.col("history").list.len() > 0)
    user_names = sorted(set(pos_all["user_id"].to_list()))
    user_index = {u: k for k, u in enumerate(user_names)}
    idx = lambda ids: np.asarray([item_index[i] for i in ids if i in item_index], dtype=np.int64)  # noqa: E731
    pos = pos.with_columns((pl.len().over("user_id") - pl.col("ts").rank("ordinal").over("user_id")).alias("_rec"))
    pairs = PairSet(
        user=np.asarray([user_index[u] for u in pos["user_id"].to_list()], dtype=np.int64),
        history=_history_matrix([idx(h) for h in pos["history"].to_list()], history_items),
        target=idx(pos["item_id"].to_list()),
        weight=pos["label"].to_numpy().astype(np.float32),
        recency=pos["_rec"].to_numpy().astype(np.int64),
        hard_negatives=[idx(n or []) for n in pos["_neg"].to_list()],
    )
    known = [np.zeros(0, dtype=np.int64) for _ in user_names]
    for u, items in pos_all.group_by("user_id").agg(pl.col("item_id")).iter_rows():
        known[user_index[u]] = np.unique(idx(items))

    # Validation: per user the first list in the window with an item the user engaged with for the first time.
    eng = ds.events.filter(pl.col("event").is_in(list(ENGAGEMENTS)))
    first_ts = eng.group_by("user_id", "item_id").agg(pl.col("ts").min().alias("_first"))
    first = (
        valid_rows.join(first_ts, on=["user_id", "item_id"], how="left")
        .filter(pl.col("_first") >= valid_start)
        .sort("ts", "request_id", "position")
        .unique("user_id", keep="first", maintain_order=True)
    )
    first = _histories(ds, first, history_items).filter(pl.col("history").list.len() > 0).sort("user_id")
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(first.height, min(val_users, first.height), replace=False))
    first = first.select(pl.all().gather(chosen))
    engaged_by = dict(eng.group_by("user_id").agg(pl.col("item_id")).iter_rows())
    pool = _negative_pool(rng, len(item_ids), negative_pool)
    valid = ValidationSet(
        users=first["user_id"].to_list(),
        history=_history_matrix([idx(h) for h in first["history"].to_list()], history_items),
        target=idx(first["item_id"].to_list()),
        negatives=_sample_negatives(rng, [idx(engaged_by[u]) for u in first["user_id"].to_list()], len(item_ids), n_negatives, pool),
    )
    info = {
        "kind": "time",
        "why": "impression lists with request_id present",
        "rule": "lists before valid_start train (hard negatives = shown, not engaged), "
        "[valid_start, test_start) validate, the last test_days are not read",
        "train_end_exclusive": valid_start.isoformat(),
        "valid": [valid_start.isoformat(), test_start.isoformat()],
        "test_start_not_read": test_start.isoformat(),
        "test_days": test_days,
        "valid_days": valid_days,
        "time_range": [rows["ts"].min().isoformat(), end.isoformat()],
    }
    return EncoderData(item_ids, titles, item_texts, user_names, pairs, known, valid, info)


def sample_epoch(pairs: PairSet, rng: np.random.Generator, pairs_per_user: int, recency_half_life: float) -> np.ndarray:
    """Pair indices for one epoch: at most `pairs_per_user` per user, without replacement, drawn
    with weight 0.5 ** (recency / half_life) (recent positions favoured); returned shuffled."""
    w = np.power(0.5, pairs.recency / max(recency_half_life, 1e-6))
    # Efraimidis-Spirakis: the top-m keys log(U) / w per user are a weighted sample without replacement.
    key = np.log(rng.random(len(pairs)).clip(1e-300)) / w
    order = np.lexsort((-key, pairs.user))
    u_sorted = pairs.user[order]
    starts = np.r_[0, np.flatnonzero(np.diff(u_sorted)) + 1]
    rank = np.arange(order.size) - np.repeat(starts, np.diff(np.r_[starts, order.size]))
    chosen = order[rank < pairs_per_user]
    return rng.permutation(chosen)


def length_batches(chosen: np.ndarray, lengths: np.ndarray, batch_size: int, rng: np.random.Generator, bucket_batches: int = 16) -> list[np.ndarray]:
    """Split shuffled pair indices into batches of similar user-text length (less padding).

    Every `bucket_batches * batch_size` consecutive pairs are sorted by length and cut into
    batches; batch order is shuffled. A short last batch is dropped (in-batch negatives
    need a full batch).
    """
    batches = []
    chunk = batch_size * bucket_batches
    for start in range(0, chosen.size, chunk):
        part = chosen[start : start + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches += [part[i : i + batch_size] for i in range(0, part.size - batch_size + 1, batch_size)]
    rng.shuffle(batches)
    return batches


# ---------------------------------------------------------------- validation


def embed_texts(model: torch.nn.Module, tokenizer, texts: list[str], max_length: int, batch_size: int = 128, bf16: bool = True) -> np.ndarray:
    """Unit-norm embeddings in eval mode (length-sorted batches); restores the previous mode."""
    was_training = model.training
    model.eval()
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    order = np.argsort([len(t) for t in texts], kind="stable")
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for s in range(0, len(texts), batch_size):
            idx = order[s : s + batch_size]
            tok = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            hidden = model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).last_hidden_state
            out[idx] = mean_pool(hidden.float(), tok["attention_mask"]).numpy()
    model.train(was_training)
    return out


def sampled_metrics(scores: np.ndarray, k: int = 10) -> dict[str, float]:
    """Column 0 is the target, the rest sampled negatives. Ties count against the target."""
    rank = (scores[:, 1:] >= scores[:, :1]).sum(axis=1)
    hit = rank < k
    return {
        f"ndcg@{k}": float(np.mean(np.where(hit, 1.0 / np.log2(rank + 2.0), 0.0))),
        f"hr@{k}": float(np.mean(hit)),
        "mrr": float(np.mean(1.0 / (rank + 1.0))),
        "users": int(scores.shape[0]),
    }


class SampledEvaluator:
    """Validation users' targets against their sampled negatives, with the current model and user
    tower (`ranker.user_tower`): the text tower embeds the history texts, the pooled one pools the
    history items' vectors, as the service would."""

    def __init__(self, data: EncoderData, tokenizer, cfg):  # cfg: EncoderTrainConfig
        v = data.valid
        self.data, self.tokenizer, self.cfg = data, tokenizer, cfg
        cand = np.concatenate([v.target[:, None], v.negatives], axis=1)
        needed = [cand.ravel()] if cfg.tower == "text" else [cand.ravel(), v.history[v.history != NO_ITEM]]
        self.items, inverse = np.unique(np.concatenate(needed), return_inverse=True)
        self.cand_rows = inverse[: cand.size].reshape(cand.shape)
        row = {int(i): k for k, i in enumerate(self.items)}
        self.history_rows = [[row[int(i)] for i in h if i != NO_ITEM] for h in v.history] if cfg.tower != "text" else []
        self.item_texts = [data.item_texts[i] for i in self.items]

    def __call__(self, model: torch.nn.Module, tower: UserTower) -> dict[str, float]:
        c = self.cfg
        items = embed_texts(model, self.tokenizer, self.item_texts, c.max_length_item, bf16=c.bf16)
        if tower.kind == "text":
            texts = [self.data.user_text(h, tower.history_items) for h in self.data.valid.history]
            users = embed_texts(model, self.tokenizer, texts, c.max_length_user, bf16=c.bf16)
        else:
            users = user_vectors(tower, self.history_rows, items)
        m, n = self.cand_rows.shape
        scores = interest_scores(users, items, (np.repeat(np.arange(m), n), self.cand_rows.ravel()))
        return sampled_metrics(scores.reshape(m, n))
