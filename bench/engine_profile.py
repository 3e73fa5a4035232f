"""Where a Rank's engine time goes: `RankingEngine.rank` in process, under cProfile, on the serve bench's
shop, bundle and feature state (issue 29: "read `_features` and `derive` again with a profiler").

    .venv/bin/python bench/engine_profile.py [--work-dir runs/bench-serve] [--candidates 100 1000] [--reps 400] [--events-per-rank 0.25]

Needs the serve bench's work directory (`bench/serve.py --prepare-only` makes it). For each candidate
count: the engine's p50 without the profiler, then the same requests under cProfile, and for the
functions that matter the share of the profiled time spent inside them (cumulative) and in their own
code. Shares, not times, are what to read on a shared machine: the profiler slows everything alike.
Prints one JSON object; `--top N` also lists the N functions with the most time of their own.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import polars as pl
from machine import machine  # bench/ is sys.path[0]
from profiling import shares, top_own
from serve_setup import BenchConfig, bench_requests, inprocess_engine, online_snapshot, prepare

# (label, function name as cProfile names it, file suffix)
WATCH = [
    ("rank", "rank", "serving/ranking/engine.py"),
    ("features (engine, with its store read)", "_features", "serving/ranking/engine.py"),
    ("features", "_features", "featurizer/online/features.py"),
    ("derive (all features: a read at an item's latest instant)", "derive", "featurizer/definitions.py"),
    ("derive, per request", "derive_rest", "featurizer/definitions.py"),
    ("derive of item counts (when an item changed)", "derive_item_counts", "featurizer/definitions.py"),
    ("item parts and count features (cached)", "gather_counts", "featurizer/online/state_cache.py"),
    ("item parts gather (a read at an item's latest instant)", "gather", "featurizer/online/state_cache.py"),
    ("user x item state", "_user_item_base", "featurizer/online/features.py"),
    ("co-occurrence", "cooc_counts", "featurizer/online/user_state.py"),
    ("user vector", "user_embedding", "serving/ranking/engine.py"),
    ("item vectors", "item_embeddings", "serving/ranking/engine.py"),
    ("trees", "predict", "ranker/compiled_trees.py"),
    ("trees (LightGBM)", "predict", "ranker/bundle.py"),
]


def main() -> int:
    d = BenchConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", type=Path, default=d.work_dir)
    p.add_argument("--candidates", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--reps", type=int, default=400)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--events-per-rank", type=float, default=0.0,
                   help="apply this many click events (the Rank's user on one of its candidates, at now) per Rank, "
                        "between Ranks and outside the profile: the engine under writes, as in bench/serve.py's mixed "
                        "phase (0.25: 50 events/s beside 200 Ranks/s)")
    a = p.parse_args()
    cfg = BenchConfig(work_dir=a.work_dir, candidates=tuple(a.candidates))
    shop, bundle = prepare(cfg)
    state_dir = cfg.work_dir / "state"
    snapshot = online_snapshot(state_dir, shop)
    users, _, pools = bench_requests(cfg, shop)
    engine, rt = inprocess_engine(bundle, shop, state_dir, snapshot)
    from serving.ranking.outcome import Candidate

    result = {"machine": machine(), "reps": a.reps, "events_per_rank": a.events_per_rank, "sizes": {}}
    for n in a.candidates:
        reqs = [(u, [Candidate(item_id=i) for i in ids]) for u, ids in pools[n]]

        owed = [0.0]

        async def ranks(k: int, timed: list[float] | None = None, prof: cProfile.Profile | None = None) -> None:
            for r in range(k):
                u, cs = reqs[r % len(reqs)]
                owed[0] += a.events_per_rank
                while owed[0] >= 1:  # an event of this user, outside the timing and the profile
                    owed[0] -= 1
                    if prof is not None:
                        prof.disable()
                    engine.online.apply(pl.DataFrame({
                        "ts": [datetime.now(timezone.utc)], "user_id": [u], "item_id": [cs[r % len(cs)].item_id],
                        "event": ["click"]}))
                    if prof is not None:
                        prof.enable()
                t = time.perf_counter()
                await engine.rank(rt, u, cs)
                if timed is not None:
                    timed.append(time.perf_counter() - t)

        asyncio.run(ranks(len(users) // 4))  # warm: every request's user once, caches filled
        plain: list[float] = []
        asyncio.run(ranks(a.reps, plain))
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        asyncio.run(ranks(a.reps, prof=prof))
        prof.disable()
        total = time.perf_counter() - t0
        stats = pstats.Stats(prof)
        result["sizes"][n] = {
            "p50_ms_unprofiled": round(float(np.median(plain)) * 1e3, 3),
            "profiled_ms_per_rank": round(total / a.reps * 1e3, 3),
            "shares": shares(stats, total, WATCH),
            "top_own": top_own(stats, total, a.top),
        }
        print(f"{n} candidates: p50 {result['sizes'][n]['p50_ms_unprofiled']} ms", file=sys.stderr)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
