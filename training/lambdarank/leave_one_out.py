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
  the sequence, other users' events count from earlier days only.
- Memory: everything per group (user vectors, hard-negative pools, features) is computed one chunk
  of groups at a time (`example_chunks`) and written to an on-disk `ExampleStore`, which LightGBM
  reads back in batches: memory follows the chunk and LightGBM's binned dataset, not the rows
  (docs/training_at_scale.md).
  Text: the cosine of the user vector (the bundle's tower, `ranker.user_tower`, over
  `user_recent_items` before t) and the item text's vector; NaN when there is no history.
- Variants: `full` (every feature of `featurizer.definitions.NAMES`) and
  `behavioural` (no text family, so no encoder at all).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import polars as pl

from featurizer.contracts.schema import ENGAGEMENTS, Dataset
from featurizer.offline.pipeline import offline_features, user_recent_items
from ranker.bundle import EncoderRef, save_bundle
from ranker.encoder import Encoder
from ranker.feature_matrix import BundleInputs
from ranker.interest import interest_scores
from ranker.user_tower import UserTower, user_vectors
from training import tracking
from training.data.loo import LooSplit
from training.lambdarank.booster import train_lambdarank, truncate
from training.lambdarank.example_store import ExampleStore
from training.lambdarank.negatives import (
    POOL_CHUNK,
    build_groups,
    group_keys,
    hard_pools,
    negative_sampler,
    shuffle_stream,
)
from training.lambdarank.params import LooRankerConfig
from training.ranking_metrics import mean_metrics

log = logging.getLogger(__name__)

TRAINING_MODE = "loo-sampled-negatives"


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


# --------------------------------------------------------------------------- text


def user_histories(ds: Dataset, keys: pl.DataFrame, n: int) -> list[list[str]]:
    """For each (user_id, ts) row of `keys`: the last `n` distinct engaged items strictly before ts."""
    hist = user_recent_items(ds.events.lazy(), ds.items.lazy(), keys.select("user_id", "ts").lazy(), n).collect()
    return hist["history"].to_list()


def tower_user_vectors(tower: UserTower, encoder: Encoder | None, histories: list[list[str]], split: LooSplit,
                       item_embeddings: np.ndarray, progress: bool = True,
                       cache: Callable[[list[str]], Path | None] | None = None) -> np.ndarray:
    """(len(histories), dim) user vectors by `tower` (`ranker.user_tower.user_vectors`) of each
    history (item ids, most recent first); NaN rows where there is none. A text tower encodes each
    distinct text once; `cache(distinct texts)` names an .npy file that keeps them (both variants
    of one training run encode the same texts)."""
    from training.evaluation.models import cached_item_embeddings

    rows = [[split.item_index.get(i, -1) for i in h] for h in histories]

    def encode(texts: list[str]) -> np.ndarray:
        return cached_item_embeddings(encoder, texts, cache(texts) if cache else None, progress, desc="user texts")

    return user_vectors(tower, rows, item_embeddings, split.titles, encode)


def sequence_states(model, split: LooSplit, keys: pl.DataFrame, chunk: int = POOL_CHUNK) -> np.ndarray:
    """(groups, dim): the sequence model's state (`ranker.sequence_torch.last_states`) after each group's
    history seq[:pos] (strictly before the target, as every other feature). Computed once per group
    for both of its uses: the hard negatives' first stage and `sequence_score`."""
    from ranker.sequence_torch import last_states

    us, pos = keys["u"].to_numpy(), keys["pos"].to_numpy()
    return np.concatenate([last_states(model, [split.sequences[us[k]][: pos[k]] for k in range(a, min(a + chunk, keys.height))])
                           for a in range(0, keys.height, chunk)])


def sequence_scores(states: np.ndarray, vectors: np.ndarray, split: LooSplit, groups: pl.DataFrame,
                    first_group: int = 0) -> np.ndarray:
    """Per row of `groups` (`build_groups`): its group's state (`sequence_states`, row 0 for group
    `first_group`) against the row's item vector (`ranker.sequence_torch.item_vectors`), the model's score of
    that item."""
    items = np.fromiter((split.item_index[i] for i in groups["item_id"].to_list()), dtype=np.int64, count=groups.height)
    return np.einsum("rd,rd->r", states[groups["group"].to_numpy() - first_group], vectors[items]).astype(np.float64)


def groups_per_chunk(cfg: LooRankerConfig) -> int:
    """Groups featurized at once: about `cfg.feature_chunk_rows` rows, a multiple of `POOL_CHUNK` when
    that many fit (so every chunk computes the floats one pass over all groups would)."""
    n = max(1, cfg.feature_chunk_rows // (1 + cfg.negatives + cfg.hard_negatives))
    return n - n % POOL_CHUNK if n >= POOL_CHUNK else n


def example_chunks(ds: Dataset, split: LooSplit, cfg: LooRankerConfig, encoder: Encoder | None = None,
                   item_embeddings: np.ndarray | None = None, times: list[np.ndarray] | None = None,
                   progress: bool = True, text_cache: Callable[[list[str]], Path | None] | None = None,
                   tower: UserTower | None = None, sequence_model=None) -> Iterator[pl.DataFrame]:
    """The groups with point-in-time features (and the interest score for the `full` variant, the
    sequence model's score with `cfg.sequence_dir`), one chunk of whole groups at a time
    (`groups_per_chunk`): everything per group (user vectors, hard-negative pools, sequence states,
    features) is computed for the chunk only, so memory follows the chunk; the chunks together are
    the rows one pass over every group would give (`build_examples`).

    `ds` and `split` should come from `training.data.loo.loo_data` (the features read its clock);
    `tower` (None: `cfg.user_tower()`) builds the user vectors of the interest score and of the
    hard negatives' first stage; `sequence_model` (`ranker.sequence_torch.SASRec`) is the bundle's."""
    from tqdm import tqdm

    from training.lambdarank.first_stage import COOC_ITEMS, SEQUENCE_STAGES, FirstStage

    keys = group_keys(split, sequence_times(ds, split) if times is None else times, cfg)
    if not (~keys["valid"]).any():
        raise ValueError("no training groups: every sampled user has fewer than 4 engaged items (a target needs "
                         "k >= 1 in seq[:-2]); use more users or data with longer sequences")
    if "sequence_score" in cfg.feature_names and sequence_model is None:
        raise ValueError("cfg.sequence_dir names a sequence model: pass it (sequence_model)")
    if cfg.needs_encoder and (encoder is None or item_embeddings is None):
        raise ValueError("the 'full' variant and hard negatives need an encoder and item embeddings "
                         "(or use variant 'behavioural' with hard_negatives=0)")
    tower = tower or cfg.user_tower()
    vectors = None
    if sequence_model is not None:
        from ranker.sequence_torch import item_vectors

        vectors = item_vectors(sequence_model)
    stage = FirstStage(split, "valid") if cfg.needs_encoder and cfg.hard_negatives else None
    sampler, shuffle = negative_sampler(split, cfg), shuffle_stream(cfg)
    events, items_lf = ds.events.lazy(), ds.items.lazy()
    n = groups_per_chunk(cfg)
    log.info("computing features for %d groups, %d at a time", keys.height, n)
    for a in tqdm(range(0, keys.height, n), desc="examples", unit="chunk", disable=not progress, leave=False):
        k = keys.slice(a, n)
        states = None if sequence_model is None else sequence_states(sequence_model, split, k)
        user_emb, pools = None, None
        if cfg.needs_encoder:
            hist = user_histories(ds, k.select("user_id", "ts"), max(tower.history_items, COOC_ITEMS))
            user_emb = tower_user_vectors(tower, encoder, hist, split, item_embeddings, False, text_cache)
            if cfg.hard_negatives:
                recent = [np.array([split.item_index[i] for i in h], dtype=np.int64) for h in hist]
                pools = hard_pools(split, k, user_emb, item_embeddings, recent, cfg.hard_k, kind=cfg.hard_from,
                                   sequence=(states, vectors) if cfg.hard_from in SEQUENCE_STAGES else None, stage=stage)
        groups = build_groups(split, k, cfg, pools, first_group=a, shuffle=shuffle, sampler=sampler)
        if "interest_score" in cfg.feature_names:
            items = np.fromiter((split.item_index[i] for i in groups["item_id"].to_list()), dtype=np.int64, count=groups.height)
            score = interest_scores(user_emb, item_embeddings, (groups["group"].to_numpy() - a, items))
            groups = groups.with_columns(pl.Series("interest_score", score))
        if "sequence_score" in cfg.feature_names:
            groups = groups.with_columns(pl.Series("sequence_score", sequence_scores(states, vectors, split, groups, a)))
        yield offline_features(events, items_lf, groups.lazy(), resolution_us=split.resolution_us).collect()


def build_examples(*args, **kwargs) -> pl.DataFrame:
    """Every chunk of `example_chunks` (same arguments) in one frame: for small data and tests."""
    return pl.concat(list(example_chunks(*args, **kwargs)))


# Validation baselines: a feature column scored alone (kept per validation row by the example store).
BASELINES = (("popularity-before-t", "item_purchases_all"), ("cooccurrence", "cooc_cosine_sum_recent"),
             ("encoder", "interest_score"), ("sequence", "sequence_score"))


def validation_metrics(store: ExampleStore, booster) -> dict[str, dict[str, float]]:
    """NDCG@10 etc. on the validation groups: the model and single-feature baselines (early-stopping set: optimistic)."""
    sizes, labels = store.sizes("valid"), store.labels("valid").astype(np.float64)
    scores = {"lightgbm": store.predict("valid", booster, num_iteration=booster.best_iteration or None)}
    for name, col in BASELINES:
        values = store.column("valid", col)
        if values is not None and (~np.isnan(values)).any():
            scores[name] = values
    return {k: mean_metrics(s, labels, sizes) for k, s in scores.items()}


def _same_tick_previous(targets: pl.DataFrame, split: LooSplit, times: list[np.ndarray]) -> dict[str, float]:
    """Share of targets (part, user_id, pos per group) whose previous sequence item is in the same clock
    tick (visible to the features only through `loo_data`'s per-user ordering)."""
    index = {u: k for k, u in enumerate(split.users)}
    out = {}
    for part in ("train", "valid"):
        t = targets.filter(pl.col("part") == part)
        res = split.resolution_us
        same = [times[index[u]][k] // res == times[index[u]][k - 1] // res for u, k in zip(t["user_id"].to_list(), t["pos"].to_list())]
        out[part] = round(float(np.mean(same)), 4) if same else float("nan")
    return out


def train_loo_ranker(ds: Dataset, split: LooSplit, out_dir: str | Path, cfg: LooRankerConfig, encoder: Encoder | None = None,
                     item_embeddings: np.ndarray | None = None, data_source: str = "", progress: bool = True,
                     text_cache: Callable[[list[str]], Path | None] | None = None, tower: UserTower | None = None,
                     sequence_source: Path | None = None) -> dict:
    """Build groups and features, train with early stopping, write the bundle; returns the manifest extras.
    `tower`: the bundle's user tower (None: `cfg.user_tower()`). With `cfg.sequence_dir`, the sequence
    model is read from there (relative to `out_dir`, where the caller put it); `sequence_source`: the
    held-out model whose scores train the ranker when the bundle serves its refit (`refit_check`)."""
    t0 = time.monotonic()
    names = cfg.feature_names
    tower = tower or cfg.user_tower()
    times = sequence_times(ds, split)
    sequence_model = refit = None
    if cfg.sequence_dir:
        served = Path(out_dir) / cfg.sequence_dir
        sequence_model = load_sequence_model(sequence_source or served, split, cfg)
        refit = refit_check(served, sequence_source, split) if sequence_source is not None else None
    inputs = BundleInputs(names, {}, tower, source="ranker training")
    targets = []  # one row per group: part, user_id, pos, ts
    with ExampleStore(inputs) as store:
        for chunk in example_chunks(ds, split, cfg, encoder, item_embeddings, times, progress, text_cache,
                                    tower, sequence_model):
            chunk = chunk.rename({"group": "request_id"})
            store.add("train", chunk.filter(pl.col("part") == "train"))
            store.add("valid", chunk.filter(pl.col("part") == "valid"), keep=[c for _, c in BASELINES])
            targets.append(chunk.filter(pl.col("label") == 1).select("part", "user_id", "pos", "ts"))
        targets = pl.concat(targets)
        groups = {p: int((targets["part"] == p).sum()) for p in ("train", "valid")}
        log.info("groups: %d train, %d valid (%d and %d rows)", groups["train"], groups["valid"],
                 store.rows("train"), store.rows("valid"))
        booster, params, evals = train_lambdarank(store, cfg.lightgbm_params())
        valid_metrics = validation_metrics(store, booster)
        rows = {p: store.rows(p) for p in ("train", "valid")}
    gain = booster.feature_importance("gain", iteration=booster.best_iteration or None)
    ts = targets["ts"]
    extra = {
        "training_mode": TRAINING_MODE,
        "variant": cfg.variant,
        "negative_sampling": {
            "negatives_per_group": cfg.negatives + cfg.hard_negatives, "popular": cfg.n_popular,
            "uniform": cfg.negatives - cfg.n_popular, "hard": cfg.hard_negatives,
            "hard_from": f"uniform draws from the top {cfg.hard_k} of the {cfg.hard_from} first stage at t (co-occurrence "
                         "over seq[:-2]), the user's sequence excluded",
            "popularity_weights": "interaction counts of the training part (LooSplit.train_item_counts('valid'): "
                                  "no validation or test item counted)",
            "excluded": "every item of the user's sequence (validation and test items included)",
            "distinct": True, "seed": cfg.seed,
        },
        "training_data": {
            "source": data_source,
            "start": ts.min().isoformat(), "end": ts.max().isoformat(),
            "users": int(targets["user_id"].n_unique()),
            "groups": groups,
            "rows": rows,
            "targets": (f"train: the last {cfg.held_out_targets} position(s) of seq[:-2]"
                        + (", which the sequence model was trained without" if cfg.sequence_dir else "")
                        if cfg.held_out_targets else
                        "train: positions k >= 1 of seq[:-2] (before the validation item)")
                       + "; valid: the validation item; the test item is never a target",
            "clock_resolution_us": split.resolution_us,
            "same_tick_previous_item": _same_tick_previous(targets, split, times),
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
    if cfg.sequence_dir:  # where `sequence_score`'s model lies in the bundle (ranker.sequence files)
        extra["sequence_model"] = cfg.sequence_dir
        if refit is not None:  # the model whose held-out scores trained the ranker, when it is not that one
            extra["sequence_training_model"] = refit
    if booster.best_iteration:
        booster = truncate(booster)
    ref = EncoderRef(model_dir=cfg.encoder_dir, max_length=cfg.max_length, history_items=tower.history_items)
    if tracking.describe() is not None:  # the run that made this bundle (training.tracking)
        extra["tracking"] = tracking.describe()
    save_bundle(out_dir, booster, names, ref, extra, tower=tower)
    return extra


def load_sequence_model(model_dir: Path, split: LooSplit, cfg: LooRankerConfig):
    """The bundle's sequence model; refused unless it was trained on this catalog without the items
    the ranker takes as targets (`SASRecConfig.hold_out` >= `cfg.held_out_targets`)."""
    from ranker.sequence_torch import load

    model, meta = load(model_dir)
    if list(meta["item_ids"]) != list(split.item_ids):
        raise ValueError(f"{model_dir}: the sequence model was trained on another catalog (or item order)")
    if model.cfg.hold_out < cfg.held_out_targets:
        raise ValueError(f"{model_dir}: the sequence model was trained with hold_out {model.cfg.hold_out}: it saw the "
                         f"last {cfg.held_out_targets} training position(s) the ranker would learn from; train it with "
                         f"`semrank train sequence --hold-out {cfg.held_out_targets}`")
    return model


def refit_check(served: Path, trained: Path, split: LooSplit) -> dict:
    """A bundle may serve its sequence model's *refit* (stacking's refit on all the data): the ranker
    learns `sequence_score` from the held-out model `trained` (it never fitted the ranker's targets),
    and the bundle carries `served`, the same recipe trained with a smaller hold-out (0: every item
    before the validation one), whose scores are as good as the held-out model's were on those targets.
    Refused unless both read this catalog in the same order with the same configuration but the
    hold-out (the ranker's trees would read a score of another scale). Returns what the manifest
    records of `trained`."""
    from ranker.sequence import MODEL_FILE, read_meta

    a, b = read_meta(served), read_meta(trained)  # (`trained`'s catalog: load_sequence_model checked it)
    if list(a["item_ids"]) != list(split.item_ids):
        raise ValueError(f"{served}: the served sequence model was trained on another catalog (or item order)")
    ca, cb = dict(a["config"]), dict(b["config"])
    served_hold_out, trained_hold_out = ca.pop("hold_out", 0), cb.pop("hold_out", 0)
    if served_hold_out > trained_hold_out:
        raise ValueError(f"{served}: the served model holds out more items than the one the ranker trains on ({trained})")
    differ = sorted(k for k in ca.keys() | cb.keys() if k != "max_minutes" and ca.get(k) != cb.get(k))
    if differ:
        raise ValueError(f"{served} and {trained}: the served model must be the same recipe but the hold-out; they "
                         f"differ in {', '.join(differ)}")
    return {"hold_out": int(trained_hold_out),
            "sha256": hashlib.sha256((trained / MODEL_FILE).read_bytes()).hexdigest(),
            "best_valid_ndcg@10": b.get("best_valid_ndcg@10")}


# --------------------------------------------------------------------------- command line


def load_text_side(ds: Dataset, bundle_dir: str | Path, cfg: LooRankerConfig, cache_dir: str | Path | None,
                   dataset_name: str) -> tuple[Encoder, np.ndarray, Callable[[list[str]], Path | None]]:
    """The encoder named by `cfg.encoder_dir`, the item embeddings (from `cache_dir` when cached there,
    under the same file name `semrank eval` uses, so either command reuses the other's encoding) and
    where user texts are cached (texts -> file, None without `cache_dir`)."""
    from featurizer.text import item_text_expr
    from ranker.encoder import TextEncoder, encoder_key
    from training.evaluation.models import (
        EncoderSpec,
        cached_item_embeddings,
        embedding_cache_path,
    )

    model_dir = "base" if cfg.encoder_dir == "base" else str(Path(bundle_dir) / cfg.encoder_dir)
    encoder = TextEncoder(model_dir, max_length=cfg.max_length)
    texts = ds.items.select(item_text_expr())["item_text"].to_list()
    if cache_dir is None:
        return encoder, cached_item_embeddings(encoder, texts, None, desc="item texts"), lambda _texts: None
    spec = EncoderSpec("encoder-frozen" if model_dir == "base" else "encoder", model_dir, cfg.max_length)
    key = encoder_key(model_dir, cfg.max_length)
    item_emb = cached_item_embeddings(encoder, texts, embedding_cache_path(cache_dir, dataset_name, spec, key, texts),
                                      desc="item texts")
    return encoder, item_emb, lambda user_texts: embedding_cache_path(cache_dir, f"{dataset_name}-user-texts", spec, key, user_texts)
