"""Groups of the leave-one-out ranker (`training.lambdarank.leave_one_out`): which targets, and which negatives.

A group is a target interaction (label 1) and its negatives, all scored at the target's time:
- targets: positions k >= 1 of seq[:-2] (`sample_positions`, recent ones favoured; with a sequence
  model, exactly the last `held_out_targets` of them, which it was trained without), plus the
  validation item of each sampled user (`group_keys`);
- negatives (`build_groups`): `hard_negatives` drawn from the top `hard_k` of the `hard_from`
  first stage at t (`hard_pools`; encoder+cooc unless told), the rest in proportion to popularity or uniform
  (`NegativeSampler`), distinct and never an item of the user's sequence.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from ranker.interest import interest_scores
from training.data.loo import LooSplit
from training.lambdarank.params import LooRankerConfig

SOURCE_TARGET, SOURCE_POPULAR, SOURCE_UNIFORM, SOURCE_HARD = 0, 1, 2, 3
# Groups scored against the whole catalog at once (`hard_pools`; the sequence states likewise): a chunk
# of groups that starts on a multiple of it computes the same floats as one pass over every group.
POOL_CHUNK = 1000


def shuffle_stream(cfg: LooRankerConfig) -> np.random.Generator:
    """The stream that orders the rows within each group (`build_groups`); passed from chunk to chunk,
    it gives the groups of a chunked build the order of one build over all of them."""
    return np.random.default_rng([cfg.seed, 13])


def sample_positions(seq_len: int, n: int, decay: float, rng: np.random.Generator) -> np.ndarray:
    """Up to `n` distinct target positions k in 1..seq_len-3 (seq[:-2], k >= 1), recent ones favoured."""
    last = seq_len - 3
    if last < 1:
        return np.zeros(0, dtype=np.int64)
    ks = np.arange(1, last + 1)
    w = decay ** (last - ks).astype(np.float64)
    return np.sort(rng.choice(ks, size=min(n, ks.size), replace=False, p=w / w.sum()))


class NegativeSampler:
    """Distinct negatives outside an exclusion set: `n_popular` ∝ counts, the rest uniform.

    If too few items with a positive count are eligible, uniform draws fill the gap; if too
    few items are eligible at all, the group gets every eligible item.
    """

    def __init__(self, counts: np.ndarray, n: int, n_popular: int):
        self.weights = np.clip(np.asarray(counts, dtype=np.float64), 0.0, None)
        self.n, self.n_popular = n, min(n_popular, n)

    def sample(self, exclude: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(items, source) with source SOURCE_POPULAR or SOURCE_UNIFORM per item."""
        free = np.ones(self.weights.size, dtype=bool)
        free[exclude] = False
        w = np.where(free, self.weights, 0.0)
        n_pop = min(self.n_popular, int((w > 0).sum()))
        pop = rng.choice(w.size, size=n_pop, replace=False, p=w / w.sum()) if n_pop else np.zeros(0, np.int64)
        free[pop] = False
        eligible = np.flatnonzero(free)
        uni = rng.choice(eligible, size=min(self.n - n_pop, eligible.size), replace=False)
        items = np.concatenate([pop, uni]).astype(np.int64)
        source = np.repeat(np.array([SOURCE_POPULAR, SOURCE_UNIFORM], dtype=np.int8), [pop.size, uni.size])
        return items, source


def negative_sampler(split: LooSplit, cfg: LooRankerConfig) -> NegativeSampler:
    """The sampled negatives' sampler: popularity counted over the training part (no validation or test item)."""
    return NegativeSampler(split.train_item_counts("valid"), cfg.negatives, cfg.n_popular)


def group_keys(split: LooSplit, times: list[np.ndarray], cfg: LooRankerConfig) -> pl.DataFrame:
    """One row per group, in group order: u (index into split.users), pos k, valid (bool), user_id, ts."""
    n_users = len(split.users)
    users = np.arange(n_users)
    if cfg.max_users is not None and cfg.max_users < n_users:
        users = np.sort(np.random.default_rng([cfg.seed, 10]).choice(n_users, size=cfg.max_users, replace=False))
    rows: list[tuple[int, int, bool]] = []
    for u in users.tolist():
        seq = split.sequences[u]
        if cfg.held_out_targets:  # the items a sequence model was trained without (k >= 1)
            positions = np.arange(max(1, seq.size - 2 - cfg.held_out_targets), seq.size - 2)
        else:
            positions = sample_positions(seq.size, cfg.positions_per_user, cfg.recency_decay,
                                         np.random.default_rng([cfg.seed, 11, u]))
        rows += [(u, int(k), False) for k in positions]
        rows.append((u, seq.size - 2, True))
    if not rows:
        raise ValueError("no user has a validation target; the ranker needs users with >= 3 engaged items")
    u, k, valid = (np.array(c) for c in zip(*rows))
    user_ids = np.asarray(split.users, dtype=object)
    return pl.DataFrame({
        "u": u.astype(np.int64), "pos": k.astype(np.int32), "valid": valid.astype(bool),
        "user_id": pl.Series(user_ids[u], dtype=pl.Utf8),
        "ts": pl.Series(np.array([times[a][b] for a, b in zip(u, k)], dtype=np.int64)).cast(pl.Datetime("us", "UTC")),
    })


def hard_pools(split: LooSplit, keys: pl.DataFrame, user_emb: np.ndarray, item_embeddings: np.ndarray,
               recent: list[np.ndarray], k: int, chunk: int = POOL_CHUNK, kind: str = "encoder+cooc",
               sequence: tuple[np.ndarray, np.ndarray] | None = None, stage=None) -> list[np.ndarray]:
    """Per group: the top `k` items of the `kind` first stage (counts over seq[:-2]; a sequence stage
    reads `sequence`: each group's state after seq[:pos] and the item vectors of the sequence model,
    `training.lambdarank.leave_one_out.sequence_states`) for the user at the group's time, the user's
    whole sequence excluded. `stage`: that `FirstStage(split, "valid")`, when the caller keeps one."""
    from training.lambdarank.first_stage import COOC_ITEMS, FirstStage, top_k

    stage = stage or FirstStage(split, "valid")
    us = keys["u"].to_numpy()
    out: list[np.ndarray] = []
    for start in range(0, keys.height, chunk):
        rows = np.arange(start, min(start + chunk, keys.height))
        cos = interest_scores(user_emb[rows], item_embeddings)
        seq = None if sequence is None else sequence[0][rows] @ sequence[1].T
        s = stage.scores([kind], cos, [recent[r][:COOC_ITEMS] for r in rows], seq)[kind]
        out += top_k(s, [split.sequences[us[r]] for r in rows], k)[1]
    return out


def build_groups(split: LooSplit, keys: pl.DataFrame, cfg: LooRankerConfig,
                 pools: list[np.ndarray] | None = None, first_group: int = 0,
                 shuffle: np.random.Generator | None = None, sampler: NegativeSampler | None = None) -> pl.DataFrame:
    """One row per (group, candidate): group, part (train | valid), user_id, item_id, ts, label, source, pos.

    `keys` is `group_keys`' table; `pools` the first-stage top items per group for the hard negatives
    (required when `cfg.hard_negatives` > 0). Rows of a group are contiguous and in seeded random order
    (the target is not always first). A chunk of the groups: `keys` from its `first_group` on, and the
    `shuffle_stream` the previous chunk left (None: a fresh one, for the first chunk); `sampler` is
    the `NegativeSampler` of the split (built here when None). Each group's draws depend on its user
    and position only, so chunks give the rows of one build."""
    if cfg.hard_negatives and pools is None:
        raise ValueError("hard negatives need the first stage's pools (hard_pools), or set hard_negatives=0")
    sampler = sampler or negative_sampler(split, cfg)
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("group", "part", "user", "item", "ts", "label", "source", "pos")}
    ts_us = keys["ts"].dt.epoch("us").to_numpy()
    for group, (u, k, valid) in enumerate(zip(keys["u"].to_list(), keys["pos"].to_list(), keys["valid"].to_list())):
        seq = split.sequences[u]
        rng = np.random.default_rng([cfg.seed, 12, u, k])
        hard = np.zeros(0, np.int64)
        if cfg.hard_negatives:
            pool = pools[group]
            hard = rng.choice(pool, size=min(cfg.hard_negatives, pool.size), replace=False).astype(np.int64)
        neg, src = sampler.sample(np.concatenate([seq, hard]), rng) if cfg.negatives else (np.zeros(0, np.int64), np.zeros(0, np.int8))
        neg = np.concatenate([hard, neg])
        src = np.concatenate([np.full(hard.size, SOURCE_HARD, np.int8), src])
        n = neg.size + 1
        cols["group"].append(np.full(n, first_group + group, dtype=np.int64))
        cols["part"].append(np.full(n, valid))
        cols["user"].append(np.full(n, u, dtype=np.int64))
        cols["item"].append(np.concatenate([[seq[k]], neg]))
        cols["ts"].append(np.full(n, ts_us[group], dtype=np.int64))
        cols["label"].append(np.r_[1, np.zeros(neg.size, dtype=np.int32)].astype(np.int32))
        cols["source"].append(np.concatenate([[SOURCE_TARGET], src]).astype(np.int8))
        cols["pos"].append(np.full(n, k, dtype=np.int32))
    c = {k: np.concatenate(v) for k, v in cols.items()}
    stream = shuffle if shuffle is not None else shuffle_stream(cfg)
    order = np.lexsort((stream.random(c["group"].size), c["group"]))
    user_ids, item_ids = np.asarray(split.users, dtype=object), np.asarray(split.item_ids, dtype=object)
    return pl.DataFrame({
        "group": c["group"][order],
        "part": np.where(c["part"][order], "valid", "train"),
        "user_id": pl.Series(user_ids[c["user"][order]], dtype=pl.Utf8),
        "item_id": pl.Series(item_ids[c["item"][order]], dtype=pl.Utf8),
        "ts": pl.Series(c["ts"][order]).cast(pl.Datetime("us", "UTC")),
        "label": c["label"][order], "source": c["source"][order], "pos": c["pos"][order],
    })
