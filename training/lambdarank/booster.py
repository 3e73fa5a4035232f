"""The LightGBM side of ranker training, shared by both modes (impression lists and leave-one-out).

- `train_lambdarank`: lambdarank with early stopping on NDCG@10, on matrices from
  `ranker.feature_matrix.BundleInputs` (the columns the bundle will be served with);
- `truncate`, `format_table`.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from ranker.feature_matrix import BundleInputs
from training import tracking
from training.lambdarank.params import LightGBMParams


def group_sizes(df: pl.DataFrame) -> np.ndarray:
    # rows are sorted by (ts, request_id, ...): consecutive runs of request_id are groups
    return df.group_by("request_id", maintain_order=True).len()["len"].to_numpy()


def with_positives(df: pl.DataFrame) -> pl.DataFrame:
    return df.filter((pl.col("label") > 0).any().over("request_id"))


def train_lambdarank(train: pl.DataFrame, valid: pl.DataFrame, cfg: LightGBMParams, inputs: BundleInputs):
    """Lambdarank on groups of consecutive `request_id` rows with a `label`; groups without a positive
    are dropped. The matrices are `inputs.frame_matrix` with the observed training-only context.
    `cfg.engine` "ray": on Ray workers (`training.lambdarank.distributed`)."""
    import lightgbm as lgb

    params = {
        "objective": "lambdarank",
        "metric": "ndcg",
        "eval_at": [10],
        "learning_rate": cfg.learning_rate,
        "num_leaves": cfg.num_leaves,
        "min_data_in_leaf": cfg.min_data_in_leaf,
        "feature_fraction": 0.9,
        "bagging_fraction": 0.8,
        "bagging_freq": 1,
        "lambdarank_truncation_level": 20,
        "seed": cfg.seed,
        "deterministic": True,
        "force_row_wise": True,
        "num_threads": cfg.num_threads,
        "verbosity": -1,
    }
    train, valid = with_positives(train), with_positives(valid)
    if cfg.engine == "ray":
        from training.lambdarank.distributed import RayTraining, train_lambdarank_ray

        def arrays(df):
            return inputs.frame_matrix(df, observed_context=True), df["label"].to_numpy(), group_sizes(df)

        booster, params, evals = train_lambdarank_ray(arrays(train), arrays(valid), inputs.feature_names, cfg, RayTraining(
            workers=cfg.ray_workers, cpus_per_worker=max(1, cfg.num_threads // cfg.ray_workers),
            address=cfg.ray_address), params)
        for step, value in enumerate(evals.get("valid", {}).get("ndcg@10", []), 1):
            tracking.scalar("valid/ndcg@10", value, step)
        return booster, params, evals

    def dataset(df, ref=None):
        return lgb.Dataset(
            inputs.frame_matrix(df, observed_context=True),
            label=df["label"].to_numpy(),
            group=group_sizes(df),
            feature_name=inputs.feature_names,
            reference=ref,
            free_raw_data=False,
        )

    dtrain = dataset(train)
    dvalid = dataset(valid, dtrain)
    evals: dict = {}
    booster = lgb.train(
        params,
        dtrain,
        num_boost_round=cfg.num_boost_round,
        valid_sets=[dvalid],
        valid_names=["valid"],
        callbacks=[lgb.early_stopping(cfg.early_stopping_rounds, verbose=False), lgb.record_evaluation(evals),
                   lgb.log_evaluation(50), tracking.lightgbm_callback()],
    )
    return booster, params, evals


def format_table(results: dict[str, dict[str, float]]) -> str:
    cols = ["ndcg@10", "hr@10", "ndcg@5", "mrr", "auc"]
    lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, m in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{m[c]:.4f}" for c in cols) + " |")
    return "\n".join(lines)


def truncate(booster):
    """Keep only the trees up to the early-stopping best iteration."""
    import lightgbm as lgb

    return lgb.Booster(model_str=booster.model_to_string(num_iteration=booster.best_iteration))
