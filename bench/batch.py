"""Batch scoring throughput and memory: `semrank score` with the local and the Ray engine.

    .venv/bin/python bench/batch.py [--rows 1000000] [--rss-rows 1000000 10000000] [--engines local ray]
                                    [--budget-min 20] [--workdir runs/bench-batch]

Set-up (cached in --workdir): a synthetic shop (default 1,500 users, 800 items, 28 days), a
bundle trained on it, the catalog embedded into a state directory (`embed-catalog`). Inputs are
generated in slices of 10,000 requests (users of the shop plus 5% cold-start users x 100
distinct candidate items each, row groups of 100,000 rows), so generating 10M rows stays small.

Each run is a fresh subprocess (`--child`) that runs the job into a new output directory and
reports its own peak RSS (VmHWM); the Ray engine also reports the largest actor's. Runs:
1. throughput: every engine on --rows rows;
2. memory: the local engine on each of --rss-rows; peak RSS should not grow with the input
   (it is bounded by the chunk, --batch-size). Sizes whose projected time (from the measured
   local rows/s) would overrun --budget-min are replaced by the largest size that fits, and
   the JSON says so.

Prints one JSON object per run: engine, rows, rows_per_s (scoring only: engine start-up
excluded, reported as startup_s), peak_rss_mb, the hardware and the 1-minute load average
before and after the run (a shared 2-core machine is noisy: compare runs of one invocation).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from machine import machine  # bench/ is sys.path[0]

ROOT = Path(__file__).resolve().parents[1]
REQUESTS_PER_SLICE = 10_000
ROW_GROUP = 100_000


def hardware() -> dict:
    return machine()


def setup(work: Path, users: int, items: int, days: int, seed: int) -> dict:
    """Shop, bundle and embedded catalog, built once per workdir."""
    shop, bundle, state = work / "shop", work / "bundle", work / "state"
    if not (bundle / "manifest.json").is_file():
        from featurizer.contracts.schema import read_dataset
        from ranker.encoder import TextEncoder
        from training.data.synth import SynthConfig, synthesize
        from training.lambdarank.impression_lists import train_ranker
        from training.lambdarank.params import RankerTrainConfig

        synthesize(shop, seed=seed, config=SynthConfig(n_users=users, n_items=items, n_days=days))
        train_ranker(read_dataset(shop), bundle, RankerTrainConfig(seed=seed), TextEncoder(max_length=128),
                     data_source=str(shop))
    subprocess.run([sys.executable, "-m", "semrank.cli", "embed-catalog", "--bundle", str(bundle), "--data", str(shop),
                    "--state-dir", str(state), "--no-progress"], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return {"shop": shop, "bundle": bundle, "state": state}


def make_input(path: Path, shop: Path, rows: int, per_request: int, seed: int) -> Path:
    """rows / per_request requests (request_id, user_id, item_id), written slice by slice."""
    if path.is_file():
        return path
    import pyarrow as pa
    import pyarrow.parquet as pq

    from featurizer.contracts.schema import read_dataset

    ds = read_dataset(shop)
    users = np.array(ds.events["user_id"].unique().sort().to_list())
    items = np.array(ds.items["item_id"].to_list())
    if per_request > len(items):
        raise SystemExit(f"--per-request {per_request} exceeds the catalog ({len(items)} items)")
    rng = np.random.default_rng(seed)
    n_req = rows // per_request
    tmp = path.with_name(f".{path.name}.tmp")
    schema = pa.schema([("request_id", pa.string()), ("user_id", pa.string()), ("item_id", pa.string())])
    with pq.ParquetWriter(tmp, schema) as w:
        for first in range(0, n_req, REQUESTS_PER_SLICE):
            n = min(REQUESTS_PER_SLICE, n_req - first)
            u = users[rng.integers(0, len(users), n)].astype(object)
            cold = rng.random(n) < 0.05
            u[cold] = [f"cold-{first + k}" for k in np.flatnonzero(cold)]
            # per_request distinct items per request: the first columns of a random permutation
            cand = np.argsort(rng.random((n, len(items))), axis=1)[:, :per_request]
            t = pa.table({"request_id": np.repeat([f"q{first + k}" for k in range(n)], per_request),
                          "user_id": np.repeat(u.astype(str), per_request), "item_id": items[cand].ravel()},
                         schema=schema)
            w.write_table(t, row_group_size=ROW_GROUP)
    os.replace(tmp, path)
    return path


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM). Not getrusage's ru_maxrss: Linux carries that over exec from
    the forked parent's memory, so a child of a big parent would report the parent's size."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args) -> None:
    """One job in this process; prints its JSON result."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    from serving.batch.job import ScoreJob, run_score_job
    from serving.batch.scorer import ScoreConfig

    t0 = time.perf_counter()
    cfg = ScoreConfig(bundle_dir=args.bundle, data_dir=args.data, state_dir=args.state)
    job = ScoreJob(score=cfg, input=args.input, output=args.output, chunk_candidates=args.batch_size,
                   engine=args.engine, progress=False, overwrite=True, ray_actors=args.ray_actors)
    if args.engine == "ray":
        import ray

        ray.init(num_cpus=len(os.sched_getaffinity(0)), include_dashboard=False, log_to_driver=False)
    try:
        s = run_score_job(job)
    finally:
        if args.engine == "ray":
            ray.shutdown()
    wall = time.perf_counter() - t0
    peak = peak_rss_mb()
    print(json.dumps({"rows": s["rows_scored"], "score_seconds": s["score_seconds"], "wall_s": round(wall, 2),
                      "startup_s": round(wall - s["score_seconds"], 2), "peak_rss_mb": round(peak, 1),
                      "actor_peak_rss_mb": s.get("actor_peak_rss_mb")}))


def run(engine: str, rows: int, inp: Path, env: dict, args) -> dict:
    out = args.workdir / f"out-{engine}-{rows}"
    load0 = os.getloadavg()[0]
    cmd = [sys.executable, __file__, "--child", "--engine", engine, "--input", str(inp), "--output", str(out),
           "--bundle", str(env["bundle"]), "--data", str(env["shop"]), "--state", str(env["state"]),
           "--batch-size", str(args.batch_size), "--ray-actors", str(args.ray_actors)]
    res = subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True)
    r = json.loads(res.stdout.strip().splitlines()[-1])
    rec = {"engine": engine, "rows": r["rows"], "rows_per_s": round(r["rows"] / r["score_seconds"], 1),
           "peak_rss_mb": r["peak_rss_mb"], "startup_s": r["startup_s"], "wall_s": r["wall_s"],
           "batch_size": args.batch_size, "load_1m_before": round(load0, 2), "load_1m_after": round(os.getloadavg()[0], 2)}
    if engine == "ray":
        rec.update(actors=args.ray_actors, actor_peak_rss_mb=r["actor_peak_rss_mb"], peak_rss_scope="driver")
    rec["hardware"] = HARDWARE
    print(json.dumps(rec), flush=True)
    subprocess.run(["rm", "-rf", str(out)], check=False)
    return rec


HARDWARE: dict = {}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000, help="rows of the throughput runs")
    p.add_argument("--rss-rows", type=int, nargs="+", default=[1_000_000, 10_000_000],
                   help="input sizes of the memory runs (local engine)")
    p.add_argument("--engines", nargs="+", default=["local", "ray"], choices=["local", "ray"])
    p.add_argument("--per-request", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=100_000, help="candidates per chunk")
    p.add_argument("--ray-actors", type=int, default=2)
    p.add_argument("--users", type=int, default=1500)
    p.add_argument("--items", type=int, default=800)
    p.add_argument("--days", type=int, default=28)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget-min", type=float, default=20.0, help="whole benchmark, set-up included")
    p.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench-batch")
    # child mode
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for name in ("--engine", "--input", "--output", "--bundle", "--data", "--state"):
        p.add_argument(name, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        for name in ("input", "output", "bundle", "data", "state"):
            setattr(args, name, Path(getattr(args, name)))
        return child(args)

    t_start = time.monotonic()
    HARDWARE.update(hardware())
    args.workdir.mkdir(parents=True, exist_ok=True)
    env = setup(args.workdir, args.users, args.items, args.days, args.seed)
    inputs = lambda n: make_input(args.workdir / f"in-{n}.parquet", env["shop"], n, args.per_request, args.seed)  # noqa: E731
    local: dict[int, dict] = {}  # rows -> local-engine record
    for engine in args.engines:
        rec = run(engine, args.rows, inputs(args.rows), env, args)
        if engine == "local":
            local[args.rows] = rec
    for n in sorted(set(args.rss_rows)):
        left_s = args.budget_min * 60 - (time.monotonic() - t_start)
        rate = next(iter(local.values()))["rows_per_s"] if local else None
        if rate is not None:
            fits = max(args.per_request, int(0.8 * (left_s - 60) * rate) // args.per_request * args.per_request)
            if n > fits:
                print(json.dumps({"note": f"{n} rows would take ~{n / rate / 60:.1f} min at {rate:.0f} rows/s with "
                                          f"{left_s / 60:.1f} min of the budget left; measuring {fits} rows instead"}),
                      flush=True)
                n = fits
        if n not in local:
            local[n] = run("local", n, inputs(n), env, args)
    if len(local) >= 2:
        sizes = sorted(local)
        print(json.dumps({"engine": "local", "peak_rss_mb_by_rows": {str(n): local[n]["peak_rss_mb"] for n in sizes},
                          "rss_growth_mb": round(local[sizes[-1]]["peak_rss_mb"] - local[sizes[0]]["peak_rss_mb"], 1),
                          "rows_ratio": round(sizes[-1] / sizes[0], 1)}), flush=True)


if __name__ == "__main__":
    main()
