"""How long a full garbage collection stops the serving process, before and after `gc.freeze()`.

    .venv/bin/python bench/gc_pause.py [--work-dir runs/bench-serve]

Builds the in-process engine of bench/serve.py (its shop, bundle, feature snapshot and item
embeddings under --work-dir; run `bench/serve.py --prepare-only` first), ranks every bench user
once, then times `gc.collect(2)` three times, calls `gc.freeze()` (what `semrank serve` does once
start-up is done) and times it three times again. A generation-2 collection stops every thread
of the process, the event loop included, so its length is a floor under the server's tail when
one happens during a request (they come with allocation, e.g. while events are applied).

Prints one JSON object: tracked objects, the pauses before and after in ms, and the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import time
from pathlib import Path

import serve_setup  # bench/ is sys.path[0]
from serve_report import hardware


def timed_collections(n: int = 3) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        gc.collect(2)
        out.append(round((time.perf_counter() - t) * 1e3, 1))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work-dir", type=Path, default=serve_setup.BenchConfig().work_dir)
    a = p.parse_args(argv)
    cfg = serve_setup.BenchConfig(work_dir=a.work_dir)
    wd = cfg.work_dir
    snapshot = wd / "features" / "online-store.bin"  # (serve_setup.online_snapshot)
    if not (wd / "bundle" / "manifest.json").exists() or not snapshot.exists():
        print(f"no bench data under {wd}: run bench/serve.py --prepare-only first", file=sys.stderr)
        return 2
    from serving.ranking.outcome import Candidate

    engine, rt = serve_setup.inprocess_engine(wd / "bundle", wd / "shop", wd / "state", snapshot)
    users, items, _ = serve_setup.bench_requests(cfg, wd / "shop")

    async def rank_everyone() -> None:
        for u in users:
            await engine.rank(rt, u, [Candidate(i) for i in items[:100]])

    asyncio.run(rank_everyone())
    report = {"tracked_objects": len(gc.get_objects()), "gen2_pause_ms_before_freeze": timed_collections()}
    gc.freeze()
    report |= {"gen2_pause_ms_after_freeze": timed_collections(), "frozen_objects": gc.get_freeze_count(),
               "hardware": hardware()}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
