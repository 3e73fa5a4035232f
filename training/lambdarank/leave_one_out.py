"""Train the LightGBM lambdarank bundle on interaction sequences without impression lists.

The shared datasets (Amazon reviews, MovieLens ratings) have no shown lists, so a
group is built around a known interaction: the target (label 1) plus M sampled
negatives, all scored at the target's time t.

- Targets come only from before each user's validation item (`training.data.loo`):
  positions k >= 1 of seq[:-2], a seeded sample of users and up to
  `positions_per_user` positions each, recent positions more likely. The
  validation item (one group per sampled user) early-stops on NDCG@10. The test
  item is never a target; it only appears as an event at its own time, which is
  after every training and validation t of its user.
- Negatives, distinct and never an item of the user's sequence:
  - `hard_negatives` drawn uniformly from the top `hard_k` of the first stage
    that `semrank eval` (and a service) runs before LightGBM
    (`training.lambdarank.first_stage`, encoder+cooc, counted over seq[:-2]) for the user at
    t: under full ranking LightGBM only ever orders such items, and negatives
    that popularity alone tells apart teach it nothing about them;
  - of the other `negatives`, `round(M * popularity_share)` in proportion to the
    item's interaction count in the training part
    (`LooSplit.train_item_counts("valid")`), the rest uniformly (the sampled-100
    protocol's negatives are uniform).
- Features: `featurizer.offline.pipeline.offline_features` from events strictly before t,
  on `training.data.loo.loo_data`'s clock: a user's own same-day items are ordered by
  the sequence, other users' events count from earlier days only. Computed in
  chunks of groups, so memory follows the chunk, not the data.
  Text: the cosine of the user's history text (`user_recent_items` before t,
  titles, `history_text`) and the item text; NaN when there is no history.
- Variants: `full` (every feature of `featurizer.definitions.NAMES`) and
  `behavioural` (no text family, so no encoder at all).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import polars as pl

from featurizer.offline.pipeline import offline_features, user_recent_items
from featurizer.contracts.schema import ENGAGEMENTS, Dataset
from featurizer.text import history_text
from ranker.bundle import EncoderRef, save_bundle
from training.data.loo import LooSplit
from training.ranking_metrics import mean_metrics
from training.lambdarank.impression_lists import VARIANTS, LightGBMParams

log = logging.getLogger(__name__)

TRAINING_MODE = "loo-sampled-negatives"
SOURCE_TARGET, SOURCE_POPULAR, SOURCE_UNIFORM, SOURCE_HARD = 0, 1, 2, 3


class Encoder(Protocol):
    def encode(self, texts: list[str]) -> np.ndarray: ...


@dataclass(frozen=True)
class LooRankerConfig(LightGBMParams):
    variant: str = "full"
    max_users: int | None = 20_000  # None: every user with a validation target
    positions_per_user: int = 3
    recency_decay: float = 0.7  # P(position k) ∝ decay ** (last training position - k)
    negatives: int = 16  # popularity-weighted and uniform
    popularity_share: float = 0.5
    hard_negatives: int = 16  # from the first stage's top `hard_k` (0: none, and no encoder needed for them)
    hard_k: int = 200
    feature_chunk_rows: int = 250_000  # rows featurized at once
    history_items: int = 5  # titles in the user text
    max_length: int = 128
    encoder_dir: str = "base"  # "base" or a directory relative to the bundle

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if self.max_users is not None and self.max_users < 1:
            raise ValueError(f"max_users must be >= 1 (or None for all), got {self.max_users}")
        if self.positions_per_user < 1 or self.negatives < 0 or self.hard_negatives < 0 or self.history_items < 1:
            raise ValueError(f"positions_per_user and history_items must be >= 1, negatives >= 0: {self}")
        if self.negatives + self.hard_negatives < 1 or self.hard_k < 1 or self.feature_chunk_rows < 1:
            raise ValueError(f"a group needs >= 1 negative, and hard_k and feature_chunk_rows must be >= 1: {self}")
        if not 0.0 <= self.popularity_share <= 1.0 or not 0.0 < self.recency_decay <= 1.0:
            raise ValueError(f"popularity_share must be in [0, 1] and recency_decay in (0, 1]: {self}")

    @property
    def feature_names(self) -> list[str]:
        return list(VARIANTS[self.variant])

    @property
    def n_popular(self) -> int:
        return int(round(self.negatives * self.popularity_share))

    @property
    def needs_encoder(self) -> bool:
        return "interest_score" in self.feature_names or self.hard_negatives > 0


def has_impression_lists(events: pl.DataFrame) -> bool:
    """True when some impression carries a request_id (then `training.lambdarank.impression_lists` applies)."""
    return events.filter((pl.col("event") == "impression") & pl.col("request_id").is_not_null()).height > 0


def sequence_times(ds: Dataset, split: LooSplit) -> list[np.ndarray]:
    """Per user of `split.users`: the µs timestamp of each item of its sequence (the first engagement),
    built with the ordering rules of `training.data.loo.loo_split`; raises if the two disagree."""
    ev = (
        ds.events.with_row_index("_row")
        .filter(pl.col("event").is_in(list(ENGAGEMENTS)) & pl.col("item_id").is_in(ds.items["item_id"].implode()))
        .sort(["user_id", "ts", "seq_pos", "_row"], nulls_last=True)
        .unique(["user_id", "item_id"], keep="first", maintain_order=True)
        .group_by("user_id", maintain_order=True)
        .agg(pl.col("item_id"), pl.col("ts").dt.epoch("us"))
    )
    by_user = {u: (i, t) for u, i, t in zip(ev["user_id"].to_list(), ev["item_id"].to_list(), ev["ts"].to_list())}
    out = []
    for user, seq in zip(split.users, split.sequences):
        ids, ts = by_user.get(user, ([], []))
        if len(ids) != seq.size or any(split.item_index[i] != s for i, s in zip(ids, seq.tolist())):
            raise ValueError(f"user {user}: events do not match the leave-one-out split; build both from one Dataset")
        out.append(np.asarray(ts, dtype=np.int64))
    return out


# --------------------------------------------------------------------------- groups


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


def group_keys(split: LooSplit, times: list[np.ndarray], cfg: LooRankerConfig) -> pl.DataFrame:
    """One row per group, in group order: u (index into split.users), pos k, valid (bool), user_id, ts."""
    n_users = len(split.users)
    users = np.arange(n_users)
    if cfg.max_users is not None and cfg.max_users < n_users:
        users = np.sort(np.random.default_rng([cfg.seed, 10]).choice(n_users, size=cfg.max_users, replace=False))
    rows: list[tuple[int, int, bool]] = []
    for u in users.tolist():
        seq = split.sequences[u]
        positions = sample_positions(seq.size, cfg.positions_per_user, cfg.recency_decay, np.random.default_rng([cfg.seed, 11, u]))
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
               recent: list[np.ndarray], k: int, chunk: int = 1000) -> list[np.ndarray]:
    """Per group: the top `k` items of the encoder+cooc first stage (counts over seq[:-2]) for the user at
    the group's time, the user's whole sequence excluded."""
    from training.lambdarank.first_stage import COOC_ITEMS, FirstStage, top_k, user_item_cosines

    stage = FirstStage(split, "valid")
    us = keys["u"].to_numpy()
    out: list[np.ndarray] = []
    for start in range(0, keys.height, chunk):
        rows = np.arange(start, min(start + chunk, keys.height))
        cos = user_item_cosines(user_emb[rows], item_embeddings)
        s = stage.scores(["encoder+cooc"], cos, [recent[r][:COOC_ITEMS] for r in rows])["encoder+cooc"]
        out += top_k(s, [split.sequences[us[r]] for r in rows], k)[1]
    return out


def build_groups(split: LooSplit, keys: pl.DataFrame, cfg: LooRankerConfig,
                 pools: list[np.ndarray] | None = None) -> pl.DataFrame:
    """One row per (group, candidate): group, part (train | valid), user_id, item_id, ts, label, source, pos.

    `keys` is `group_keys`' table; `pools` the first-stage top items per group for the hard negatives
    (required when `cfg.hard_negatives` > 0). Rows of a group are contiguous and in seeded random order
    (the target is not always first)."""
    if cfg.hard_negatives and pools is None:
        raise ValueError("hard negatives need the first stage's pools (hard_pools), or set hard_negatives=0")
    sampler = NegativeSampler(split.train_item_counts("valid"), cfg.negatives, cfg.n_popular)
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
        cols["group"].append(np.full(n, group, dtype=np.int64))
        cols["part"].append(np.full(n, valid))
        cols["user"].append(np.full(n, u, dtype=np.int64))
        cols["item"].append(np.concatenate([[seq[k]], neg]))
        cols["ts"].append(np.full(n, ts_us[group], dtype=np.int64))
        cols["label"].append(np.r_[1, np.zeros(neg.size, dtype=np.int32)].astype(np.int32))
        cols["source"].append(np.concatenate([[SOURCE_TARGET], src]).astype(np.int8))
        cols["pos"].append(np.full(n, k, dtype=np.int32))
    c = {k: np.concatenate(v) for k, v in cols.items()}
    shuffle = np.random.default_rng([cfg.seed, 13]).random(c["group"].size)
    order = np.lexsort((shuffle, c["group"]))
    user_ids, item_ids = np.asarray(split.users, dtype=object), np.asarray(split.item_ids, dtype=object)
    return pl.DataFrame({
        "group": c["group"][order],
        "part": np.where(c["part"][order], "valid", "train"),
        "user_id": pl.Series(user_ids[c["user"][order]], dtype=pl.Utf8),
        "item_id": pl.Series(item_ids[c["item"][order]], dtype=pl.Utf8),
        "ts": pl.Series(c["ts"][order]).cast(pl.Datetime("us", "UTC")),
        "label": c["label"][order], "source": c["source"][order], "pos": c["pos"][order],
    })


# --------------------------------------------------------------------------- text


def user_histories(ds: Dataset, keys: pl.DataFrame, n: int) -> list[list[str]]:
    """For each (user_id, ts) row of `keys`: the last `n` distinct engaged items strictly before ts."""
    hist = user_recent_items(ds.events.lazy(), ds.items.lazy(), keys.select("user_id", "ts").lazy(), n).collect()
    return hist["history"].to_list()


def encode_user_texts(encoder: Encoder, histories: list[list[str]], titles: dict[str, str], history_items: int,
                      progress: bool = True, cache: Callable[[list[str]], Path | None] | None = None) -> np.ndarray:
    """(len(histories), dim) unit vectors of the history texts; NaN rows where the history is empty.

    Each distinct text is encoded once; `cache(distinct texts)` names an .npy file that keeps them
    (both variants of one training run encode the same texts)."""
    from training.evaluation.models import cached_item_embeddings

    texts = [history_text([titles[i] for i in h if i in titles], history_items) for h in histories]
    distinct = sorted({t for t in texts if t})
    emb = cached_item_embeddings(encoder, distinct, cache(distinct) if cache else None, progress, desc="user texts")
    row = {t: k for k, t in enumerate(distinct)}
    out = np.full((len(texts), emb.shape[1] if emb.ndim == 2 and emb.shape[0] else 1), np.nan, dtype=np.float32)
    for k, t in enumerate(texts):
        if t:
            out[k] = emb[row[t]]
    return out


def build_examples(ds: Dataset, split: LooSplit, cfg: LooRankerConfig, encoder: Encoder | None = None,
                   item_embeddings: np.ndarray | None = None, times: list[np.ndarray] | None = None,
                   progress: bool = True, text_cache: Callable[[list[str]], Path | None] | None = None) -> pl.DataFrame:
    """Groups with point-in-time features (and the interest score for the `full` variant).

    `ds` and `split` should come from `training.data.loo.loo_data` (the features read its clock)."""
    from tqdm import tqdm

    from training.lambdarank.first_stage import COOC_ITEMS

    keys = group_keys(split, sequence_times(ds, split) if times is None else times, cfg)
    user_emb, pools = None, None
    if cfg.needs_encoder:
        if encoder is None or item_embeddings is None:
            raise ValueError("the 'full' variant and hard negatives need an encoder and item embeddings "
                             "(or use variant 'behavioural' with hard_negatives=0)")
        hist = user_histories(ds, keys.select("user_id", "ts"), max(cfg.history_items, COOC_ITEMS))
        titles = dict(zip(split.item_ids, split.titles))
        user_emb = encode_user_texts(encoder, [h[: cfg.history_items] for h in hist], titles, cfg.history_items, progress,
                                     text_cache)
        if cfg.hard_negatives:
            recent = [np.array([split.item_index[i] for i in h], dtype=np.int64) for h in hist]
            pools = hard_pools(split, keys, user_emb, item_embeddings, recent, cfg.hard_k)
    groups = build_groups(split, keys, cfg, pools)
    if "interest_score" in cfg.feature_names:
        items = np.fromiter((split.item_index[i] for i in groups["item_id"].to_list()), dtype=np.int64, count=groups.height)
        g = groups["group"].to_numpy()
        score = np.full(groups.height, np.nan, np.float32)
        if user_emb.shape[1] == item_embeddings.shape[1]:  # else no user had any history
            for a in range(0, groups.height, 100_000):  # gathered rows cost 2 x 1.5 kB each: chunk them
                sl = slice(a, a + 100_000)
                score[sl] = np.einsum("ij,ij->i", user_emb[g[sl]], item_embeddings[items[sl]])
        groups = groups.with_columns(pl.Series("interest_score", score))
    log.info("computing features for %d rows in %d groups", groups.height, keys.height)
    # Chunks end on group boundaries (groups are contiguous); each reads the whole log, holds only its rows.
    g = groups["group"].to_numpy()
    first = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    per_chunk = max(1, cfg.feature_chunk_rows * keys.height // groups.height)
    starts = np.r_[first[::per_chunk], groups.height].tolist()
    events, items_lf = ds.events.lazy(), ds.items.lazy()
    parts = [
        offline_features(events, items_lf, groups.slice(a, b - a).lazy(), resolution_us=split.resolution_us).collect()
        for a, b in tqdm(list(zip(starts[:-1], starts[1:])), desc="features", unit="chunk", disable=not progress, leave=False)
    ]
    return pl.concat(parts)


def validation_metrics(valid: pl.DataFrame, booster, feature_names: list[str]) -> dict[str, dict[str, float]]:
    """NDCG@10 etc. on the validation groups: the model and single-feature baselines (early-stopping set: optimistic)."""
    sizes = valid.group_by("group", maintain_order=True).len()["len"].to_numpy()
    labels = valid["label"].to_numpy().astype(np.float64)
    scores = {"lightgbm": booster.predict(valid.select(feature_names).to_numpy().astype(np.float32),
                                          num_iteration=booster.best_iteration or None)}
    for name, col in (("popularity-before-t", "item_purchases_all"), ("cooccurrence", "cooc_cosine_sum_recent"),
                      ("encoder", "interest_score")):
        if col in valid.columns and valid[col].is_not_nan().any():
            scores[name] = valid[col].to_numpy().astype(np.float64)
    return {k: mean_metrics(s, labels, sizes) for k, s in scores.items()}


def _same_tick_previous(examples: pl.DataFrame, split: LooSplit, times: list[np.ndarray]) -> dict[str, float]:
    """Share of targets whose previous sequence item is in the same clock tick (visible to the features
    only through `loo_data`'s per-user ordering)."""
    index = {u: k for k, u in enumerate(split.users)}
    targets = examples.filter(pl.col("label") == 1).select("part", "user_id", "pos")
    out = {}
    for part in ("train", "valid"):
        t = targets.filter(pl.col("part") == part)
        res = split.resolution_us
        same = [times[index[u]][k] // res == times[index[u]][k - 1] // res for u, k in zip(t["user_id"].to_list(), t["pos"].to_list())]
        out[part] = round(float(np.mean(same)), 4) if same else float("nan")
    return out


def train_loo_ranker(ds: Dataset, split: LooSplit, out_dir: str | Path, cfg: LooRankerConfig, encoder: Encoder | None = None,
                     item_embeddings: np.ndarray | None = None, data_source: str = "", progress: bool = True,
                     text_cache: Callable[[list[str]], Path | None] | None = None) -> dict:
    """Build groups and features, train with early stopping, write the bundle; returns the manifest extras."""
    from training.lambdarank.impression_lists import train_lambdarank

    t0 = time.monotonic()
    names = cfg.feature_names
    times = sequence_times(ds, split)
    examples = build_examples(ds, split, cfg, encoder, item_embeddings, times, progress, text_cache).rename({"group": "request_id"})
    train, valid = (examples.filter(pl.col("part") == p) for p in ("train", "valid"))
    if train.is_empty():
        raise ValueError("no training groups: every sampled user has fewer than 4 engaged items (a target needs "
                         "k >= 1 in seq[:-2]); use more users or data with longer sequences")
    log.info("groups: %d train, %d valid", train["request_id"].n_unique(), valid["request_id"].n_unique())
    booster, params, evals = train_lambdarank(train, valid, cfg.lightgbm_params(), names)
    valid_metrics = validation_metrics(valid.rename({"request_id": "group"}), booster, names)
    gain = booster.feature_importance("gain", iteration=booster.best_iteration or None)
    ts = examples["ts"]
    extra = {
        "training_mode": TRAINING_MODE,
        "variant": cfg.variant,
        "negative_sampling": {
            "negatives_per_group": cfg.negatives + cfg.hard_negatives, "popular": cfg.n_popular,
            "uniform": cfg.negatives - cfg.n_popular, "hard": cfg.hard_negatives,
            "hard_from": f"uniform draws from the top {cfg.hard_k} of the encoder+cooc first stage at t (co-occurrence "
                         "over seq[:-2]), the user's sequence excluded",
            "popularity_weights": "interaction counts of the training part (LooSplit.train_item_counts('valid'): "
                                  "no validation or test item counted)",
            "excluded": "every item of the user's sequence (validation and test items included)",
            "distinct": True, "seed": cfg.seed,
        },
        "training_data": {
            "source": data_source,
            "start": ts.min().isoformat(), "end": ts.max().isoformat(),
            "users": int(examples["user_id"].n_unique()),
            "groups": {p: int(d["request_id"].n_unique()) for p, d in (("train", train), ("valid", valid))},
            "rows": {"train": train.height, "valid": valid.height},
            "targets": "train: positions k >= 1 of seq[:-2] (before the validation item); valid: the validation "
                       "item; the test item is never a target",
            "clock_resolution_us": split.resolution_us,
            "same_tick_previous_item": _same_tick_previous(examples, split, times),
            "point_in_time": "features from events strictly before the target's time; the user's own events of one "
                             "clock tick are ordered by the sequence (training.data.loo.loo_data), other users' events "
                             "count only from earlier ticks",
        },
        "hyper_parameters": {**params, "num_boost_round": cfg.num_boost_round, "best_iteration": booster.best_iteration},
        "train_config": asdict(cfg),
        "metrics": {"valid": valid_metrics, "valid_ndcg@10_curve": evals.get("valid", {}).get("ndcg@10", [])},
        "feature_importance_gain": dict(zip(names, map(float, gain))),
        "inference_constants": {},
        "train_seconds": round(time.monotonic() - t0, 1),
    }
    if booster.best_iteration:
        import lightgbm as lgb

        booster = lgb.Booster(model_str=booster.model_to_string(num_iteration=booster.best_iteration))
    ref = EncoderRef(model_dir=cfg.encoder_dir, max_length=cfg.max_length, history_items=cfg.history_items)
    save_bundle(out_dir, booster, names, ref, extra)
    return extra


# --------------------------------------------------------------------------- command line


def load_text_side(ds: Dataset, bundle_dir: str | Path, cfg: LooRankerConfig, cache_dir: str | Path | None,
                   dataset_name: str) -> tuple[Encoder, np.ndarray, Callable[[list[str]], Path | None]]:
    """The encoder named by `cfg.encoder_dir`, the item embeddings (from `cache_dir` when cached there,
    under the same file name `semrank eval` uses, so either command reuses the other's encoding) and
    where user texts are cached (texts -> file, None without `cache_dir`)."""
    from featurizer.text import item_text_expr
    from ranker.encoder import TextEncoder, resolve_model_dir
    from training.evaluation.models import EncoderSpec, cached_item_embeddings, embedding_cache_path, model_fingerprint

    model_dir = "base" if cfg.encoder_dir == "base" else str(Path(bundle_dir) / cfg.encoder_dir)
    encoder = TextEncoder(model_dir, max_length=cfg.max_length)
    texts = ds.items.select(item_text_expr())["item_text"].to_list()
    if cache_dir is None:
        return encoder, cached_item_embeddings(encoder, texts, None, desc="item texts"), lambda _texts: None
    spec = EncoderSpec("encoder-frozen" if model_dir == "base" else "encoder", model_dir, cfg.max_length, cfg.history_items)
    key = model_fingerprint(resolve_model_dir(model_dir))
    item_emb = cached_item_embeddings(encoder, texts, embedding_cache_path(cache_dir, dataset_name, spec, key, texts),
                                      desc="item texts")
    return encoder, item_emb, lambda user_texts: embedding_cache_path(cache_dir, f"{dataset_name}-user-texts", spec, key, user_texts)


def train_from_args(args, ds: Dataset, encoder_dir: str) -> int:
    """`semrank train ranker` on data without impression lists (called by `semrank.cli.cmd_train_ranker`)."""
    from training.data.loo import loo_data
    from training.lambdarank.impression_lists import format_table

    cfg = LooRankerConfig(variant=args.variant, max_users=args.max_users, positions_per_user=args.positions_per_user,
                          negatives=args.negatives, popularity_share=args.popularity_share,
                          hard_negatives=args.hard_negatives, hard_k=args.hard_k, seed=args.seed,
                          encoder_dir=encoder_dir)
    ds, split = loo_data(ds)
    log.info("no impression lists: %s training (%s variant) on %d users with a leave-one-out split",
             TRAINING_MODE, cfg.variant, len(split.users))
    encoder = item_emb = text_cache = None
    if cfg.needs_encoder:
        encoder, item_emb, text_cache = load_text_side(ds, args.out, cfg, args.embedding_cache, Path(args.data).resolve().name)
    extra = train_loo_ranker(ds, split, args.out, cfg, encoder, item_emb, data_source=str(args.data), text_cache=text_cache)
    best = extra["hyper_parameters"]["best_iteration"]
    print(f"\nbundle ({TRAINING_MODE}, {cfg.variant}) written to {args.out}; best iteration {best}, "
          f"{extra['train_seconds']:.0f} s\nvalidation groups (the early-stopping set, so optimistic):\n")
    print(format_table(extra["metrics"]["valid"]))
    return 0
