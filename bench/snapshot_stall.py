"""How long a feature snapshot stalls the reads of the in-process store (issue 13's p99 stall lead).

    .venv/bin/python bench/snapshot_stall.py [--keys 300000] [--value-bytes 300] [--rounds 3]

The server snapshots its in-process features every 30 s (`InProcessStore.flush`) while Ranks read
them on the event loop. This fills a store with `--keys` values, then, `--rounds` times each and
in one run, flushes it on a second thread while the main thread reads 50 keys at a time in a loop,
and reports the reads' latency during the flush:
- `lock_held` (the baseline): the flush as it was before, packing and fsyncing under the store's
  lock (reproduced here by a subclass);
- `copy_then_write` (now): `InProcessStore.flush` as the server's store has it, which holds the
  lock only to freeze the state (`freeze`) and writes it outside (a forked child where that is safe).
Prints one JSON object: flush seconds and read p50 / p99 / max in ms, per variant (medians over
the rounds), and the ratio of the max read latency.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from machine import machine  # bench/ is sys.path[0]

from featurizer.store.config import InProcessConfig
from featurizer.store import snapshot_files
from featurizer.store.in_process import InProcessStore


class LockHeldFlush(InProcessStore):
    """The baseline: the flush before this change (pack and fsync under the store's lock)."""

    def flush(self) -> None:
        with self._lock:
            if self._path is not None and self._dirty and not self._closed:
                snapshot_files.save_atomic(self._path, self._data)
            self._dirty = False


def fill(store: InProcessStore, keys: int, value_bytes: int) -> list[str]:
    names = [f"u{k}" for k in range(keys)]
    blob = b"x" * value_bytes
    for start in range(0, keys, 10_000):
        store.write_batch({"user": {n: blob for n in names[start:start + 10_000]}})
    return names


def one_round(store: InProcessStore, names: list[str], rng) -> dict:
    store.write_batch({"meta": {"touch": {"t": time.time()}}})  # dirty: the flush writes
    done, took = threading.Event(), {}

    def flush() -> None:
        t = time.perf_counter()
        store.flush()
        took["s"] = time.perf_counter() - t
        done.set()

    lat = []
    threading.Thread(target=flush, daemon=True).start()
    while not done.is_set():
        keys = [names[k] for k in rng.integers(0, len(names), 50)]
        t = time.perf_counter()
        store.read("user", keys)
        lat.append((time.perf_counter() - t) * 1e3)
    lat = np.array(lat)
    return {"flush_s": took["s"], "reads": len(lat), "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "max_ms": float(lat.max())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keys", type=int, default=300_000)
    ap.add_argument("--value-bytes", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    out = {"bench": "snapshot_stall", "machine": machine(), "keys": args.keys, "value_bytes": args.value_bytes}
    with tempfile.TemporaryDirectory() as tmp:
        for name, cls in (("lock_held", LockHeldFlush), ("copy_then_write", InProcessStore)):
            store = cls(InProcessConfig(path=str(Path(tmp) / f"{name}.bin")))
            names = fill(store, args.keys, args.value_bytes)
            rounds = [one_round(store, names, rng) for _ in range(args.rounds)]
            out[name] = {k: round(float(np.median([r[k] for r in rounds])), 3) for k in rounds[0]}
            out[name]["snapshot_mb"] = round((Path(tmp) / f"{name}.bin").stat().st_size / 1e6, 1)
            store.close()
    out["max_read_ratio"] = round(out["lock_held"]["max_ms"] / out["copy_then_write"]["max_ms"], 1)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
