"""How long a delta snapshot of the write flood's state stops the event loop (issue 30 item 4).

    .venv/bin/python bench/delta_stall.py [--work-dir runs/bench-serve] [--events 24000] [--rounds 3]
                                          [--variants thread chunked]

Needs the serve bench's work directory (`bench/serve.py --prepare-only` makes it). Loads the bench's
feature snapshot into an in-process store with a file, takes a full snapshot, then per round folds
`--events` click events of 2,000 users (the serve bench's flood: 30 s of it at 1,000 events/s
changes about 24,000 keys) and snapshots the changes the way `semrank serve` does every 30 s, while a
probe on the event loop sleeps 1 ms at a time and records how late it wakes: what a Rank arriving
during the snapshot waits for the loop. Variants (each round runs every variant on a state folded
the same way; the order alternates):
- `thread`: the delta's handed-over values encoded on the snapshot's thread (`freeze`, then the
  returned write on a thread), which shares the GIL with the loop;
- `chunked`: the same values encoded on the loop in slices of `--slice-ms`, a share of the loop
  (`--write-share`) apart (`SnapshotWrite.encode_slices`, what the server does), then written on a
  thread;
(Before the chunked encoding, a forked child wrote deltas and the store read its encodings back:
`--variants fork thread` over the store of commit 1fd71e2 gave the fork a max lag of 16.8 ms against 13.7 on
the thread, medians of 5 rounds, docs/scaling.md.)
Prints one JSON object: per variant the probe's lag p50 / p99 / max in ms and the time to the file
(medians over the rounds), and each variant's max lag over `thread`'s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from flood_state import Flood, flood_shop  # bench/ is sys.path[0]
from machine import machine
from serve_setup import BenchConfig


async def probe(stop: asyncio.Event, lags: list[float]) -> None:
    while not stop.is_set():
        t = time.perf_counter()
        await asyncio.sleep(0.001)
        lags.append(time.perf_counter() - t - 0.001)


async def snapshot(store, variant: str, slice_ms: float, share: float) -> float:
    """One delta snapshot as the server takes it; returns its seconds to the file."""
    t0 = time.perf_counter()
    write = await asyncio.to_thread(store.freeze)
    if write is None:
        raise RuntimeError("nothing changed: no snapshot")
    if variant == "chunked":  # as the server paces it while Ranks are served (`ApplySlices.pace`)
        from serving.ingest.apply import ApplySlices

        await write.encode_slices(slice_ms / 1000, ApplySlices(slice_ms, write_share=share, ranks_active=lambda: True).pace)
    await asyncio.to_thread(write)
    return time.perf_counter() - t0


async def measured(store, variant: str, slice_ms: float, share: float) -> dict:
    lags: list[float] = []
    stop = asyncio.Event()
    task = asyncio.create_task(probe(stop, lags))
    await asyncio.sleep(0.2)
    before = len(lags)
    seconds = await snapshot(store, variant, slice_ms, share)
    during = lags[before:]
    stop.set()
    await task
    ms = np.array(during) * 1000
    return {"lag_p50_ms": float(np.percentile(ms, 50)), "lag_p99_ms": float(np.percentile(ms, 99)),
            "lag_max_ms": float(ms.max()), "snapshot_s": seconds}


def main() -> int:
    d = BenchConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", type=Path, default=d.work_dir)
    p.add_argument("--events", type=int, default=24_000, help="flood events folded before each snapshot")
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--variants", nargs="+", default=["thread", "chunked"], choices=["thread", "chunked"])
    p.add_argument("--slice-ms", type=float, default=4.0)
    p.add_argument("--write-share", type=float, default=0.3)
    a = p.parse_args()

    ds, source = flood_shop(a.work_dir)
    rows: dict[str, list[dict]] = {v: [] for v in a.variants}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            order = a.variants if r % 2 == 0 else a.variants[::-1]
            for variant in order:
                flood = Flood(ds, source, Path(tmp) / f"store-{variant}.bin", a.users, seed=r)  # the same events per round
                store = flood.store
                store.write_batch({"bench": {"start": b"1"}})  # a full snapshot first: the base of the deltas
                store.flush()
                for _ in range(0, a.events, 20):  # LogEvents of 20, as the serve bench's flood
                    flood.fold(20)
                if store._changed is None:
                    raise RuntimeError("the store would write a full snapshot, not a delta (raise delta_max_fraction?)")
                changed = store._n_changed
                row = asyncio.run(measured(store, variant, a.slice_ms, a.write_share))
                row["keys_changed"] = changed
                store.close()
                rows[variant].append(row)
                print(f"round {r} {variant}: {row}", file=sys.stderr)
    result = {"machine": machine(), "events": a.events, "rounds": a.rounds, "slice_ms": a.slice_ms,
              "write_share": a.write_share, "variants": {}}
    for v, rs in rows.items():
        result["variants"][v] = {k: round(float(np.median([x[k] for x in rs])), 3) for k in rs[0]}
    if "thread" in rows:
        base = result["variants"]["thread"]["lag_max_ms"]
        result["lag_max_over_thread"] = {v: round(r["lag_max_ms"] / base, 3) for v, r in result["variants"].items()}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
