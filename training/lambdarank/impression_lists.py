"""Train the LightGBM lambdarank bundle on shown impression lists.

Steps: impression lists -> graded labels -> point-in-time behavioural features
-> interest score (frozen encoder: user-history text vs item text) -> time
split (train on the past, early-stop on the next days, test on the last days)
-> LightGBM lambdarank -> held-out table against baselines -> bundle.

The features and the interest score are computed one chunk of whole lists at a time
(`example_chunks`) into an on-disk `training.lambdarank.example_store.ExampleStore`, which LightGBM
reads back in batches: memory follows the chunk and LightGBM's binned dataset, plus the table of
shown lists (one row per impression of the event log; docs/training_at_scale.md).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import asdict
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl

from featurizer.contracts.schema import EVENT_STRENGTH, Dataset
from featurizer.definitions import CONTEXT_TRAINING_ONLY, NAMES
from featurizer.errors import SemrankError
from featurizer.offline.pipeline import offline_features, user_recent_items
from featurizer.text import item_text_expr
from ranker.bundle import EncoderRef, save_bundle
from ranker.encoder import Encoder
from ranker.feature_matrix import BundleInputs
from ranker.interest import interest_scores
from ranker.user_tower import UserTower, user_vectors
from training import tracking
from training.lambdarank.booster import train_lambdarank, truncate
from training.lambdarank.example_store import ExampleStore
from training.lambdarank.params import FEATURE_CHUNK_ROWS, VARIANTS, RankerTrainConfig
from training.ranking_metrics import mean_metrics

log = logging.getLogger(__name__)

# A click without request_id is credited to the user's latest list showing the item within this window.
ATTRIBUTION_WINDOW = timedelta(minutes=30)


class NoImpressionListsError(SemrankError, ValueError):
    """The events hold no shown lists to train on; the message says what to log."""

    grpc_code = "FAILED_PRECONDITION"
    reason = "NO_IMPRESSION_LISTS"


def impression_lists(events: pl.DataFrame) -> pl.DataFrame:
    """One row per shown (request_id, item): user_id, item_id, list time ts, position, graded label."""
    shown = (
        events.filter((pl.col("event") == "impression") & pl.col("request_id").is_not_null())
        .group_by(["request_id", "item_id"])
        .agg(pl.col("user_id").first(), pl.col("ts").min(), pl.col("position").min())
        .with_columns(pl.col("ts").min().over("request_id"))
    )
    if shown.is_empty():
        raise NoImpressionListsError(
            "the events have no impressions with a request_id; the ranker trains on shown lists "
            "(use `semrank data synth` data, or log impressions with request_id and position)"
        )
    strength = pl.col("event").cast(pl.Utf8).replace_strict(EVENT_STRENGTH, return_dtype=pl.Int8)
    eng = events.filter(pl.col("event") != "impression").with_columns(strength.alias("label"))
    direct = (
        eng.filter(pl.col("request_id").is_not_null()).group_by(["request_id", "item_id"]).agg(pl.col("label").max())
    )
    # Engagements logged without request_id: credit the latest list that showed the item to the user.
    loose = eng.filter(pl.col("request_id").is_null())
    if loose.height:
        lists = shown.select("user_id", "item_id", "request_id", pl.col("ts").alias("list_ts")).sort("list_ts")
        credited = (
            loose.sort("ts")
            .join_asof(lists, left_on="ts", right_on="list_ts", by=["user_id", "item_id"], strategy="backward", tolerance=ATTRIBUTION_WINDOW, check_sortedness=False)
            .filter(pl.col("request_id_right").is_not_null())
            .group_by(pl.col("request_id_right").alias("request_id"), "item_id")
            .agg(pl.col("label").max())
        )
        direct = pl.concat([direct, credited]).group_by(["request_id", "item_id"]).agg(pl.col("label").max())
    return (
        shown.join(direct, on=["request_id", "item_id"], how="left")
        .with_columns(pl.col("label").fill_null(0).cast(pl.Int32), pl.col("position").fill_null(0))
        .sort(["ts", "request_id", "position"])
    )


class ListInterest:
    """The interest score of shown (list, item) rows: the user vector of the history strictly before the
    list, by the bundle's tower (`ranker.user_tower`, as the service builds it), against the item
    text's vector, float32. The item texts are encoded once; `scores` takes any chunk of rows."""

    def __init__(self, encoder: Encoder, items: pl.DataFrame, events: pl.DataFrame, inputs: BundleInputs):
        self.texts = items.select("item_id", "title", item_text_expr())
        self.item_row = {i: k for k, i in enumerate(self.texts["item_id"].to_list())}
        log.info("encoding %d item texts", self.texts.height)
        self.item_emb = encoder.encode(self.texts["item_text"].to_list())
        self.encoder, self.events, self.items, self.tower = encoder, events, items, inputs.tower

    def scores(self, rows: pl.DataFrame) -> np.ndarray:
        lists = rows.select("request_id", "user_id", "ts").unique("request_id", maintain_order=True)
        hist = user_recent_items(self.events.lazy(), self.items.lazy(), lists.lazy(), self.tower.history_items).collect()
        histories = [[self.item_row.get(i, -1) for i in h] for h in hist["history"].to_list()]
        user_emb = user_vectors(self.tower, histories, self.item_emb, self.texts["title"].to_list(), self.encoder.encode)
        list_user = dict(zip(hist["request_id"].to_list(), range(len(histories))))
        u = np.fromiter((list_user[r] for r in rows["request_id"].to_list()), dtype=np.int64, count=rows.height)
        it = np.fromiter((self.item_row.get(i, -1) for i in rows["item_id"].to_list()), dtype=np.int64, count=rows.height)
        return interest_scores(user_emb, self.item_emb, (u, it))


def list_interest_scores(encoder: Encoder, items: pl.DataFrame, rows: pl.DataFrame, events: pl.DataFrame,
                         inputs: BundleInputs) -> np.ndarray:
    """`ListInterest` of all `rows` at once."""
    return ListInterest(encoder, items, events, inputs).scores(rows)


def list_chunks(rows: pl.DataFrame, chunk_rows: int) -> list[tuple[int, int]]:
    """(start, stop) of consecutive slices of about `chunk_rows` rows that end on list boundaries (rows
    of one `request_id` are consecutive in `impression_lists`' order)."""
    r = rows["request_id"]
    first = np.flatnonzero(np.r_[True, (r[1:] != r[:-1]).to_numpy()]) if rows.height else np.zeros(0, np.int64)
    bounds, start = [], 0
    for k in first[1:].tolist():
        if k - start >= chunk_rows:
            bounds.append((start, k))
            start = k
    if rows.height:
        bounds.append((start, rows.height))
    return bounds


def example_chunks(ds: Dataset, encoder: Encoder | None, inputs: BundleInputs, seed: int = 0,
                   chunk_rows: int = FEATURE_CHUNK_ROWS, rows: pl.DataFrame | None = None,
                   progress: bool = False) -> Iterator[pl.DataFrame]:
    """Impression-list rows with labels, the features of `featurizer.definitions` and position, one
    chunk of whole lists (about `chunk_rows` rows, in list time order) at a time: the interest score
    and the features are computed per chunk, so memory follows the chunk. `rows`: `impression_lists`
    when the caller has it.

    Rows of a list are shuffled (seeded): the shown order is the logging policy's, and
    clicks follow position, so a model whose scores tie must not inherit that order
    (in LightGBM's evaluation or ours, ties keep the row order). One seeded stream runs through the
    chunks, so they give the rows of one pass (`build_examples`).
    """
    from tqdm import tqdm

    rows = impression_lists(ds.events) if rows is None else rows
    interest = ListInterest(encoder, ds.items, ds.events, inputs) if encoder is not None else None
    shuffle = np.random.default_rng(seed)
    bounds = list_chunks(rows, chunk_rows)
    log.info("computing %d features for %d rows, %d chunk(s)", len(NAMES), rows.height, len(bounds))
    for a, b in tqdm(bounds, desc="examples", unit="chunk", disable=not progress, leave=False):
        chunk = rows.slice(a, b - a)
        if interest is not None:  # also for a bundle without text: the encoder is a baseline of the table
            chunk = chunk.with_columns(pl.Series("interest_score", interest.scores(chunk)))
        feats = offline_features(ds.events.lazy(), ds.items.lazy(), chunk.lazy()).collect()
        yield (
            feats.with_columns(pl.Series("_shuffle", shuffle.random(feats.height)), pl.col("position").cast(pl.Float32))
            .sort(["ts", "request_id", "_shuffle"])
            .drop("_shuffle")
        )


def build_examples(ds: Dataset, encoder: Encoder | None, inputs: BundleInputs, seed: int = 0,
                   chunk_rows: int = FEATURE_CHUNK_ROWS) -> pl.DataFrame:
    """Every chunk of `example_chunks` in one frame: for small data and tests."""
    return pl.concat(list(example_chunks(ds, encoder, inputs, seed, chunk_rows)))


def split_bounds(ts: pl.Series, test_days: float, valid_days: float) -> tuple[datetime, datetime]:
    """(valid start, test start): whole lists go to one part by list time, train < valid < test (never
    random); the test days are the last ones of `ts`."""
    end = ts.max()
    test_start = end - timedelta(days=test_days)
    return test_start - timedelta(days=valid_days), test_start


# Test-table baselines: a column scored alone (kept per test row by the example store).
BASELINES = {
    "logged-order": ("position", -1.0),
    "popularity": ("item_clicks_7d", 1.0),
    "encoder-frozen": ("interest_score", 1.0),
}


def evaluate_models(store: ExampleStore, booster) -> dict[str, dict[str, float]]:
    """Held-out metrics of the bundle (served inputs: the store's test part has the context at its
    constant) and its baselines on the same test lists."""
    labels, sizes = store.labels("test").astype(np.float64), store.sizes("test")
    candidates = {name: sign * store.column("test", col) for name, (col, sign) in BASELINES.items()}
    candidates["lightgbm-bundle"] = store.predict("test", booster, num_iteration=booster.best_iteration or None)
    return {name: mean_metrics(s, labels, sizes) for name, s in candidates.items()}


def train_ranker(ds: Dataset, out_dir: str | Path, cfg: RankerTrainConfig, encoder: Encoder, data_source: str = "",
                 tower: UserTower | None = None) -> dict:
    """Train, evaluate and write a bundle; returns the manifest extras (metrics included). `tower`:
    the user side of the interest score (None: `cfg.user_tower()`). The examples are computed and
    stored chunk by chunk (`example_chunks`, `training.lambdarank.example_store`)."""
    tower = tower or cfg.user_tower()
    t0 = time.monotonic()
    if cfg.variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {cfg.variant!r}")
    feature_names = [*VARIANTS[cfg.variant], *CONTEXT_TRAINING_ONLY]
    constants = {k: v for k, v in CONTEXT_TRAINING_ONLY.items() if k in feature_names}
    inputs = BundleInputs(feature_names, constants, tower, source="ranker training")
    rows = impression_lists(ds.events)
    valid_start, test_start = split_bounds(rows["ts"], cfg.test_days, cfg.valid_days)
    part_of = pl.when(pl.col("ts") < valid_start).then(pl.lit("train")).when(pl.col("ts") < test_start).then(
        pl.lit("valid")).otherwise(pl.lit("test"))
    spans = (rows.with_columns(part_of.alias("part")).group_by("part")
             .agg(pl.len().alias("rows"), pl.col("request_id").n_unique().alias("lists"), pl.col("ts").min().alias("start"),
                  pl.col("ts").max().alias("end")))
    span = {r["part"]: r for r in spans.iter_rows(named=True)}
    for name in ("train", "valid", "test"):
        if name not in span:
            raise ValueError(
                f"time split left '{name}' empty (data spans {rows['ts'].min()} .. {rows['ts'].max()}); "
                "lower --test-days/--valid-days or provide more days of events"
            )
    log.info("examples: %s", {k: span[k]["rows"] for k in ("train", "valid", "test")})
    with ExampleStore(inputs) as store:
        for chunk in example_chunks(ds, encoder, inputs, cfg.seed, cfg.feature_chunk_rows, rows, progress=True):
            part = chunk.with_columns(part_of.alias("_part"))
            for name in ("train", "valid"):
                store.add(name, part.filter(pl.col("_part") == name).drop("_part"))
            store.add("test", part.filter(pl.col("_part") == "test").drop("_part"), observed_context=False,
                      keep=[c for c, _ in BASELINES.values()])
        booster, params, evals = train_lambdarank(store, cfg)
        results = evaluate_models(store, booster)
    gain = booster.feature_importance("gain", iteration=booster.best_iteration or None)
    parts = ("train", "valid", "test")
    extra = {
        "training_data": {
            "source": data_source,
            "start": rows["ts"].min().isoformat(),
            "end": rows["ts"].max().isoformat(),
            "rows": {k: span[k]["rows"] for k in parts},
            "lists": {k: span[k]["lists"] for k in parts},
            "split": {k: [span[k]["start"].isoformat(), span[k]["end"].isoformat()] for k in parts},
        },
        "hyper_parameters": {**params, "num_boost_round": cfg.num_boost_round, "best_iteration": booster.best_iteration},
        "train_config": asdict(cfg),
        "variant": cfg.variant,
        "metrics": {"test": results, "valid_ndcg@10_curve": evals.get("valid", {}).get("ndcg@10", [])},
        "feature_importance_gain": dict(zip(feature_names, map(float, gain))),
        "inference_constants": constants,
        "train_seconds": round(time.monotonic() - t0, 1),
    }
    if booster.best_iteration:
        booster = truncate(booster)
    encoder_ref = EncoderRef(model_dir=cfg.encoder_dir, max_length=cfg.max_length, history_items=tower.history_items)
    if tracking.describe() is not None:  # the run that made this bundle (training.tracking)
        extra["tracking"] = tracking.describe()
    save_bundle(out_dir, booster, feature_names, encoder_ref, extra, tower=tower)
    return extra
