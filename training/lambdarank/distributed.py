"""Ranker training on a Ray cluster: LightGBM's own data-parallel mode, one Ray actor per machine slot
(issue 32 item 2; `semrank train ranker --engine ray`).

    booster, params, evals = train_lambdarank_ray((X, y, sizes), (Xv, yv, sizes_v), names, cfg, RayTraining(workers=2), params)

- **The engine**: LightGBM's distributed training (`tree_learner=data` over its socket network), not
  Ray Train's LightGBM trainer: the same `lightgbm` package and parameters as single-process training,
  so a bundle is the same kind of model whichever way it was trained, and nothing but Ray itself is
  needed on the nodes. Ray places the workers, tells each its node's address and a free port, ships
  each its shard, and collects the model.
- **Shards**: whole query groups, dealt round-robin in group order (`shard_groups`): a group is never
  split across workers (lambdarank's gradients are per group). LightGBM builds the feature bins from
  every worker's rows together (`pre_partition`), so the trees see the same bins as one process would.
- **Early stopping**: every worker holds the whole validation set, so each computes the same NDCG@10
  and they stop at the same round; worker 0's model is the result.
- The driver builds the feature matrices (as the single-process path) and `ray.put`s each shard; on a
  cluster the shards travel to the workers' nodes through Ray's object store.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from training.lambdarank.params import LightGBMParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RayTraining:
    workers: int = 2
    cpus_per_worker: int = 1
    address: str | None = None  # a cluster to join ("auto", "ray://..."); None: the running Ray, else a local one
    time_out_min: int = 5  # LightGBM's socket time-out (minutes) while the workers connect and exchange

    def __post_init__(self) -> None:
        if self.workers < 1 or self.cpus_per_worker < 1 or self.time_out_min < 1:
            raise ValueError(f"RayTraining needs workers, cpus_per_worker and time_out_min >= 1, got {self}")


def shard_groups(sizes: np.ndarray, workers: int) -> list[np.ndarray]:
    """Row indices of each worker's shard: whole groups (consecutive rows, `sizes` each), dealt
    round-robin in group order, so every shard has a spread of the data and no group is split."""
    sizes = np.asarray(sizes, dtype=np.int64)  # (polars counts are unsigned: mixed with 0 they would turn float)
    starts = np.r_[0, np.cumsum(sizes)[:-1]]
    out = []
    for w in range(workers):
        groups = np.arange(w, sizes.size, workers)
        out.append(np.concatenate([np.arange(starts[g], starts[g] + sizes[g]) for g in groups])
                   if groups.size else np.zeros(0, np.int64))
    return out


def _worker_class():
    import ray

    @ray.remote
    class LightGBMWorker:
        """One machine of LightGBM's network: its address, then its shard's training."""

        def address(self) -> tuple[str, int]:
            import socket

            with socket.socket() as s:  # a free port on this node (bound again by LightGBM just after)
                s.bind(("", 0))
                port = s.getsockname()[1]
            return ray.util.get_node_ip_address(), port

        def fit(self, params: dict, shard: tuple, valid: tuple, feature_names: list[str], num_boost_round: int,
                early_stopping_rounds: int) -> tuple[str, int, dict]:
            import lightgbm as lgb

            X, y, g = shard
            Xv, yv, gv = valid
            dtrain = lgb.Dataset(X, label=y, group=g, feature_name=feature_names, free_raw_data=False)
            dvalid = lgb.Dataset(Xv, label=yv, group=gv, feature_name=feature_names, reference=dtrain)
            evals: dict = {}
            booster = lgb.train(params, dtrain, num_boost_round=num_boost_round, valid_sets=[dvalid],
                                valid_names=["valid"],
                                callbacks=[lgb.early_stopping(early_stopping_rounds, verbose=False),
                                           lgb.record_evaluation(evals)])
            return booster.model_to_string(), booster.best_iteration, evals

    return LightGBMWorker


def train_lambdarank_ray(train: tuple[np.ndarray, np.ndarray, np.ndarray], valid: tuple[np.ndarray, np.ndarray, np.ndarray],
                         feature_names: list[str], cfg: LightGBMParams, ray_cfg: RayTraining, params: dict):
    """`training.lambdarank.booster.train_lambdarank` on Ray workers (see the module docstring).
    `train` and `valid` are (matrix, labels, group sizes) with the groups' rows consecutive; `params`
    are the single-process ones. Returns (booster, params as trained, evals)."""
    import lightgbm as lgb
    import ray

    X, y, sizes = train
    sizes = np.asarray(sizes, dtype=np.int64)
    if sizes.size < ray_cfg.workers:
        raise ValueError(f"{sizes.size} training groups for {ray_cfg.workers} workers: every worker needs a group")
    shards = shard_groups(sizes, ray_cfg.workers)
    started = False
    if not ray.is_initialized():
        if ray_cfg.address:
            ray.init(address=ray_cfg.address)
        else:
            ray.init(num_cpus=ray_cfg.workers * ray_cfg.cpus_per_worker, include_dashboard=False)
        started = True
    try:
        worker = _worker_class()
        workers = [worker.options(num_cpus=ray_cfg.cpus_per_worker).remote() for _ in range(ray_cfg.workers)]
        addresses = ray.get([w.address.remote() for w in workers])
        machines = ",".join(f"{ip}:{port}" for ip, port in addresses)
        trained = {**params, "tree_learner": "data", "num_machines": ray_cfg.workers, "machines": machines,
                   "pre_partition": True, "num_threads": ray_cfg.cpus_per_worker, "time_out": ray_cfg.time_out_min}
        valid_ref = ray.put(valid)
        futures = []
        for k, (w, rows, (_, port)) in enumerate(zip(workers, shards, addresses)):
            shard = ray.put((X[rows], y[rows], sizes[k::ray_cfg.workers]))  # worker k's groups, as shard_groups deals them
            futures.append(w.fit.remote({**trained, "local_listen_port": port}, shard, valid_ref,
                                        feature_names, cfg.num_boost_round, cfg.early_stopping_rounds))
        log.info("LightGBM on Ray: %d workers (%s), %d groups dealt round-robin, %d / %d rows", ray_cfg.workers,
                 machines, sizes.size, *(len(r) for r in shards[:2]))
        results = ray.get(futures)
    finally:
        if started:
            ray.shutdown()
    model, best, evals = results[0]
    if len({r[1] for r in results}) != 1:  # the same validation set everywhere: they must agree
        raise RuntimeError(f"the workers stopped at different rounds: {[r[1] for r in results]}")
    booster = lgb.Booster(model_str=model)
    booster.best_iteration = best
    public = {k: v for k, v in trained.items() if k not in ("machines", "local_listen_port")}
    return booster, public, evals
