"""`semrank score`: offline batch scoring with the service's feature and scoring code.

    summary = run_score_job(ScoreJob(score=ScoreConfig(bundle, data, state_dir, as_of), input=IN, output=OUT))

1. The input is checked (columns, types) before any work, then planned into chunks of about
   `chunk_candidates` candidates that end on request boundaries (serving.batch.input).
2. `OUT/_manifest.json` records what the scores depend on: bundle version, as-of, the input's
   fingerprint, layout and chunking. A rerun into the same OUT resumes: chunks whose part file
   exists are skipped. If any of those changed, the rerun refuses (or starts over with
   `overwrite`).
3. Each chunk is read (only its row groups), scored (serving.batch.scorer: RankingEngine.rank per
   request) and written to `OUT/part-<chunk:06d>.parquet` atomically (temp file, fsync, rename).
   Local engine: chunk by chunk in this process; Ray engine: chunks spread over an actor pool
   (serving.batch.ray_engine), each actor building the engine once.

Peak memory is one chunk plus the engine's state, whatever the input size.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from featurizer.errors import ConfigError
from serving.batch.input import InputLayout, ParquetInput, plan_chunks
from serving.batch.output import MANIFEST, part_path, prepare_output, progress_bar, write_json_atomic, write_part
from serving.batch.scorer import ScoreConfig, Scorer, resolve_as_of

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class ScoreJob:
    score: ScoreConfig
    input: Path
    output: Path
    chunk_candidates: int = 100_000
    engine: str = "local"  # or "ray"
    overwrite: bool = False
    progress: bool = True
    ray_address: str | None = None  # None: the running Ray (ray.init() by the caller), else a local one
    ray_actors: int = 2
    ray_cpus_per_actor: float = 1.0


def _bundle_version(bundle_dir: Path) -> str:
    from ranker.bundle import load_bundle

    return load_bundle(bundle_dir).version


def _state_as_of(cfg: ScoreConfig) -> datetime:
    """The job's as-of from the state (Ray driver: without loading an encoder)."""
    from serving.ingest.restore import build_engine

    built = build_engine(cfg.data_dir, cfg.state_dir, None, clock=lambda: cfg.as_of, read_only=True,
                         pseudonyms=cfg.pseudonyms)
    try:
        return resolve_as_of(cfg.as_of, built.engine.online.watermark)
    finally:
        built.close()


def run_score_job(job: ScoreJob) -> dict:
    """Score `job.input` into `job.output` (see the module docstring); returns a summary."""
    t0 = time.perf_counter()
    inp = ParquetInput(job.input)
    layout = inp.layout()  # missing / mistyped columns fail here, before any work
    chunks = plan_chunks(inp, layout, job.chunk_candidates)
    log.info("input %s: %d rows (%s layout, request key %s), %d chunk(s)", inp.path, inp.num_rows, layout.kind,
             layout.key, len(chunks))
    scorer = None
    if job.engine == "local":
        scorer = Scorer(job.score)  # resolves as-of against the state; loads bundle and encoder
        as_of, version = scorer.as_of, scorer.bundle_version
    elif job.engine == "ray":
        as_of, version = _state_as_of(job.score), _bundle_version(job.score.bundle_dir)
    else:
        raise ConfigError(f"engine {job.engine!r}: expected 'local' or 'ray'")
    try:
        identity = {
            "bundle_version": version, "as_of": as_of.isoformat(), "input_fingerprint": inp.fingerprint(),
            "layout": layout.kind, "key": layout.key, "chunk_candidates": job.chunk_candidates,
            "n_chunks": len(chunks),
        }
        prepare_output(job.output, identity, job.overwrite)
        todo = [k for k in range(len(chunks)) if not part_path(job.output, k).exists()]
        log.info("%d chunk(s) to score, %d already done", len(todo), len(chunks) - len(todo))
        cfg = replace(job.score, as_of=as_of)
        t_score = time.perf_counter()
        if job.engine == "local":
            _run_local(scorer, inp, layout, chunks, todo, job)
            extra = {}
        else:
            from serving.batch.ray_engine import run_ray

            extra = run_ray(cfg, inp, layout, chunks, todo, job)
        score_seconds = time.perf_counter() - t_score
    finally:
        if scorer is not None:
            scorer.close()
    seconds = time.perf_counter() - t0
    rows = sum(chunks[k][1] - chunks[k][0] for k in todo)
    summary = {
        "output": str(job.output), "engine": job.engine, "bundle_version": version, "as_of": as_of.isoformat(),
        "rows": inp.num_rows, "chunks": len(chunks), "computed": todo, "skipped": len(chunks) - len(todo),
        "rows_scored": rows, "seconds": round(seconds, 3), "score_seconds": round(score_seconds, 3), **extra,
    }
    mf = job.output / MANIFEST
    write_json_atomic(mf, {**json.loads(mf.read_text()), "complete": True, "rows": inp.num_rows,
                            "finished_at": datetime.now(timezone.utc).isoformat(), "engine": job.engine,
                            "encoder": job.score.encoder})
    return summary


def _run_local(scorer: Scorer, inp: ParquetInput, layout: InputLayout, chunks: list[tuple[int, int]],
               todo: list[int], job: ScoreJob) -> None:
    with progress_bar(sum(chunks[k][1] - chunks[k][0] for k in todo), job.progress) as bar:
        for k in todo:
            start, stop = chunks[k]
            table = inp.read_rows(start, stop)
            scored = scorer.score_table(table, layout, start, where=str(inp.path))
            write_part(job.output, k, scored)
            del table, scored
            bar.update(stop - start)

