"""LightGBM bundles in the leave-one-out evaluation, scored on candidates only.

`training.evaluation.protocol.evaluate` asks a model for a (batch, n_items) matrix; LightGBM over a
whole catalog costs about 8 µs a row, so bundles (`--ranker NAME=BUNDLE`) take this path:

- `sampled-100`: only the target and the same 100 negatives the other models get.
- `full`: two stages, as the service would run them. A cheap first stage scores every item:
  `encoder` (cosine of user text and item text), `encoder+cooc` or `encoder+popularity`
  (reciprocal-rank fusion, k = 60, of the encoder rank and the rank by item co-occurrence
  with the user's recent items / by popularity, both counted over the training part); with a
  sequence model, `sequence` and `encoder+cooc+sequence` too (`training.lambdarank.first_stage`).
  The user's history items are masked, the top K go to LightGBM, which orders them; every other
  item keeps its first-stage order below all K. The report gives K and the recall@K of every
  first stage (the share of test targets that reach LightGBM at all), and of the fused stages'
  single sources alone and joined (`SourceUnion`: what any fusion of them can hold).

Features are computed as in training (`training.lambdarank.leave_one_out`): `offline_features` at the test
item's time, from events strictly before it; the user text from the items engaged strictly
before it. The data comes from `training.data.loo.loo_data`, so a user's own events of one clock
tick (one day on Amazon) are ordered by the sequence and the ranker sees seq[:-1] as the
matrix models do; other users' events count only from earlier ticks. The report still gives
every model's metrics on the users whose test and validation items fall in different ticks.

Ranks follow the evaluation's pessimistic tie rule (ties count against the target), in float64.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from featurizer.contracts.schema import Dataset
from featurizer.offline.pipeline import offline_features
from ranker.bundle import Bundle, load_bundle
from ranker.feature_matrix import BundleInputs
from ranker.interest import interest_scores
from ranker.sequence_torch import item_vectors, last_states
from ranker.sequence_torch import load as load_sequence
from ranker.user_tower import UserTower
from training.data.loo import LooSplit
from training.evaluation.models import parse_named_path
from training.evaluation.protocol import (
    FULL,
    SAMPLED,
    EvalConfig,
    EvalRun,
    negatives_matrix,
    rank_metrics,
    sample_users,
)
from training.lambdarank.first_stage import (
    COOC_ITEMS,
    DEFAULT_FIRST_STAGE,
    DEFAULT_RERANK_K,
    EASE_LAMBDA,
    EASE_RRF_K,
    FIRST_STAGES,
    RRF_K,
    SEQUENCE_STAGES,
    FirstStage,
    SourceUnion,
    top_k,
)
from training.lambdarank.leave_one_out import (
    sequence_times,
    tower_user_vectors,
    user_histories,
)

log = logging.getLogger(__name__)



def parse_ranker_arg(arg: str) -> tuple[str, Path]:
    """`NAME=BUNDLE` -> (NAME, BUNDLE)."""
    return parse_named_path(arg, "--ranker", "ranker-full=runs/beauty-ranker-full", what="BUNDLE")


@dataclass
class RankerModel:
    name: str
    bundle: Bundle
    source: str  # the path as given, for the report

    def __post_init__(self) -> None:
        self.inputs = BundleInputs.of(self.bundle)
        # The bundle's sequence model (`sequence_score`): ranker.sequence files in the bundle.
        self.sequence_model, self.sequence_items = None, None
        if "sequence_score" in self.inputs.given:
            self.sequence_model, meta = load_sequence(self.bundle.path / self.bundle.manifest["sequence_model"])
            self.sequence_items = list(meta["item_ids"])
            self.sequence_vectors = item_vectors(self.sequence_model)

    @property
    def uses_text(self) -> bool:
        return "interest_score" in self.bundle.feature_names

    def description(self, k: int, first_stage: str) -> str:
        m = self.bundle.manifest
        return (f"{self.name}: LightGBM bundle {self.source} ({m.get('training_mode', 'impression-lists')}, "
                f"{m.get('variant', '-')}, {len(self.bundle.feature_names)} features); features at the test item's "
                f"timestamp from events strictly before it; sampled-100 scores the 101 candidates, full re-orders "
                f"the top {k} of the {first_stage} first stage")


def load_ranker(name: str, path: str | Path, source: str | None = None) -> RankerModel:
    return RankerModel(name, load_bundle(path), source or str(path))


@dataclass
class TextSide:
    """A ranker's encoder with item embeddings in catalog order, and its user tower."""

    encoder: Any
    item_embeddings: np.ndarray
    tower: UserTower


def two_stage_rank(first: np.ndarray, top: np.ndarray, top_scores: np.ndarray, target: int) -> int:
    """Pessimistic 1-based rank: the top items by their re-ranker score, then the rest by `first`
    (masked items at -inf are never ranked)."""
    hit = np.flatnonzero(top == target)
    if hit.size:
        return int((top_scores >= top_scores[hit[0]]).sum())
    rest = np.isfinite(first)
    rest[top] = False
    return int(top.size + (first[rest] >= first[target]).sum())


# --------------------------------------------------------------------------- driver


@dataclass
class RankerRun:
    ranks: dict[str, dict[str, np.ndarray]]
    seconds: dict[str, float]
    descriptions: dict[str, str]
    two_stage: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    same_day: np.ndarray | None = None  # per evaluated user: test item at the validation item's timestamp
    towers: dict[str, str] = field(default_factory=dict)  # ranker name -> its user tower (describe())


def _features(ds: Dataset, users: list[str], ts_us: np.ndarray, items: list[str], interest: np.ndarray,
              resolution_us: int) -> pl.DataFrame:
    q = pl.DataFrame({"user_id": pl.Series(users, dtype=pl.Utf8), "item_id": pl.Series(items, dtype=pl.Utf8),
                      "ts": pl.Series(ts_us).cast(pl.Datetime("us", "UTC")), "interest_score": interest})
    return offline_features(ds.events.lazy(), ds.items.lazy(), q.lazy(), resolution_us=resolution_us).collect()


def evaluate_rankers(ds: Dataset, split: LooSplit, rankers: Sequence[RankerModel], text: TextSide,
                     config: EvalConfig, first_stage: str = DEFAULT_FIRST_STAGE, k: int = DEFAULT_RERANK_K,
                     chunk: int = 1000, progress: bool = True, sequence: Any = None,
                     stage: FirstStage | None = None) -> RankerRun:
    """Ranks of the test targets for bundles sharing one encoder, on the users and negatives of `evaluate`.
    `sequence`: a sequence model (`score(histories)` over the catalog) for the first stages that use one.
    `stage`: the split's `FirstStage(split, "test")` when the caller shares one between groups (its
    counts and EASE solve do not depend on the encoder); built here when None."""
    from tqdm import tqdm

    if first_stage not in FIRST_STAGES or k < 1:
        raise ValueError(f"first stage must be one of {', '.join(FIRST_STAGES)} and K >= 1; got {first_stage!r}, {k}")
    if first_stage in SEQUENCE_STAGES and sequence is None:
        raise ValueError(f"first stage {first_stage} needs a sequence model")
    kinds = FIRST_STAGES if sequence is not None else tuple(x for x in FIRST_STAGES if x not in SEQUENCE_STAGES)
    for r in rankers:
        if r.sequence_items is not None and r.sequence_items != list(split.item_ids):
            raise ValueError(f"{r.name}: its sequence model was trained on another catalog (or item order) than this dataset's")
    t_start = time.perf_counter()
    users = sample_users(len(split.users), config.users, config.seed)
    seqs = [split.sequences[u] for u in users]
    targets = np.array([s[-1] for s in seqs], dtype=np.int64)
    masked = [s[:-1] for s in seqs]  # the protocol's history mask
    negatives = negatives_matrix(split, users, config.n_negatives, config.seed)[0] if SAMPLED in config.protocols else None
    times = sequence_times(ds, split)
    t_test = np.array([times[u][-1] for u in users], dtype=np.int64)
    res = split.resolution_us
    same_day = np.array([times[u][-1] // res == times[u][-2] // res for u in users])
    user_ids = [split.users[u] for u in users]
    keys = pl.DataFrame({"user_id": user_ids, "ts": pl.Series(t_test).cast(pl.Datetime("us", "UTC"))})
    n_recent = max(text.tower.history_items, COOC_ITEMS)
    hist_ids = user_histories(ds, keys, n_recent)
    recent = [np.array([split.item_index[i] for i in h], dtype=np.int64) for h in hist_ids]
    user_emb = tower_user_vectors(text.tower, text.encoder, hist_ids, split, text.item_embeddings, progress)
    stage = (stage or FirstStage(split, "test")) if FULL in config.protocols else None
    union = SourceUnion(k)
    ranks = {p: {r.name: np.zeros(users.size, dtype=np.int64) for r in rankers} for p in config.protocols}
    own = {r.name: 0.0 for r in rankers}
    hits = {kind: 0 for kind in kinds}
    t_features = 0.0
    for start in tqdm(range(0, users.size, chunk), desc="rankers", unit="chunk", disable=not progress, leave=False):
        sl = slice(start, min(start + chunk, users.size))
        rows = np.arange(sl.start, sl.stop)
        cos = interest_scores(user_emb[sl], text.item_embeddings)  # the whole catalog: the first stage
        cands: list[np.ndarray] = [np.zeros(0, np.int64)] * rows.size
        if negatives is not None:
            cands = [np.concatenate([[targets[r]], negatives[r][negatives[r] >= 0]]) for r in rows]
        first, tops = None, None
        if stage is not None:
            chunk_masked = [masked[r] for r in rows]
            seq = None if sequence is None else sequence.score(chunk_masked)  # after seq[:-1]
            sources = stage.sources(cos, [recent[r][:COOC_ITEMS] for r in rows], seq, ease=True)
            source_tops = union.add(sources, chunk_masked, targets[rows])  # (`encoder`, `sequence`: stages too)
            for kind, s in stage.fuse(kinds, sources).items():
                kind_first, kind_tops = source_tops[kind] if kind in source_tops else top_k(s, chunk_masked, k)
                hits[kind] += sum(int(targets[r] in t) for r, t in zip(rows, kind_tops))
                if kind == first_stage:
                    first, tops = kind_first, kind_tops
            cands = [np.union1d(c, t) for c, t in zip(cands, tops)]
        cands = [np.unique(c) for c in cands]
        row_user = np.repeat(np.arange(rows.size), [c.size for c in cands])
        row_item = np.concatenate(cands)
        t0 = time.perf_counter()
        interest = interest_scores(user_emb[sl], text.item_embeddings, (row_user, row_item))  # the feature: as served
        feats = _features(ds, [user_ids[r] for r in rows[row_user]], t_test[rows[row_user]],
                          [split.item_ids[i] for i in row_item], interest, split.resolution_us)
        t_features += time.perf_counter() - t0
        offsets = np.r_[0, np.cumsum([c.size for c in cands])]
        for ranker in rankers:
            t0 = time.perf_counter()
            frame = feats
            if ranker.sequence_model is not None:  # its score of each candidate after seq[:-1], as in training
                states = last_states(ranker.sequence_model, [masked[r] for r in rows])
                score = np.einsum("rd,rd->r", states[row_user], ranker.sequence_vectors[row_item])
                frame = feats.with_columns(pl.Series("sequence_score", score.astype(np.float64)))
            scores = ranker.bundle.score(ranker.inputs.frame_matrix(frame))  # constants such as `position` applied
            own[ranker.name] += time.perf_counter() - t0
            for j, r in enumerate(rows):
                s, c = scores[offsets[j]: offsets[j + 1]], cands[j]
                if negatives is not None:
                    neg = negatives[r][negatives[r] >= 0]
                    st = s[np.searchsorted(c, targets[r])]
                    ranks[SAMPLED][ranker.name][r] = 1 + int((s[np.searchsorted(c, neg)] >= st).sum())
                if stage is not None:
                    ranks[FULL][ranker.name][r] = two_stage_rank(first[j], tops[j], s[np.searchsorted(c, tops[j])], int(targets[r]))
    shared = time.perf_counter() - t_start - sum(own.values())
    run = RankerRun(ranks=ranks, seconds={n: shared + v for n, v in own.items()},
                    descriptions={r.name: r.description(k, first_stage) for r in rankers}, same_day=same_day,
                    towers={r.name: text.tower.describe() for r in rankers})
    empty = sum(r.size == 0 for r in recent)
    run.notes.append(
        f"rankers ({', '.join(r.name for r in rankers)}): features at the test item's time, strictly before it; the "
        f"clock ticks every {res} µs and {int(same_day.sum())} of {users.size} users ({same_day.mean():.0%}) have their "
        f"validation item in the test item's tick: the user's own events of a tick are ordered by the sequence "
        f"(`training.data.loo.loo_data`), so the rankers see that item as the matrix models do, while other users' events "
        f"count only from earlier ticks; {empty} users have no engagement before the test item; shared cost "
        f"{shared:.1f} s (features {t_features:.1f} s)")
    if stage is not None:
        recall = {kind: round(h / users.size, 4) for kind, h in hits.items()}
        by_source = union.report()
        run.two_stage = {"k": k, "first_stage": first_stage, f"first_stage_recall@{k}": recall[first_stage],
                         f"recall@{k}_by_first_stage": recall, "sources": by_source,
                         "rankers": [r.name for r in rankers],
                         "rrf_k": RRF_K, "cooc_recent_items": COOC_ITEMS, "ease_lambda": EASE_LAMBDA, "ease_rrf_k": EASE_RRF_K,
                         "ease_items": int(stage.ease.items.size)}
        run.notes.append(
            f"full, rankers: two stages; first stage {first_stage} picks the top K={k} (history masked), LightGBM "
            f"re-orders them, the rest keep first-stage order below; first-stage recall@{k} (target among the K): "
            + ", ".join(f"{kind} {v:.4f}" for kind, v in recall.items())
            + f"; fusion = reciprocal ranks (k={RRF_K}; the ease stages k={EASE_RRF_K}); co-occurrence = item cosine "
              f"over the training part (every sequence without its test item), summed over the last {COOC_ITEMS} items "
              f"before the test time; ease = EASE (lambda {EASE_LAMBDA:g}) over the same part and items, "
              f"{stage.ease.items.size} items in its solve"
            + ("" if sequence is None else f"; sequence = {sequence.name}'s next-item scores after seq[:-1]"))
        run.notes.append(union_note(by_source))
    return run


def union_note(report: dict[str, Any]) -> str:
    """`SourceUnion.report` in a sentence."""
    k = report["k"]
    by_source = ", ".join(f"{name} {v:.4f}" for name, v in report["recall_by_source"].items())
    return (f"full, first-stage sources: recall@{k} alone {by_source}; "
            + "; ".join(f"the union of their top {u['depth']} lists {u['recall']:.4f} ({u['mean_items']:.0f} items a user)"
                        for u in report["unions"])
            + ": what a fusion of these sources can hold at all (training.lambdarank.first_stage.SourceUnion)")


def merge(run: EvalRun, extra: RankerRun) -> EvalRun:
    """Add the rankers' ranks, times and descriptions to a run of `evaluate` on the same users."""
    clash = set(extra.seconds) & set(run.seconds)
    if clash:
        raise ValueError(f"model name(s) used twice: {', '.join(sorted(clash))}; give each --ranker a distinct NAME")
    for protocol, by_model in extra.ranks.items():
        run.ranks[protocol].update(by_model)
    run.seconds.update(extra.seconds)
    run.descriptions.update(extra.descriptions)
    return run


def subset_notes(run: EvalRun, keep: np.ndarray, label: str) -> tuple[dict[str, dict[str, dict[str, float]]], list[str]]:
    """HR@10 and NDCG@10 of every model on the users where `keep` holds, per protocol (no CIs)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    notes: list[str] = []
    if keep.all() or not keep.any():  # the subset is everyone or no one: nothing to add
        return out, notes
    for protocol, by_model in run.ranks.items():
        out[protocol] = {}
        for name, r in by_model.items():
            m = rank_metrics(r[keep])
            out[protocol][name] = {"hr@10": round(float(m["hr@10"].mean()), 4), "ndcg@10": round(float(m["ndcg@10"].mean()), 4)}
        notes.append(f"{protocol}, {label} ({int(keep.sum())} users): "
                     + "; ".join(f"{n} HR@10 {v['hr@10']:.4f} NDCG@10 {v['ndcg@10']:.4f}" for n, v in out[protocol].items()))
    return out, notes


def text_side_for(ranker: RankerModel, models: Sequence[Any], load: Callable[[str, str, int], Any]) -> TextSide:
    """The ranker's encoder and item embeddings, with the bundle's own tower: reuse a loaded
    `EncoderScorer` with the same weights (by content, so a bundle's copy of an encoder matches) and
    max_length (e.g. encoder-frozen for "base"), else `load(name, model_dir, max_length)`."""
    from ranker.encoder import encoder_key

    ref = ranker.bundle.encoder
    model_dir = ref.resolve(ranker.bundle.path)
    want = encoder_key(model_dir, ref.max_length)
    for m in models:
        enc = getattr(m, "encoder", None)
        if (enc is not None and getattr(enc, "model_dir", None) is not None
                and encoder_key(enc.model_dir, getattr(enc, "max_length", -1)) == want):
            return TextSide(enc, m.item_embeddings, ranker.bundle.tower)
    name = "encoder-frozen" if model_dir == "base" else f"{ranker.name}-encoder"
    scorer = load(name, model_dir, ref.max_length)
    return TextSide(scorer.encoder, scorer.item_embeddings, ranker.bundle.tower)
