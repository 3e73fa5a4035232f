"""`semrank score --engine ray`: the chunks of a batch-scoring job spread over a Ray actor pool.

    ray.data.from_items(chunk plan) -> map_batches(ChunkScorer, compute=ActorPoolStrategy(size=N), batch_size=1)

Each actor builds the scorer once in `__init__` (engine, bundle runtime, encoder, catalog
embeddings from the shared state directory), then for each chunk it is handed reads that
chunk's rows from the input (only their row groups), scores them with the same code as the
local engine and writes `part-<chunk>.parquet` atomically; it returns one small row per chunk
for progress. The chunk plan (whole requests per chunk) and the part files are the local
engine's, so the two engines' outputs are interchangeable and a job can resume on either.

Why not `read_parquet -> map_batches` over the rows: Ray cuts blocks and batches by row count,
so a request could straddle two batches (two actors), and a sort-based group-by would not keep
the candidates' input order, which breaks score ties the same way the service does. Reading
planned row ranges keeps requests whole and ordered without a shuffle.

Every node needs the same paths: the input, the output directory, the bundle, the data and the
state directory on shared storage (see docs/batch_scoring.md).
"""

from __future__ import annotations

import logging
import resource
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from serving.batch.output import progress_bar, write_part

log = logging.getLogger(__name__)


class ChunkScorer:
    """A Ray Data actor: builds the scorer once, then scores and writes the chunks it is handed."""

    def __init__(self, cfg, input_path: str, output: str, layout):
        from serving.batch.input import ParquetInput
        from serving.batch.scorer import Scorer

        self.scorer = Scorer(cfg)
        self.input = ParquetInput(Path(input_path))
        self.output = Path(output)
        self.layout = layout

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows, seconds = [], []
        for k, start, stop in zip(batch["chunk"].tolist(), batch["start"].tolist(), batch["stop"].tolist()):
            t0 = time.perf_counter()
            table = self.input.read_rows(start, stop)
            scored = self.scorer.score_table(table, self.layout, start, where=str(self.input.path))
            write_part(self.output, k, scored)
            rows.append(stop - start)
            seconds.append(time.perf_counter() - t0)
        peak_kb = _peak_rss_kb()
        return {"chunk": batch["chunk"], "rows": np.array(rows, dtype=np.int64), "seconds": np.array(seconds),
                "peak_rss_kb": np.full(len(rows), peak_kb, dtype=np.int64)}


def _peak_rss_kb() -> int:
    """This process's peak RSS so far (VmHWM; getrusage's ru_maxrss can carry a forking parent's)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run_ray(cfg, inp, layout, chunks: list[tuple[int, int]], todo: list[int], job) -> dict:
    """Score the `todo` chunks on Ray (the running one, `job.ray_address`, or a local one);
    returns {"actor_peak_rss_mb": the largest peak RSS an actor reported}."""
    import ray

    if not todo:
        return {}
    started = False
    peak_kb = 0
    if not ray.is_initialized():
        if job.ray_address:
            ray.init(address=job.ray_address)
        else:
            ray.init(num_cpus=max(1, int(np.ceil(job.ray_actors * job.ray_cpus_per_actor))), include_dashboard=False)
        started = True
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # ours counts rows
        cfg = replace(cfg, bundle_dir=Path(cfg.bundle_dir).resolve(), data_dir=Path(cfg.data_dir).resolve(),
                      state_dir=Path(cfg.state_dir).resolve(),
                      threads=cfg.threads or max(1, int(job.ray_cpus_per_actor)))
        plan = [{"chunk": k, "start": chunks[k][0], "stop": chunks[k][1]} for k in todo]
        ds = ray.data.from_items(plan, override_num_blocks=len(plan))
        scored = ds.map_batches(
            ChunkScorer,
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=max(1, min(job.ray_actors, len(todo)))),
            num_cpus=job.ray_cpus_per_actor,
            fn_constructor_kwargs={"cfg": cfg, "input_path": str(Path(inp.path).resolve()),
                                   "output": str(Path(job.output).resolve()), "layout": layout},
        )
        with progress_bar(sum(chunks[k][1] - chunks[k][0] for k in todo), job.progress) as bar:
            for out in scored.iter_batches(batch_size=None, batch_format="numpy"):
                bar.update(int(out["rows"].sum()))
                peak_kb = max(peak_kb, int(out["peak_rss_kb"].max()))
    finally:
        if started:
            ray.shutdown()
    return {"actor_peak_rss_mb": round(peak_kb / 1024, 1)}
