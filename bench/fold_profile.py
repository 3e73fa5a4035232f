"""Where the write path's time goes: folding LogEvents-sized batches into the serve bench's feature
state, in process, under cProfile (issue 30 item 4: a write flood must not stall Ranks).

    .venv/bin/python bench/fold_profile.py [--work-dir runs/bench-serve] [--per-call 1 20] [--calls 400] [--users 2000]

Needs the serve bench's work directory (`bench/serve.py --prepare-only` makes it). Each call folds
`per-call` click events (a user drawn from `--users` of the shop's users, an item from the catalog,
at now) the way the server's event log fold does (`serving.ingest.apply.apply_logged`: one atomic
commit with the log's seq) into an in-process store loaded from the bench's snapshot. Reports per
batch size the µs per event and per call without the profiler (median of calls), then the same
calls under cProfile: the share of the profiled time in the functions that matter, and the top
functions by their own time. Shares, not times, are what to read on a shared machine. One JSON object.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import time
from pathlib import Path

import numpy as np
from flood_state import Flood, flood_shop  # bench/ is sys.path[0]
from machine import machine
from profiling import shares, top_own
from serve_setup import BenchConfig

# (label, function name as cProfile names it, file suffix)
WATCH = [
    ("fold (apply_columns)", "apply_columns", "featurizer/online/features.py"),
    ("store reads", "read", "featurizer/store/in_process.py"),
    ("store write_batch", "write_batch", "featurizer/store/in_process.py"),
    ("encode values", "encode_value", "featurizer/store/base.py"),
    ("decode values", "decode_value", "featurizer/store/base.py"),
    ("user state: add", "add", "featurizer/online/user_state.py"),
    ("user state: from_dict", "from_dict", "featurizer/online/user_state.py"),
    ("user state: to_dict", "to_dict", "featurizer/online/user_state.py"),
    ("item state: from_bytes", "from_bytes", "featurizer/online/state.py"),
    ("item state: to_bytes", "to_bytes", "featurizer/online/state.py"),
]


def main() -> int:
    d = BenchConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", type=Path, default=d.work_dir)
    p.add_argument("--per-call", type=int, nargs="+", default=[1, 20])
    p.add_argument("--calls", type=int, default=400)
    p.add_argument("--users", type=int, default=2000, help="the flood's users (bench/serve.py's heavy mix: 2,000)")
    p.add_argument("--top", type=int, default=15)
    a = p.parse_args()

    ds, snapshot = flood_shop(a.work_dir)
    copy = a.work_dir / "fold-profile-store.bin"  # a copy: this store must never write the snapshot
    flood = Flood(ds, snapshot, copy, a.users)
    copy.unlink()
    online = flood.online

    def calls(k: int, per_call: int, timed: list[float] | None = None) -> None:
        for _ in range(k):
            t = flood.fold(per_call)
            if timed is not None:
                timed.append(t)

    result = {"machine": machine(), "calls": a.calls, "users": a.users, "state_keys": sum(
        len(t) for t in online.store._data.values()), "per_call": {}}
    for n in a.per_call:
        calls(a.calls // 4, n)  # warm
        plain: list[float] = []
        calls(a.calls, n, plain)
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        calls(a.calls, n)
        prof.disable()
        total = time.perf_counter() - t0
        stats = pstats.Stats(prof)
        median = float(np.median(plain))
        result["per_call"][n] = {
            "us_per_call_p50": round(median * 1e6, 1), "us_per_event_p50": round(median / n * 1e6, 1),
            "us_per_call_p99": round(float(np.percentile(plain, 99)) * 1e6, 1),
            "shares": shares(stats, total, WATCH), "top_own": top_own(stats, total, a.top),
        }
        print(f"{n} per call: {result['per_call'][n]['us_per_event_p50']} µs per event", file=sys.stderr)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
