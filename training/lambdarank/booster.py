"""The LightGBM side of ranker training, shared by both modes (impression lists and leave-one-out).

- `train_lambdarank`: lambdarank with early stopping on NDCG@10, on the examples of a
  `training.lambdarank.example_store.ExampleStore` (the bundle's matrix, read back in batches);
- `truncate`, `format_table`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from training import tracking
from training.lambdarank.params import LightGBMParams

if TYPE_CHECKING:
    from training.lambdarank.example_store import ExampleStore


def train_lambdarank(store: ExampleStore, cfg: LightGBMParams):
    """Lambdarank on the store's "train" part, early stopping on NDCG@10 of its "valid" part
    (`training.lambdarank.example_store`: the bundle's matrix with the observed training-only
    context; groups without a positive were dropped there). LightGBM reads the rows in batches, so
    only its binned dataset is whole in memory. `cfg.engine` "ray": on Ray workers
    (`training.lambdarank.distributed`), which take their shards as arrays."""
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
    if cfg.engine == "ray":
        from training.lambdarank.distributed import RayTraining, train_lambdarank_ray

        ray_cfg = RayTraining(workers=cfg.ray_workers, address=cfg.ray_address, cpus_per_worker=max(1, cfg.num_threads // cfg.ray_workers))
        booster, params, evals = train_lambdarank_ray(store, cfg, ray_cfg, params)
        for step, value in enumerate(evals.get("valid", {}).get("ndcg@10", []), 1):
            tracking.scalar("valid/ndcg@10", value, step)
        return booster, params, evals

    dtrain = store.dataset("train")
    dvalid = store.dataset("valid", reference=dtrain)
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
