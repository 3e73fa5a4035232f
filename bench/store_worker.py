"""What calling the online features through the store worker costs, on Redis and in process.

    .venv/bin/python bench/store_worker.py [--calls 2000] [--candidates 100] [--redis-url redis://127.0.0.1:6379/0]

The serving engine reads the online features through `serving.ranking.store_worker.StoreWorker`:
on a thread of its own for Redis (so a hung Redis cannot freeze the event loop), inline for the
in-process store. This measures, in one run and on the same data, the per-call latency of
`OnlineFeatures.features(user, candidates, t)` and `history(...)`:
- direct: called on the event loop's thread, as before the worker (the baseline);
- worker: `await worker.read(...)`.
A synthetic catalog (500 items) and 30,000 events of 2,000 users are applied first. Redis data
goes to a fresh namespace that is deleted at the end. Prints one JSON object: medians and p99 in
microseconds per backend and path, and the worker/direct ratio of the medians (noisy machines:
read the ratios).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from datetime import datetime, timedelta, timezone

import numpy as np
import polars as pl
from machine import machine  # bench/ is sys.path[0]

from featurizer.online.features import OnlineFeatures
from featurizer.store.config import InProcessConfig, RedisConfig
from featurizer.store.factory import store_from_config
from serving.ranking.store_worker import StoreWorker

EVENTS = ("impression", "click", "add_to_cart", "purchase")


def shop(seed: int = 7, n_items: int = 500, n_users: int = 2000, n_events: int = 30_000):
    rng = np.random.default_rng(seed)
    items = pl.DataFrame({
        "item_id": [f"i{k}" for k in range(n_items)], "title": [f"item {k}" for k in range(n_items)],
        "category": [f"c{k % 12}" for k in range(n_items)], "brand": [f"b{k % 40}" for k in range(n_items)],
        "price": rng.uniform(2, 200, n_items).round(2),
    })
    t0 = datetime(2026, 11, 1, tzinfo=timezone.utc)
    events = pl.DataFrame({
        "ts": [t0 + timedelta(seconds=int(s)) for s in np.sort(rng.integers(0, 28 * 86_400, n_events))],
        "user_id": [f"u{k}" for k in rng.integers(0, n_users, n_events)],
        "item_id": [f"i{k}" for k in rng.zipf(1.3, n_events) % n_items],
        "event": [EVENTS[k] for k in rng.choice(4, n_events, p=[0.7, 0.2, 0.06, 0.04])],
    })
    return items, events


async def measure(online: OnlineFeatures, remote: bool, calls: int, candidates: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    worker = StoreWorker(remote=remote, read_timeout_s=5.0)
    t = online.watermark + timedelta(seconds=1)
    item_ids = [f"i{k}" for k in range(500)]
    out: dict[str, dict[str, float]] = {}
    for path in ("direct", "worker", "direct", "worker"):  # interleaved twice: drift hits both
        samples = []
        for _ in range(calls // 2):
            user = f"u{rng.integers(0, 2000)}"
            cands = list(rng.choice(item_ids, candidates, replace=False))
            t0 = time.perf_counter()
            if path == "direct":
                online.history(user, t, 10)
                online.features(user, cands, t)
            else:
                await worker.read(online.history, user, t, 10)
                await worker.read(online.features, user, cands, t)
            samples.append((time.perf_counter() - t0) * 1e6)
        out.setdefault(path, {"samples": []})["samples"].extend(samples)
    worker.close()
    for stats in out.values():
        s = np.array(stats.pop("samples"))
        stats.update(p50_us=round(float(np.median(s)), 1), p99_us=round(float(np.percentile(s, 99)), 1), n=len(s))
    out["ratio_p50_worker_over_direct"] = round(out["worker"]["p50_us"] / out["direct"]["p50_us"], 3)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=2000, help="Rank-like reads (history + features) per path")
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--seed", type=int, default=11)
    args = p.parse_args()
    items, events = shop()
    result = {"bench": "store_worker", "machine": machine(), "calls": args.calls, "candidates": args.candidates}
    namespace = f"bench-{uuid.uuid4().hex[:12]}"
    for name, cfg in (("inprocess", InProcessConfig()), ("redis", RedisConfig(url=args.redis_url, namespace=namespace))):
        store = store_from_config(cfg)
        try:
            online = OnlineFeatures(store, items)
            online.apply(events)
            result[name] = asyncio.run(measure(online, store.remote, args.calls, args.candidates, args.seed))
        finally:
            if name == "redis":
                import redis

                client = redis.Redis.from_url(args.redis_url)
                keys = list(client.scan_iter(match=f"{namespace}:*", count=10_000))
                for k in range(0, len(keys), 5000):
                    client.delete(*keys[k : k + 5000])
                client.close()
            store.close()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
