"""Ranker training on a Ray cluster: LightGBM's own data-parallel mode, one Ray actor per machine slot
(issue 32 item 2; `semrank train ranker --engine ray`).

    booster, params, evals = train_lambdarank_ray(store, cfg, RayTraining(workers=2), params)

- **The engine**: LightGBM's distributed training (`tree_learner=data` over its socket network), not
  Ray Train's LightGBM trainer: the same `lightgbm` package and parameters as single-process training,
  so a bundle is the same kind of model whichever way it was trained, and nothing but Ray itself is
  needed on the nodes. Ray places the workers, tells each its node's address and a free port, ships
  each its shard, and collects the model.
- **Shards**: whole query groups, dealt round-robin in group order (`shard_owner`): a group is never
  split across workers (lambdarank's gradients are per group). LightGBM builds the feature bins from
  every worker's rows together (`pre_partition`), so the trees see the same bins as one process would.
- **Early stopping**: every worker holds the whole validation set, so each computes the same NDCG@10
  and they stop at the same round; worker 0's model is the result.
- **Memory**: the driver builds the examples into its `ExampleStore` (as the single-process path) and
  deals them batch by batch (`deal`): each batch's rows of a worker go to Ray's object store as one
  object, so the driver never holds more than a batch; a worker reads its batches as
  `lightgbm.Sequence`s, so beside the object store (shared memory, spilled to disk when full) it holds
  its binned shard. On a cluster the batches travel to the workers' nodes through the object store.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from training.lambdarank.params import LightGBMParams

if TYPE_CHECKING:
    from training.lambdarank.example_store import ExampleStore

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


def shard_owner(sizes: np.ndarray, workers: int) -> np.ndarray:
    """The worker of each row: whole groups (consecutive rows, `sizes` each) dealt round-robin in group
    order, so every shard has a spread of the data and no group is split."""
    sizes = np.asarray(sizes, dtype=np.int64)  # (polars counts are unsigned: mixed with 0 they would turn float)
    return np.repeat((np.arange(sizes.size) % workers).astype(np.int32), sizes)


def deal(batches: Iterable[np.ndarray], owner: np.ndarray, workers: int, put: Callable[[np.ndarray], object]) -> list[list]:
    """Each worker's rows, batch by batch: `put` (Ray's object store) takes one batch's rows of one
    worker at a time, so the caller never holds more than a batch. Returns per worker the list of what
    `put` returned, in row order."""
    out: list[list] = [[] for _ in range(workers)]
    start = 0
    for X in batches:
        mine = owner[start: start + X.shape[0]]
        for w in range(workers):
            rows = X[mine == w]
            if rows.shape[0]:
                out[w].append(put(rows))
        start += X.shape[0]
    if start != owner.size:
        raise ValueError(f"the batches held {start} rows, the groups {owner.size}")
    return out


def _worker_class():
    import ray

    @ray.remote
    class LightGBMWorker:
        """One machine of LightGBM's network: its address, then its shard's training. Defined here and
        shipped by value, so a node needs Ray and LightGBM, not semrank."""

        def address(self) -> tuple[str, int]:
            import socket

            with socket.socket() as s:  # a free port on this node (bound again by LightGBM just after)
                s.bind(("", 0))
                port = s.getsockname()[1]
            return ray.util.get_node_ip_address(), port

        def fit(self, params: dict, shard: tuple, valid: tuple, feature_names: list[str], num_boost_round: int,
                early_stopping_rounds: int) -> tuple[str, int, dict]:
            """`shard` and `valid`: (object refs of row batches, labels, group sizes). LightGBM reads the
            batches as `lightgbm.Sequence`s, so beside the object store only its binned dataset is whole."""
            import numbers

            import lightgbm as lgb

            class Rows(lgb.Sequence):  # one batch of rows
                def __init__(self, X):
                    self.X, self.batch_size = X, max(1, X.shape[0])

                def __len__(self):
                    return self.X.shape[0]

                def __getitem__(self, idx):  # one row as doubles (LightGBM samples bins from them), or a slice
                    return self.X[idx].astype(np.float64) if isinstance(idx, numbers.Integral) else self.X[idx]

            class Dataset(lgb.Dataset):  # every training parameter, as training.lambdarank.example_store's
                def get_params(self):
                    return dict(self.params) if self.params else super().get_params()

            def dataset(part, reference=None):
                refs, y, g = part
                return Dataset([Rows(X) for X in ray.get(refs)], label=y, group=g, feature_name=feature_names,
                               reference=reference, params=params, free_raw_data=False)

            dtrain = dataset(shard)
            dvalid = dataset(valid, reference=dtrain)
            evals: dict = {}
            booster = lgb.train(params, dtrain, num_boost_round=num_boost_round, valid_sets=[dvalid],
                                valid_names=["valid"],
                                callbacks=[lgb.early_stopping(early_stopping_rounds, verbose=False),
                                           lgb.record_evaluation(evals)])
            return booster.model_to_string(), booster.best_iteration, evals

    return LightGBMWorker


def train_lambdarank_ray(store: ExampleStore, cfg: LightGBMParams, ray_cfg: RayTraining, params: dict):
    """`training.lambdarank.booster.train_lambdarank` on Ray workers (see the module docstring), from the
    store's "train" and "valid" parts; `params` are the single-process ones. Returns (booster, params as
    trained, evals)."""
    import lightgbm as lgb
    import ray

    sizes = np.asarray(store.sizes("train"), dtype=np.int64)
    if sizes.size < ray_cfg.workers:
        raise ValueError(f"{sizes.size} training groups for {ray_cfg.workers} workers: every worker needs a group")
    owner, labels = shard_owner(sizes, ray_cfg.workers), store.labels("train")
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
        shards = deal(store.batches("train"), owner, ray_cfg.workers, ray.put)
        valid = (deal(store.batches("valid"), np.zeros(store.rows("valid"), np.int32), 1, ray.put)[0],
                 store.labels("valid"), store.sizes("valid"))
        futures = []
        for k, (w, refs, (_, port)) in enumerate(zip(workers, shards, addresses)):
            shard = (refs, labels[owner == k], sizes[k::ray_cfg.workers])  # worker k's groups, as shard_owner deals them
            futures.append(w.fit.remote({**trained, "local_listen_port": port}, shard, valid,
                                        store.inputs.feature_names, cfg.num_boost_round, cfg.early_stopping_rounds))
        log.info("LightGBM on Ray: %d workers (%s), %d groups dealt round-robin, rows per worker %s", ray_cfg.workers,
                 machines, sizes.size, np.bincount(owner, minlength=ray_cfg.workers).tolist())
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
