"""Time to erase users at about 1M events (issue 18 item 3): `semrank privacy delete-user` on a state
directory, then the rebuild the next start does; with `--live`, `DeleteUser`'s work on a running
state (serving.ingest.live_erasure), with feature reads going on beside it.

    .venv/bin/python bench/erasure.py [--work-dir runs/bench-serve] [--log-events 400000] [--users 10] [--live]

Needs the serve bench's shop (`bench/serve.py --prepare-only`: 3,000 users, about 640k events in its
data directory). A fresh state directory gets `--log-events` more events in its event log (clicks of
the shop's users, one a second over the days before the shop's last event, in batches of 1,000), so
data directory and log hold about 1M events. Then half of `--users` data-directory
users and half log users are erased in one run (`serving.ingest.erase.erase_users`: the log
rewritten, exposures, the snapshot dropped, the list recorded), and the state is rebuilt as the
next start does (`build_engine`: the data directory without them, then the log). Prints one JSON
object: the seconds of each step and the peak memory.

`--live`: the state is built with the log applied (as a server holds it), then the same users are
erased by `LiveErasure` (the child rebuilds beside, the state is caught up and swapped in, the full
snapshot written) while a reader on the same event loop reads the features of 100 candidates for a
random user every 5 ms through the store worker, as Ranks do; the reads' latency during the erasure
is reported beside the same reads' for 10 s before it (the baseline, same run), with the event
loop's longest stall.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
from pathlib import Path

import numpy as np
from machine import machine  # bench/ is sys.path[0]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", type=Path, default=Path("runs/bench-serve"))
    p.add_argument("--log-events", type=int, default=400_000)
    p.add_argument("--users", type=int, default=10)
    p.add_argument("--live", action="store_true", help="erase on a running state (DeleteUser's path), reads beside")
    a = p.parse_args()
    from featurizer.contracts.schema import read_dataset
    from featurizer.erasure import Erasures
    from featurizer.store.config import InProcessConfig
    from serving.ingest.erase import erase_users
    from serving.ingest.log_format import LoggedEvent
    from serving.ingest.restore import build_engine

    shop, state = a.work_dir / "shop", a.work_dir / "erasure-state"
    if not (shop / "items.parquet").exists() and not any(shop.glob("items*")):
        raise SystemExit(f"{shop}: no shop; run bench/serve.py --prepare-only first")
    shutil.rmtree(state, ignore_errors=True)
    ds = read_dataset(shop)
    users, items = ds.events["user_id"].unique().sort().to_list(), ds.items["item_id"].to_list()
    rng = np.random.default_rng(0)
    t_us = int(ds.events["ts"].max().timestamp() * 1e6)
    cfg = InProcessConfig(path=str(state / "online-store.bin"))
    t0 = time.monotonic()
    built = build_engine(shop, state, cfg)
    first_build = time.monotonic() - t0
    t0 = time.monotonic()
    log_users = [f"log-user-{k}" for k in range(a.users)]
    for start in range(0, a.log_events, 1000):
        n = min(1000, a.log_events - start)
        who = [log_users[k % len(log_users)] if k % 50 == 0 else users[rng.integers(len(users))] for k in range(n)]
        # one a second, ending at the shop's last event: a few days of clicks beside the shop's own
        batch = [LoggedEvent(t_us - (a.log_events - start - k) * 1_000_000, who[k], items[rng.integers(len(items))],
                             "click", event_id=f"b{start + k}") for k in range(n)]
        built.event_log.append(batch)  # (the features never see them: the erasure drops the snapshot anyway)
    fill = time.monotonic() - t0
    built.close()
    erased = users[: a.users // 2] + log_users[: a.users - a.users // 2]
    if a.live:
        out = live(shop, state, cfg, erased, users, items)
        out.update({"machine": machine(), "data_dir_events": ds.events.height, "log_events": a.log_events,
                    "events_total": ds.events.height + a.log_events, "first_build_seconds": round(first_build, 2),
                    "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)})
        print(json.dumps(out, indent=1))
        return 0
    t0 = time.monotonic()
    removed = erase_users(state, erased, Erasures.open(state, create=True), "bench")
    erase_s = time.monotonic() - t0
    t0 = time.monotonic()
    rebuilt = build_engine(shop, state, cfg)
    rebuild_s = time.monotonic() - t0
    assert all(rebuilt.engine.online.sequence(u, rebuilt.engine.now()) == [] for u in erased)
    rebuilt.close()
    out = {
        "machine": machine(), "data_dir_events": ds.events.height, "log_events": a.log_events,
        "events_total": ds.events.height + a.log_events, "users_erased": len(erased),
        "erase": removed, "erase_seconds": round(erase_s, 2),
        "rebuild_seconds": round(rebuild_s, 2), "time_to_erase_seconds": round(erase_s + rebuild_s, 2),
        "first_build_seconds": round(first_build, 2), "log_fill_seconds": round(fill, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    print(json.dumps(out, indent=1))
    return 0


def live(shop: Path, state: Path, cfg, erased: list[str], users: list[str], items: list[str]) -> dict:
    import asyncio

    from serving.config import Limits
    from serving.experiments.exposure_log import ExposureLog
    from serving.ingest.apply import EventIngest
    from serving.ingest.live_erasure import LiveErasure
    from featurizer.privacy import Pseudonyms
    from serving.ingest.restore import build_engine

    t0 = time.monotonic()
    built = build_engine(shop, state, cfg)  # the log applied, as a running server holds it
    restore_s = time.monotonic() - t0
    engine = built.engine
    ingest = EventIngest(built.event_log, engine.online, worker=engine.store_worker)
    exposures = ExposureLog(state / "exposures")
    rng = np.random.default_rng(1)

    async def persist() -> None:
        write = await asyncio.to_thread(engine.online.store.freeze, True)
        if write is not None:
            await asyncio.to_thread(write)

    async def reads(stop: asyncio.Event, lat: list[float], lag: list[float]) -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            user, cands = users[rng.integers(len(users))], [items[k] for k in rng.integers(len(items), size=100)]
            t = time.perf_counter()
            online = engine.online
            await engine.store_worker.read(online.features, user, cands, engine.now())
            lat.append((time.perf_counter() - t) * 1e3)
            t_sleep = loop.time()
            await asyncio.sleep(0.005)
            lag.append((loop.time() - t_sleep - 0.005) * 1e3)

    async def run() -> dict:
        erasure = LiveErasure(state_dir=state, data_dir=shop, store_cfg=cfg, engine=engine, ingest=ingest,
                              exposures=exposures, pseudonyms=Pseudonyms(), rules=Limits().event_rules,
                              erasures=built.erasures, persist=persist,
                              forget=lambda gone: engine.forget_users(gone, []))
        before, during, lag_before, lag_during = [], [], [], []
        stop = asyncio.Event()
        task = asyncio.ensure_future(reads(stop, before, lag_before))
        await asyncio.sleep(10)
        stop.set()
        await task
        stop = asyncio.Event()
        task = asyncio.ensure_future(reads(stop, during, lag_during))
        t = time.monotonic()
        out = await erasure.erase(erased, "bench")
        took = time.monotonic() - t
        stop.set()
        await task

        def pct(x: list[float]) -> dict:
            return {"reads": len(x), "p50_ms": round(float(np.percentile(x, 50)), 3),
                    "p99_ms": round(float(np.percentile(x, 99)), 3), "max_ms": round(max(x), 1)}

        return {"erasure": out, "live_erasure_seconds": round(took, 2), "reads_before": pct(before),
                "reads_during": pct(during), "loop_lag_before": pct(lag_before), "loop_lag_during": pct(lag_during)}

    try:
        out = asyncio.run(run())
    finally:
        exposures.close()
        built.close()
    out["restore_with_log_seconds"] = round(restore_s, 2)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
