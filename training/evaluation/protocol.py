"""Offline leave-one-out evaluation: protocols, target ranks, metrics and bootstrap CIs.

Split: `training.data.loo` (per user the last engaged item is the test target, the
second-to-last the validation target; same-timestamp ties are ordered by
`seq_pos`). Only the test target is evaluated here; every model sees the
user's history `seq[:-1]` (the validation item included), oldest first.

Protocols
- `sampled-100`: the target against 100 negatives drawn uniformly without
  replacement, with a fixed seed per (seed, user), from the items the user
  never interacted with (the whole sequence, target included, is excluded),
  as in SASRec. A user with fewer than 100 such items gets all of them.
- `full`: the target against every catalog item; the user's history items
  are excluded from the ranking (masked), the usual practice.

Ranks are pessimistic: rank = 1 + #(candidates scoring > target) + #(other
candidates scoring == target), so ties count against the target and a
constant scorer gets no credit. NaN scores count as -inf.

Metrics per user from the 1-based rank r: HR@10 = [r <= 10], NDCG@k =
[r <= k] / log2(r + 1), MRR = 1 / r; reported as means over users with a 95%
percentile-bootstrap CI (users resampled with replacement, fixed seed).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from training.data.loo import LooSplit
from training.evaluation.models import CatalogScorer

log = logging.getLogger(__name__)

SAMPLED = "sampled-100"
FULL = "full"
PROTOCOLS: tuple[str, ...] = (SAMPLED, FULL)
METRICS: tuple[str, ...] = ("hr@10", "ndcg@10", "ndcg@5", "mrr")
N_NEGATIVES = 100
# The slices every report adds (issue 31 item 4: where item text should matter most): users whose test
# item is rare in the training part, and users with a short history.
RARE_TARGET_MAX = 5  # training interactions of the test item, at most
SHORT_HISTORY_MAX = 3  # items before the test item, at most
TIE_RULE = (
    "pessimistic: rank = 1 + #(candidates scoring > target) + #(other candidates scoring == target); "
    "ties count against the target, so a constant scorer gets no credit; NaN scores count as -inf"
)


@dataclass(frozen=True)
class EvalConfig:
    protocols: tuple[str, ...] = PROTOCOLS
    users: int | None = 5000  # None: every user with a test target
    seed: int = 0
    batch_size: int = 512
    n_negatives: int = N_NEGATIVES
    bootstrap: int = 1000

    def __post_init__(self) -> None:
        bad = [p for p in self.protocols if p not in PROTOCOLS]
        if bad or not self.protocols:
            raise ValueError(f"unknown protocol(s) {bad}; choose from {', '.join(PROTOCOLS)}")
        if self.users is not None and self.users < 1:
            raise ValueError(f"users must be >= 1 (or None for all), got {self.users}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0 (numpy SeedSequence), got {self.seed}")
        if self.batch_size < 1 or self.n_negatives < 1 or self.bootstrap < 1:
            raise ValueError(f"batch_size, n_negatives and bootstrap must be >= 1: {self}")


@dataclass
class EvalRun:
    """Per protocol and model, the 1-based rank of each evaluated user's test target."""

    users: np.ndarray  # indices into LooSplit.users, sorted
    ranks: dict[str, dict[str, np.ndarray]]  # protocol -> model -> (n_users,)
    seconds: dict[str, float]  # model -> wall time (loading excluded, scoring included)
    short_negatives: int = 0  # users with fewer than n_negatives eligible negatives
    descriptions: dict[str, str] = field(default_factory=dict)


def user_slices(split: LooSplit, users: np.ndarray) -> dict[str, np.ndarray]:
    """Masks over `users` (indices into split.users) of the report's slices, by label."""
    counts = split.train_item_counts("test")
    targets = np.array([split.target(int(u), "test") for u in users], dtype=np.int64)
    lengths = np.array([split.history(int(u), "test").size for u in users], dtype=np.int64)
    return {f"users whose test item has at most {RARE_TARGET_MAX} training interactions": counts[targets] <= RARE_TARGET_MAX,
            f"users with at most {SHORT_HISTORY_MAX} history items": lengths <= SHORT_HISTORY_MAX}


# --------------------------------------------------------------------------- sampling


def sample_users(n_total: int, n: int | None, seed: int) -> np.ndarray:
    """Sorted indices of a seeded uniform sample of `n` users (all of them if n is None or >= n_total)."""
    if n is None or n >= n_total:
        return np.arange(n_total, dtype=np.int64)
    rng = np.random.default_rng([seed, 0])
    return np.sort(rng.choice(n_total, size=n, replace=False)).astype(np.int64)


def sample_negatives(sequence: np.ndarray, n_items: int, n: int, seed: int, user: int) -> np.ndarray:
    """`n` distinct items outside `sequence`, uniform, deterministic in (seed, user); all of them if fewer."""
    exclude = np.unique(sequence)
    if n_items - exclude.size <= n:
        return np.setdiff1d(np.arange(n_items, dtype=np.int64), exclude, assume_unique=True)
    rng = np.random.default_rng([seed, 1, user])
    # n + |exclude| distinct items contain at least n eligible ones; filtering keeps the draw uniform.
    draw = rng.choice(n_items, size=min(n_items, n + exclude.size), replace=False)
    return draw[~np.isin(draw, exclude, assume_unique=True)][:n].astype(np.int64)


def negatives_matrix(split: LooSplit, users: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, int]:
    """(len(users), n) negatives per user, padded with -1; and how many users had fewer than n."""
    out = np.full((users.size, n), -1, dtype=np.int64)
    short = 0
    n_items = len(split.item_ids)
    for row, u in enumerate(users):
        neg = sample_negatives(split.sequences[u], n_items, n, seed, int(u))
        out[row, : neg.size] = neg
        short += neg.size < n
    return out, short


# --------------------------------------------------------------------------- ranks


def _clean(scores: np.ndarray) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float32)
    return np.where(np.isnan(s), np.float32(-np.inf), s)  # always a copy


def sampled_ranks(scores: np.ndarray, targets: np.ndarray, negatives: np.ndarray) -> np.ndarray:
    """Pessimistic 1-based rank of each target among its negatives (-1 entries are padding)."""
    s = _clean(scores)
    rows = np.arange(s.shape[0])
    t = s[rows, targets]
    valid = negatives >= 0
    cand = s[rows[:, None], np.where(valid, negatives, 0)]
    return 1 + ((cand >= t[:, None]) & valid).sum(axis=1)


def full_ranks(scores: np.ndarray, targets: np.ndarray, histories: Sequence[np.ndarray]) -> np.ndarray:
    """Pessimistic 1-based rank of each target among all items, the user's history items masked."""
    s = _clean(scores)
    lens = np.fromiter((h.size for h in histories), dtype=np.int64, count=len(histories))
    if lens.sum():
        s[np.repeat(np.arange(len(histories)), lens), np.concatenate(histories)] = np.nan  # never >= anything
    rows = np.arange(s.shape[0])
    t = s[rows, targets]
    if np.isnan(t).any():
        raise ValueError("a test target is also in its user's history; the leave-one-out split is inconsistent")
    return (s >= t[:, None]).sum(axis=1)  # counts the target itself once, hence 1 + others


# --------------------------------------------------------------------------- metrics


def rank_metrics(ranks: np.ndarray) -> dict[str, np.ndarray]:
    """Per-user HR@10, NDCG@10, NDCG@5 and MRR from 1-based ranks."""
    r = np.asarray(ranks, dtype=np.float64)
    if r.size and r.min() < 1:
        raise ValueError(f"ranks are 1-based; got a minimum of {r.min()}")
    gain = 1.0 / np.log2(r + 1.0)
    return {"hr@10": (r <= 10).astype(np.float64), "ndcg@10": np.where(r <= 10, gain, 0.0),
            "ndcg@5": np.where(r <= 5, gain, 0.0), "mrr": 1.0 / r}


def bootstrap_means(values: np.ndarray, n_boot: int, seed: int, max_cells: int = 4_000_000) -> np.ndarray:
    """(n_boot, m) means of the m rows of `values` (m, n) over users resampled with replacement.

    Resample multiplicities are built with bincount and applied as one matrix product, chunked
    so that at most `max_cells` counts exist at a time. The same resamples serve every row.
    """
    v = np.atleast_2d(np.asarray(values, dtype=np.float64))
    n = v.shape[1]
    if n == 0:
        raise ValueError("no users to bootstrap")
    rng = np.random.default_rng([seed, 2])
    chunk = max(1, max_cells // n)
    out = np.empty((n_boot, v.shape[0]))
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        idx = rng.integers(0, n, size=(b, n)) + (np.arange(b) * n)[:, None]
        counts = np.bincount(idx.ravel(), minlength=b * n).reshape(b, n)
        out[start : start + b] = counts @ v.T / n
    return out


def summarize(ranks: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict[str, float | list[float]]:
    """`{metric: mean, metric_ci: [lo, hi]}` with a 95% percentile-bootstrap CI."""
    per_user = rank_metrics(ranks)
    values = np.stack([per_user[m] for m in METRICS])
    lo, hi = np.percentile(bootstrap_means(values, n_boot, seed), [2.5, 97.5], axis=0)
    out: dict[str, float | list[float]] = {}
    for k, m in enumerate(METRICS):
        out[m] = float(values[k].mean())
        out[f"{m}_ci"] = [float(lo[k]), float(hi[k])]
    return out


def paired_difference(ranks_a: np.ndarray, ranks_b: np.ndarray, n_boot: int = 1000, seed: int = 0,
                      metric: str = "ndcg@10") -> dict[str, float | list[float]]:
    """Model A against model B on the same users: the relative difference of their mean `metric`,
    (mean A - mean B) / mean B, with a 95% paired percentile-bootstrap interval (each resample takes
    the same users for both). Also the absolute difference and its interval."""
    a, b = rank_metrics(ranks_a)[metric], rank_metrics(ranks_b)[metric]
    if a.shape != b.shape:
        raise ValueError(f"paired models need ranks of the same users, got {a.shape} and {b.shape}")
    boot = bootstrap_means(np.stack([a, b]), n_boot, seed)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = boot[:, 0] / boot[:, 1] - 1.0
    lo, hi = np.nanpercentile(rel, [2.5, 97.5])
    dlo, dhi = np.percentile(boot[:, 0] - boot[:, 1], [2.5, 97.5])
    mean_b = float(b.mean())
    return {"metric": metric, "mean_a": float(a.mean()), "mean_b": mean_b,
            "relative": float(a.mean() / mean_b - 1.0) if mean_b else float("nan"),
            "relative_ci": [float(lo), float(hi)], "difference": float(a.mean() - mean_b),
            "difference_ci": [float(dlo), float(dhi)], "resamples": n_boot}


# --------------------------------------------------------------------------- driver


def evaluate(split: LooSplit, models: Sequence[CatalogScorer], config: EvalConfig = EvalConfig(),
             progress: bool = True) -> EvalRun:
    """Score a seeded sample of users with every model, batch by batch, under every protocol."""
    from tqdm import tqdm

    if not split.users:
        raise ValueError("no user has >= 3 engaged items, so there is no leave-one-out test target")
    names = [m.name for m in models]
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"model names must be unique and non-empty: {names}")
    n_items = len(split.item_ids)
    users = sample_users(len(split.users), config.users, config.seed)
    targets = np.array([split.target(int(u), "test") for u in users], dtype=np.int64)
    histories = [split.history(int(u), "test") for u in users]
    negatives, short = (negatives_matrix(split, users, config.n_negatives, config.seed)
                        if SAMPLED in config.protocols else (None, 0))
    if short:
        log.warning("%d of %d users have fewer than %d eligible negatives; they are ranked against all of them",
                    short, users.size, config.n_negatives)
    ranks = {p: {n: np.zeros(users.size, dtype=np.int64) for n in names} for p in config.protocols}
    seconds = {}
    for model in models:
        t0 = time.perf_counter()
        for start in tqdm(range(0, users.size, config.batch_size), desc=f"eval {model.name}", unit="batch",
                          disable=not progress, leave=False):
            sl = slice(start, start + config.batch_size)
            hist = histories[sl]
            score_users = getattr(model, "score_users", None)  # models that need the user (ground truth)
            scores = np.asarray(score_users(users[sl], hist) if score_users else model.score(hist))
            if scores.shape != (len(hist), n_items):
                raise ValueError(f"model {model.name}: score() returned {scores.shape}, expected ({len(hist)}, {n_items})")
            if SAMPLED in ranks:
                ranks[SAMPLED][model.name][sl] = sampled_ranks(scores, targets[sl], negatives[sl])
            if FULL in ranks:
                ranks[FULL][model.name][sl] = full_ranks(scores, targets[sl], hist)
        seconds[model.name] = time.perf_counter() - t0
        log.info("%s: %d users scored in %.1f s", model.name, users.size, seconds[model.name])
    return EvalRun(users=users, ranks=ranks, seconds=seconds, short_negatives=short,
                   descriptions={m.name: getattr(m, "description", m.name) for m in models})
