"""Train the LightGBM lambdarank bundle on shown impression lists.

Steps: impression lists -> graded labels -> point-in-time behavioural features
-> interest score (frozen encoder: user-history text vs item text) -> time
split (train on the past, early-stop on the next days, test on the last days)
-> LightGBM lambdarank -> held-out table against baselines -> bundle.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from datetime import timedelta
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
from training.lambdarank.booster import (
    group_sizes,
    train_lambdarank,
    truncate,
    with_positives,
)
from training.lambdarank.params import VARIANTS, RankerTrainConfig
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


def list_interest_scores(encoder: Encoder, items: pl.DataFrame, rows: pl.DataFrame, events: pl.DataFrame,
                         inputs: BundleInputs) -> np.ndarray:
    """The interest score of each shown (list, item) row: the user vector of the history strictly
    before the list, by the bundle's tower (`ranker.user_tower`, as the service builds it), against
    the item text's vector, float32."""
    texts = items.select("item_id", "title", item_text_expr())
    item_row = {i: k for k, i in enumerate(texts["item_id"].to_list())}
    log.info("encoding %d item texts", texts.height)
    item_emb = encoder.encode(texts["item_text"].to_list())

    tower = inputs.tower
    lists = rows.select("request_id", "user_id", "ts").unique("request_id", maintain_order=True)
    hist = user_recent_items(events.lazy(), items.lazy(), lists.lazy(), tower.history_items).collect()
    histories = [[item_row.get(i, -1) for i in h] for h in hist["history"].to_list()]
    log.info("user vectors (%s) for %d lists", tower.describe(), lists.height)
    user_emb = user_vectors(tower, histories, item_emb, texts["title"].to_list(), encoder.encode)
    list_user = dict(zip(hist["request_id"].to_list(), range(len(histories))))
    u = np.fromiter((list_user[r] for r in rows["request_id"].to_list()), dtype=np.int64, count=rows.height)
    it = np.fromiter((item_row.get(i, -1) for i in rows["item_id"].to_list()), dtype=np.int64, count=rows.height)
    return interest_scores(user_emb, item_emb, (u, it))


def build_examples(ds: Dataset, encoder: Encoder | None, inputs: BundleInputs, seed: int = 0) -> pl.DataFrame:
    """Impression-list rows with labels, the features of `featurizer.definitions` and position.

    Rows of a list are shuffled (seeded): the shown order is the logging policy's, and
    clicks follow position, so a model whose scores tie must not inherit that order
    (in LightGBM's evaluation or ours, ties keep the row order).
    """
    rows = impression_lists(ds.events)
    if encoder is not None:  # also for a bundle without text: the encoder is a baseline of the table
        rows = rows.with_columns(pl.Series("interest_score", list_interest_scores(encoder, ds.items, rows, ds.events, inputs)))
    log.info("computing %d features for %d rows", len(NAMES), rows.height)
    feats = offline_features(ds.events.lazy(), ds.items.lazy(), rows.lazy()).collect()
    shuffle = np.random.default_rng(seed).random(feats.height)
    return (
        feats.with_columns(pl.Series("_shuffle", shuffle), pl.col("position").cast(pl.Float32))
        .sort(["ts", "request_id", "_shuffle"])
        .drop("_shuffle")
    )


def time_split(examples: pl.DataFrame, test_days: float, valid_days: float) -> dict[str, pl.DataFrame]:
    """Whole lists go to one part by list time: train < valid < test (never random)."""
    end = examples["ts"].max()
    test_start = end - timedelta(days=test_days)
    valid_start = test_start - timedelta(days=valid_days)
    parts = {
        "train": examples.filter(pl.col("ts") < valid_start),
        "valid": examples.filter((pl.col("ts") >= valid_start) & (pl.col("ts") < test_start)),
        "test": examples.filter(pl.col("ts") >= test_start),
    }
    for name, part in parts.items():
        if part.is_empty():
            raise ValueError(
                f"time split left '{name}' empty (data spans {examples['ts'].min()} .. {end}); "
                "lower --test-days/--valid-days or provide more days of events"
            )
    return parts


def evaluate_models(test: pl.DataFrame, booster, inputs: BundleInputs) -> dict[str, dict[str, float]]:
    """Held-out metrics of the bundle (served inputs: the context at its constant) and its baselines
    on the same test lists."""
    test = with_positives(test)
    labels = test["label"].to_numpy().astype(np.float64)
    sizes = group_sizes(test)
    X = inputs.frame_matrix(test)
    candidates = {
        "logged-order": -test["position"].to_numpy().astype(np.float64),
        "popularity": test["item_clicks_7d"].to_numpy().astype(np.float64),
        "encoder-frozen": test["interest_score"].to_numpy().astype(np.float64),
        "lightgbm-bundle": booster.predict(X, num_iteration=booster.best_iteration or None),
    }
    return {name: mean_metrics(s, labels, sizes) for name, s in candidates.items()}


def train_ranker(ds: Dataset, out_dir: str | Path, cfg: RankerTrainConfig, encoder: Encoder, data_source: str = "",
                 tower: UserTower | None = None) -> dict:
    """Train, evaluate and write a bundle; returns the manifest extras (metrics included). `tower`:
    the user side of the interest score (None: `cfg.user_tower()`)."""
    tower = tower or cfg.user_tower()
    t0 = time.monotonic()
    if cfg.variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {cfg.variant!r}")
    feature_names = [*VARIANTS[cfg.variant], *CONTEXT_TRAINING_ONLY]
    constants = {k: v for k, v in CONTEXT_TRAINING_ONLY.items() if k in feature_names}
    inputs = BundleInputs(feature_names, constants, tower, source="ranker training")
    examples = build_examples(ds, encoder, inputs, cfg.seed)
    parts = time_split(examples, cfg.test_days, cfg.valid_days)
    log.info("examples: %s", {k: v.height for k, v in parts.items()})
    booster, params, evals = train_lambdarank(parts["train"], parts["valid"], cfg, inputs)
    results = evaluate_models(parts["test"], booster, inputs)
    gain = booster.feature_importance("gain", iteration=booster.best_iteration or None)
    extra = {
        "training_data": {
            "source": data_source,
            "start": examples["ts"].min().isoformat(),
            "end": examples["ts"].max().isoformat(),
            "rows": {k: v.height for k, v in parts.items()},
            "lists": {k: int(v["request_id"].n_unique()) for k, v in parts.items()},
            "split": {name: [p["ts"].min().isoformat(), p["ts"].max().isoformat()] for name, p in parts.items()},
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
