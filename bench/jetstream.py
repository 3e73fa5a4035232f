"""Events on JetStream against the local event log: LogEvents latency and a replica's time to ready.

    .venv/bin/python bench/jetstream.py [--events 1000000] [--calls 500] [--batch 10] [--nats-url nats://127.0.0.1:4222]

Measured in one run, on the same synthetic shop (2,000 items, 50,000 users):
- `log_events`: the LogEvents path below gRPC (`EventIngest` on the local, fsynced event log: the
  baseline; `StreamIngest` on JetStream: publish, wait for every acknowledgement, fold), `--calls`
  calls of `--batch` events each, one after the other; p50 / p99 in ms and the ratio;
- `time_to_ready`: `--events` events are published to a fresh stream (timed too), then a fresh
  replica (an empty in-process store) opens it and folds it to the end: seconds and events/s,
  against applying the same events straight from memory (`OnlineFeatures.apply` in the fold's
  batch size: the fold's floor), and against a local-log replay at start-up (`restore_online`);
- `from_snapshot`: that replica shares its snapshot (JetStream's object store), 10,000 more events
  are published, and a replica with an empty state directory downloads the snapshot, loads it and
  folds the rest: the time to ready that matters in production.
The stream (and the local log's temporary directory) are deleted at the end. Prints one JSON
object; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

import nats
import nats.js.errors
import numpy as np
import polars as pl
from machine import machine  # bench/ is sys.path[0]

from featurizer.online.features import OnlineFeatures
from featurizer.store.config import InProcessConfig
from featurizer.store.in_process import InProcessStore
from serving.config import JetStreamConfig
from serving.ingest.apply import EventIngest
from serving.ingest.event_log import EventLog
from serving.ingest.jetstream import FOLD_BATCH, StreamIngest
from serving.ingest.stream_format import encode_event, subject_for
from serving.ingest.log_format import LoggedEvent, events_frame
from serving.ingest.restore import restore_online
from serving.ingest.snapshots import bucket_name, fetch_snapshot, share_snapshot
from serving.ranking.store_worker import StoreWorker

KINDS = ("impression", "impression", "impression", "click", "add_to_cart", "purchase")
T0_US = 1_780_000_000_000_000


def catalog(n_items: int = 2000) -> pl.DataFrame:
    return pl.DataFrame({"item_id": [f"i{k}" for k in range(n_items)], "title": [f"item {k}" for k in range(n_items)],
                         "category": [f"c{k % 20}" for k in range(n_items)], "brand": [f"b{k % 50}" for k in range(n_items)],
                         "price": [5.0 + k % 100 for k in range(n_items)]})


def synthetic_events(n: int, seed: int, tag: str, n_users: int = 50_000, n_items: int = 2000) -> list[LoggedEvent]:
    rng = np.random.default_rng(seed)
    users, items, kinds = rng.integers(0, n_users, n), rng.zipf(1.3, n) % n_items, rng.integers(0, len(KINDS), n)
    return [LoggedEvent(T0_US + k * 1000, f"u{u}", f"i{i}", KINDS[c], event_id=f"{tag}-{k}")
            for k, (u, i, c) in enumerate(zip(users.tolist(), items.tolist(), kinds.tolist()))]


def pct(xs: list[float]) -> dict:
    return {"p50_ms": round(float(np.percentile(xs, 50)), 3), "p99_ms": round(float(np.percentile(xs, 99)), 3)}


async def log_events_latency(items, cfg: JetStreamConfig, calls: int, batch: int) -> dict:
    events = synthetic_events(calls * batch, seed=1, tag=f"lat-{uuid.uuid4().hex[:6]}")
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        online = OnlineFeatures(InProcessStore(), items)
        online.apply(events_frame(synthetic_events(20_000, seed=2, tag="warm")))
        with EventLog(Path(tmp) / "events") as log:
            ingest = EventIngest(log, online)
            times = []
            for k in range(calls):
                t = time.perf_counter()
                await ingest.log_events(events[k * batch:(k + 1) * batch])
                times.append((time.perf_counter() - t) * 1e3)
            out["local_log"] = pct(times)
    online = OnlineFeatures(InProcessStore(), items)
    online.apply(events_frame(synthetic_events(20_000, seed=2, tag="warm")))
    ingest = await StreamIngest.open(cfg, online, StoreWorker(False), dedup_window_s=86_400)
    try:
        times = []
        for k in range(calls):
            t = time.perf_counter()
            await ingest.log_events(events[k * batch:(k + 1) * batch])
            times.append((time.perf_counter() - t) * 1e3)
        out["jetstream"] = pct(times)
    finally:
        await ingest.close()
    out["jetstream_over_local_p50"] = round(out["jetstream"]["p50_ms"] / out["local_log"]["p50_ms"], 2)
    return out


async def publish_all(cfg: JetStreamConfig, events: list[LoggedEvent]) -> float:
    nc = await nats.connect(cfg.url)
    js = nc.jetstream()
    t0 = time.perf_counter()
    for start in range(0, len(events), 5000):
        futs = [await js.publish_async(subject_for(cfg.subject_prefix, e.user_id), encode_event(e),
                                       headers={"Nats-Msg-Id": e.event_id}) for e in events[start:start + 5000]]
        await asyncio.gather(*futs)
        if start % 100_000 == 0:
            print(f"published {start + len(futs):,} of {len(events):,}", file=sys.stderr, flush=True)
    dt = time.perf_counter() - t0
    await nc.close()
    return dt


async def time_to_ready(items, cfg: JetStreamConfig, n: int) -> dict:
    events = synthetic_events(n, seed=3, tag="ready")
    out = {"events": n}
    await (await StreamIngest.open(cfg, OnlineFeatures(InProcessStore(), items), StoreWorker(False), 86_400)).close()
    publish_s = await publish_all(cfg, events)
    out["publish"] = {"seconds": round(publish_s, 1), "events_per_s": round(n / publish_s)}

    tmp = tempfile.TemporaryDirectory()
    snap = Path(tmp.name) / "a" / "online-store.bin"
    online = OnlineFeatures(InProcessStore(InProcessConfig(path=str(snap))), items)
    t0 = time.perf_counter()
    ingest = await StreamIngest.open(cfg, online, StoreWorker(False), dedup_window_s=86_400, ready_timeout_s=3600)
    fold_s = time.perf_counter() - t0
    assert ingest.committed_seq >= n, (ingest.committed_seq, n)
    out["jetstream_fold"] = {"seconds": round(fold_s, 1), "events_per_s": round(n / fold_s)}

    # The replica shares its snapshot; 10,000 more events come; a fresh replica starts from the snapshot.
    t0 = time.perf_counter()
    online.store.flush()
    flush_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    size = await share_snapshot(ingest.js, cfg, snap, ingest.committed_seq)
    share_s = time.perf_counter() - t0
    await ingest.close()
    tail = synthetic_events(10_000, seed=4, tag="tail")
    await publish_all(cfg, tail)
    fresh = Path(tmp.name) / "b" / "online-store.bin"
    t0 = time.perf_counter()
    await fetch_snapshot(cfg, fresh)
    download_s = time.perf_counter() - t0
    store = InProcessStore(InProcessConfig(path=str(fresh)))
    online_b = OnlineFeatures(store, items)
    load_s = time.perf_counter() - t0 - download_s
    ingest = await StreamIngest.open(cfg, online_b, StoreWorker(False), dedup_window_s=86_400, ready_timeout_s=3600)
    ready_s = time.perf_counter() - t0
    assert ingest.stats.folded == len(tail), ingest.stats
    await ingest.close()
    tmp.cleanup()
    out["from_snapshot"] = {"snapshot_mb": round(size / 1e6, 1), "local_flush_s": round(flush_s, 2),
                            "share_s": round(share_s, 2), "download_s": round(download_s, 2), "load_s": round(load_s, 2),
                            "tail_events": len(tail), "time_to_ready_s": round(ready_s, 2)}

    online = OnlineFeatures(InProcessStore(), items)
    t0 = time.perf_counter()
    for start in range(0, n, FOLD_BATCH):
        online.apply(events_frame(events[start:start + FOLD_BATCH]))
    apply_s = time.perf_counter() - t0
    out["apply_from_memory"] = {"seconds": round(apply_s, 1), "events_per_s": round(n / apply_s)}

    with tempfile.TemporaryDirectory() as tmp:
        with EventLog(Path(tmp) / "events", fsync=False) as log:
            for start in range(0, n, 10_000):
                log.append(events[start:start + 10_000])
            t0 = time.perf_counter()
            restore_online(InProcessStore(), items, events_frame([]), log.replay)
            replay_s = time.perf_counter() - t0
    out["local_log_replay"] = {"seconds": round(replay_s, 1), "events_per_s": round(n / replay_s)}
    out["fold_over_apply"] = round(fold_s / apply_s, 2)
    return out


async def drop(url: str, stream: str, bucket: str | None = None) -> None:
    nc = await nats.connect(url)
    try:
        await nc.jetstream().delete_stream(stream)
        if bucket:
            await nc.jetstream().delete_object_store(bucket)
    except nats.js.errors.NotFoundError:
        pass
    await nc.close()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--calls", type=int, default=500)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--nats-url", default="nats://127.0.0.1:4222")
    args = ap.parse_args()
    items = catalog()
    name = f"BENCH_{uuid.uuid4().hex[:10]}"
    cfg = JetStreamConfig(url=args.nats_url, stream=name, subject_prefix=f"bench.{name}")
    result = {"bench": "jetstream", "machine": machine(), "fold_batch": FOLD_BATCH}
    try:
        result["log_events"] = await log_events_latency(items, cfg, args.calls, args.batch)
        print("log_events done", file=sys.stderr, flush=True)
        ready_cfg = JetStreamConfig(url=args.nats_url, stream=name + "_R", subject_prefix=f"bench.{name}_R")
        try:
            result["time_to_ready"] = await time_to_ready(items, ready_cfg, args.events)
        finally:
            await drop(args.nats_url, ready_cfg.stream, bucket_name(ready_cfg.stream))
    finally:
        await drop(args.nats_url, name)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
