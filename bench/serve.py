"""Rank service latency and throughput: a real server and Triton, a load generator in other processes.

    .venv/bin/python bench/serve.py [--work-dir runs/bench-serve] [--seconds 20] [--out-dir DIR]

The bench
1. makes (or reuses, under --work-dir) a synthetic shop (`training.data.synth`) and a LightGBM bundle
   trained on it (`training.lambdarank.impression_lists.train_ranker`); with `--sequence`, a bundle
   with a sequence model instead (`train_sequence_bundle`: SASRec-CE, then the leave-one-out ranker
   with `sequence_score`), whose mixed rows also count the sequence model's cache misses;
2. starts `semrank serve` as a child process (which starts its own Triton encoder worker);
3. warms the caches: every bench user is ranked once, so their embeddings are cached, and the
   candidates are catalog items, whose embeddings the server computed at start-up;
4. for 100, 300 and 1000 candidates, drives the server from load-generator processes
   (asyncio grpc.aio, several channels each, requests serialised in advance):
   - open loop at a fixed offered rate (default 200 requests/s): requests leave on a fixed
     schedule and latency is counted from the *scheduled* send time, so a generator or a server
     that falls behind shows up as latency instead of being hidden (coordinated omission);
   - closed loop at saturation: a fixed number of requests always in flight;
   then the mixed phase (`--mixed-candidates`, default 100): the open loop of Ranks plus LogEvents
   at `--events-rate` (50 events/s) from the same users, each Rank of a user who logged carrying
   that call's `sequence` as `min_sequence`; it reports Rank and LogEvents p50/p99 beside the warm
   phase's p99 at the same size, and from the server's metrics the encoder calls Rank issued by
   cause (`semrank_rank_encoder_calls_total`), degraded answers by reason, history items the
   pooled tower left out, and the encoder's share of the Ranks' time; `mixed_targets` checks them.
   Then the heavy mixes (`--heavy-mix`, default 1,000 events/s from 2,000 users of their own, 20
   events per LogEvents call: a writer flood): the same row, no target (issue 30: Rank p99 within 2x
   the warm phase's under it);
5. measures, in this process and with the server idle, `RankingEngine.rank` on an engine built
   from the same data, bundle and cached embeddings (feature gather + LightGBM, no gRPC): the
   in-process cost, so service overhead is a ratio measured in the same run.

The client shares the machine's CPUs with the server: every row reports the CPU the generator
and the server (with its Triton child) used, in cores, and the open-loop rows the generator's
send lag (how late requests left against their schedule): when the lag stays well under the
latency and the generator uses a fraction of a core, the generator is not the bottleneck.

Prints one JSON object: {"results": [...], "hardware": {...}, "load_avg": {...}, ...}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import signal
import sys
import time
import uuid
from dataclasses import asdict
from pathlib import Path

from loadgen import (  # bench/ is sys.path[0]
    LoadGenerator,
    serialize,
    summarize,
)
from serve_report import (
    LoadAvg,
    check_mixed_targets,
    check_targets,
    generator_verdict,
    hardware,
    plot,
    plot_timeline,
)
from serve_server import ServerProcess, cpu_seconds, warm_server
from serve_setup import (
    SEQUENCE_ITEMS,
    BenchConfig,
    bench_requests,
    heavy_key,
    inprocess_engine,
    measure_inprocess,
    online_snapshot,
    prepare,
    reset_server_state,
)

log = logging.getLogger("bench.serve")

# ---------------------------------------------------------------- run


def run(cfg: BenchConfig, out_dir: Path | None) -> dict:
    t_start = time.monotonic()
    load = LoadAvg()
    shop, bundle = prepare(cfg)
    state_dir = cfg.work_dir / "state"
    state_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(state_dir / "exposures", ignore_errors=True)  # the server's exposure log of earlier runs
    snapshot = online_snapshot(state_dir, shop, SEQUENCE_ITEMS if cfg.sequence else 0)
    reset_server_state(state_dir, snapshot)
    users, items, pools = bench_requests(cfg, shop)
    wire = {n: [serialize(u, ids, cfg.top_k) for u, ids in pool] for n, pool in pools.items()}

    extra, env, token, writer_token, stream = list(cfg.serve_args), {}, None, None, None
    if cfg.sequence:
        extra += ["--sequence-items", str(SEQUENCE_ITEMS)]
    if cfg.workers > 1:
        extra += ["--workers", str(cfg.workers)]
        for d in (state_dir / "workers").glob("*/exposures"):
            shutil.rmtree(d, ignore_errors=True)
    if cfg.events == "jetstream":
        stream = f"BENCH_{uuid.uuid4().hex[:10]}"
        extra += ["--events", "jetstream", "--nats-url", cfg.nats_url, "--stream", stream, "--subject-prefix",
                  f"bench.{stream}"]
    if cfg.tokens:
        token, writer_token = "bench-client-token-" + uuid.uuid4().hex, "bench-writer-token-" + uuid.uuid4().hex
        env["SEMRANK_BENCH_TOKENS"] = f"{token}:client,{writer_token}:writer"
        extra += ["--tokens-env", "SEMRANK_BENCH_TOKENS"]
    server = ServerProcess(bundle, shop, state_dir, cfg.work_dir / "server.log", max_concurrent_rpcs=1024,
                           encoder_timeout_ms=cfg.encoder_timeout_ms, extra=extra, env=env)
    t = time.monotonic()
    port = server.start()
    ready_s = time.monotonic() - t
    log.info("server on port %d after %.1f s", port, ready_s)
    gen = None
    try:
        warm = warm_server(port, users, items, token=token, channels=cfg.channels if cfg.workers > 1 else 1)
        log.info("server warm-up: %s", warm)
        engine, rt = inprocess_engine(bundle, shop, state_dir, snapshot)
        inproc = measure_inprocess(engine, rt, {n: pool for n, pool in pools.items() if n in cfg.candidates}, users,
                                   cfg.inprocess_reps)
        log.info("in-process: %s", inproc)
        del engine, rt
        mixed = {"users": {n: [u for u, _ in pool] for n, pool in pools.items()}, "items": items,
                 "writer_token": writer_token, "run": uuid.uuid4().hex[:12]}
        gen = LoadGenerator(port, wire, cfg.processes, cfg.channels, cfg.timeout_s, token=token, mixed=mixed)
        server_pids, triton = server.server_pids(), server.triton_pids()
        mixed_rows, timelines = [], []  # (phase name, raw samples) for the latency-over-time plot
        rows = rank_phases(gen, server, server_pids, triton, cfg, inproc, timelines)
        warm_p99 = {r["candidates"]: r["p99_ms"] for r in rows if r["offered_rps"] == cfg.offered_rps}
        mixes = [(n, n, cfg.mixed_events_rate, len(users)) for n in cfg.mixed_candidates]
        mixes += [(n, heavy_key(n, u), rate, u) for n in cfg.mixed_candidates for rate, u in cfg.heavy_mixes]
        for k, (n, key, events_rate, n_users) in enumerate(mixes):
            row = mixed_phase(gen, server, server_pids, triton, cfg, n, key, events_rate, seed=900 + k,
                              timelines=timelines)
            row.update({"users": n_users, "heavy": key != n, "inprocess_p50_ms": inproc[n]["p50_ms"] if n in inproc else None,
                        "warm_p99_ms": warm_p99.get(n)})
            row["p99_over_warm_p99"] = (round(row["p99_ms"] / row["warm_p99_ms"], 2)
                                        if row["warm_p99_ms"] and row["p99_ms"] is not None else None)
            log.info("mixed: %s", row)
            mixed_rows.append(row)
        gen.close()
        gen = None
        server.stop()
        if cfg.null_service:  # the floor: the same server with a Rank that does no work, same load
            server = ServerProcess(bundle, shop, state_dir, cfg.work_dir / "server-null.log", max_concurrent_rpcs=1024,
                                   encoder_timeout_ms=cfg.encoder_timeout_ms,
                                   extra=[*extra, "--null-service", str(cfg.top_k)], env=env)
            port = server.start()
            gen = LoadGenerator(port, wire, cfg.processes, cfg.channels, cfg.timeout_s, token=token, mixed=mixed)
            null_rows = rank_phases(gen, server, server.server_pids(), server.triton_pids(), cfg, None, timelines)
            for row, null in zip(rows, null_rows):
                engine_cpu = inproc[row["candidates"]]["cpu_ms"]
                row.update({"null_p50_ms": null["p50_ms"], "null_p99_ms": null["p99_ms"],
                            "null_achieved_rps": null["achieved_rps"],
                            "null_cpu_ms_per_call": null["server_cpu_ms_per_request"], "engine_cpu_ms": engine_cpu})
                floor = (engine_cpu + null["server_cpu_ms_per_request"]) if null["server_cpu_ms_per_request"] else None
                row["cpu_ratio_to_engine_plus_null"] = (round(row["server_cpu_ms_per_request"] / floor, 2)
                                                        if floor and row["server_cpu_ms_per_request"] else None)
    finally:
        if gen is not None:
            gen.close()
        server.stop()
        if stream is not None:
            asyncio.run(_drop_stream(cfg.nats_url, stream))
    required = ("candidates", "offered_rps", "achieved_rps", "p50_ms", "p95_ms", "p99_ms", "errors", "inprocess_p50_ms")
    results = [{**{k: r[k] for k in required}, **{k: v for k, v in r.items() if k not in required}} for r in rows]
    report = {
        "results": results,
        "hardware": hardware(),
        "load_avg": load.report(),
        "targets": check_targets(rows),
        "generator": {
            "processes": cfg.processes, "channels_per_process": cfg.channels,
            "client": "asyncio grpc.aio, requests serialised in advance, responses parsed (degraded counted)",
            "open_loop": "fixed schedule; latency from the scheduled send time (includes any send lag)",
            "saturation": f"closed loop, {list(cfg.saturation_concurrency)} requests in flight (one row each)",
            "max_client_cpu_cores_per_process": round(max(r["client_cpu_cores"] for r in rows) / cfg.processes, 3),
            "max_send_lag_p99_ms": max((r["send_lag_p99_ms"] for r in rows if r["send_lag_p99_ms"] is not None), default=None),
            "verdict": generator_verdict(rows, cfg.processes),
        },
        "mixed": mixed_rows,
        "mixed_targets": check_mixed_targets(mixed_rows),
        "warmup": warm,
        "server": {"workers": cfg.workers, "events": cfg.events, "tokens": cfg.tokens, "ready_s": round(ready_s, 1)},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "data": {"users": cfg.n_users, "items": cfg.n_items, "days": cfg.n_days, "bundle": str(bundle),
                 "bundle_trees": _trees(bundle)},
        "wall_s": round(time.monotonic() - t_start, 1),
    }
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        plot(rows, out_dir / "serve_latency.png")
        plot_timeline(timelines, cfg.warmup_s, out_dir / "serve_timeline.png")
        (out_dir / "serve.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def per_rank_ms(m0: dict, m1: dict, seconds: str) -> float | None:
    """Milliseconds per Rank the engine spent between two scrapes (`seconds`: its wall "engine_s" or its
    thread CPU "engine_cpu_s"); None when no Rank reached the engine."""
    n = m1["engine_n"] - m0["engine_n"]
    return round(1e3 * (m1[seconds] - m0[seconds]) / n, 3) if n > 0 else None


def rank_phases(gen, server, server_pids: list[int], triton: list[int], cfg: BenchConfig,
                inproc: dict[int, dict] | None, timelines: list) -> list[dict]:
    """The Rank phases at every candidate count: the open loop at the offered rate, then saturation at
    each concurrency. Each row: latency, throughput, errors, server CPU per Rank (the supervisor and
    every worker; Triton apart) and, given the in-process engine's figures, their ratios."""
    rows = []
    phases = [("open", None)] + [("closed", c) for c in cfg.saturation_concurrency]
    for k, n in enumerate(cfg.candidates):
        for j, (kind, concurrency) in enumerate(phases):
            rate = cfg.offered_rps if kind == "open" else None
            m0 = server.scrape()
            counts0 = m0["ranks_per_worker"]
            t0, s0, tr0 = time.monotonic(), cpu_seconds(server_pids), cpu_seconds(triton)
            raw = gen.run(kind, n, rate, concurrency or 0, cfg.warmup_s, cfg.seconds, seed=10 * k + j)
            timelines.append((f"{'null ' if inproc is None else ''}{kind} {n} c" + (f" @{rate:g}/s" if rate else
                              f" x{concurrency}"), raw))
            wall = time.monotonic() - t0  # (CPU over the whole phase: warm-up and tail included)
            row = summarize(kind, n, rate, raw, cfg.warmup_s, cfg.seconds)
            server_cpu_s = cpu_seconds(server_pids) - s0
            row["server_cpu_cores"] = round(server_cpu_s / wall, 3)
            row["triton_cpu_cores"] = round((cpu_seconds(triton) - tr0) / wall, 3)
            m1 = server.scrape()
            counts1 = m1["ranks_per_worker"]
            answered = {w: int(counts1[w] - counts0.get(w, 0)) for w in sorted(counts1)}
            row["server_engine_mean_ms"] = per_rank_ms(m0, m1, "engine_s")
            row["server_engine_cpu_ms"] = per_rank_ms(m0, m1, "engine_cpu_s")
            row["requests_per_worker"] = answered
            total = sum(answered.values())
            row["server_cpu_ms_per_request"] = round(1e3 * server_cpu_s / total, 3) if total else None
            row["requests_per_server_core_s"] = round(total / server_cpu_s, 1) if server_cpu_s else None
            row["concurrency"] = concurrency
            if inproc is not None:
                row["inprocess_p50_ms"] = inproc[n]["p50_ms"]
                row["inprocess_p99_ms"] = inproc[n]["p99_ms"]
                row["overhead_ratio_p50"] = round(row["p50_ms"] / inproc[n]["p50_ms"], 2) if row["p50_ms"] else None
                row["cpu_ratio_to_engine"] = (round(row["server_cpu_ms_per_request"] / inproc[n]["p50_ms"], 2)
                                              if row["server_cpu_ms_per_request"] else None)
            log.info("%s%s", "null service: " if inproc is None else "", row)
            rows.append(row)
    return rows


def mixed_phase(gen, server, server_pids: list[int], triton: list[int], cfg: BenchConfig, n: int, key, events_rate: float,
                seed: int, timelines: list) -> dict:
    """One mixed phase: Ranks at the offered rate beside LogEvents at `events_rate` from the users of pool
    `key`; the Rank and LogEvents latencies, and from the server's metrics over the phase (warm-up
    included) the encoder calls Rank issued by cause, degraded answers by reason, history items the
    pooled tower left out, and the encoder's share of the Ranks' time."""
    m0, s0, tr0, t0 = server.scrape(), cpu_seconds(server_pids), cpu_seconds(triton), time.monotonic()
    per_call = 1 if key == n else cfg.heavy_events_per_call
    raw = gen.run("mixed", key, cfg.offered_rps, 0, cfg.warmup_s, cfg.seconds, seed=seed, events_rate=events_rate,
                  events_per_call=per_call)
    timelines.append((f"mixed {n} c @{cfg.offered_rps:g}/s + {events_rate:g} events/s", raw))
    wall, m1 = time.monotonic() - t0, server.scrape()
    row = summarize("mixed", n, cfg.offered_rps, raw, cfg.warmup_s, cfg.seconds)
    ranks = sum(m1["ranks_per_worker"].values()) - sum(m0["ranks_per_worker"].values())
    delta = lambda name: {c: int(v - m0[name].get(c, 0)) for c, v in m1[name].items() if v - m0[name].get(c, 0)}  # noqa: E731
    calls, degraded = delta("rank_encoder_calls"), delta("degraded")
    gc_count, gc_over = delta("gc_count"), delta("gc_over_100ms")
    gc_s = {g: round(v - m0["gc_s"].get(g, 0.0), 3) for g, v in m1["gc_s"].items()}
    row.update({
        "phase": "mixed", "events_per_s": events_rate, "events_per_call": per_call, "ranks_counted_by_server": int(ranks),
        "server_cpu_cores": round((cpu_seconds(server_pids) - s0) / wall, 3),
        "triton_cpu_cores": round((cpu_seconds(triton) - tr0) / wall, 3),
        "rank_encoder_calls": sum(calls.values()), "rank_encoder_calls_by_cause": calls,
        "degraded_by_reason": degraded,
        "degraded_share": round(sum(degraded.values()) / ranks, 5) if ranks else None,
        "history_items_skipped": int(m1["history_skipped"] - m0["history_skipped"]),
        # lookups of the engine's caches in the phase ("sequence_user:miss": the sequence model's user state
        # recomputed after a new engagement)
        "cache_lookups": delta("cache"),
        # the server's garbage collections in the phase (every worker), by generation, and the event-loop
        # probes that ran over 100 ms late (semrank_event_loop_lag_seconds)
        "gc_collections": gc_count, "gc_seconds": gc_s, "gc_over_100ms": gc_over,
        # the engine inside the server during this phase (semrank_rank_engine_seconds), beside the warm figure
        "server_engine_mean_ms": per_rank_ms(m0, m1, "engine_s"),
        "server_engine_cpu_ms": per_rank_ms(m0, m1, "engine_cpu_s"),
        "loop_lag_over_100ms": int(m1["loop_lag_over_100ms"] - m0["loop_lag_over_100ms"]),
        "ranks_needing_encoder": round(calls.get("user_text", 0) / ranks, 4) if ranks else None,
        "triton_calls": int(m1["triton_calls"] - m0["triton_calls"]),
        "encoder_share_of_rank_time": (round((m1["triton_s"] - m0["triton_s"]) / (m1["rank_s"] - m0["rank_s"]), 4)
                                       if m1["rank_s"] > m0["rank_s"] else None),
    })
    return row


async def _drop_stream(url: str, stream: str) -> None:
    import nats

    nc = await nats.connect(url)
    js = nc.jetstream()
    for delete, what in ((js.delete_stream, stream), (js.delete_object_store, f"{stream}_SNAPSHOTS"),
                         (js.delete_key_value, f"{stream}_CONTROL")):
        try:
            await delete(what)
        except Exception:  # noqa: BLE001 - not made in this run
            pass
    await nc.close()


def _trees(bundle: Path) -> int | None:
    try:
        return sum(1 for line in open(bundle / "ranker.txt") if line.startswith("Tree="))
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = BenchConfig()
    p.add_argument("--work-dir", type=Path, default=d.work_dir, help="shop, bundle and server state (reused)")
    p.add_argument("--out-dir", type=Path, default=None, help="also write serve.json and serve_latency.png here")
    p.add_argument("--seconds", type=float, default=d.seconds, help="measured seconds per phase")
    p.add_argument("--warmup-s", type=float, default=d.warmup_s, help="untimed load before each phase")
    p.add_argument("--candidates", type=int, nargs="+", default=list(d.candidates))
    p.add_argument("--rps", type=float, default=d.offered_rps, help="offered load of the open-loop phases")
    p.add_argument("--concurrency", type=int, nargs="*", default=list(d.saturation_concurrency),
                   help="requests in flight at saturation; one row per value (none: no saturation phase)")
    p.add_argument("--processes", type=int, default=d.processes, help="load-generator processes")
    p.add_argument("--channels", type=int, default=d.channels, help="gRPC channels per generator process")
    p.add_argument("--bench-users", type=int, default=d.bench_users)
    p.add_argument("--inprocess-reps", type=int, default=d.inprocess_reps)
    p.add_argument("--users", type=int, default=d.n_users, help="synthetic shop size")
    p.add_argument("--items", type=int, default=d.n_items)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--prepare-only", action="store_true", help="make the shop, bundle and snapshot, then exit")
    p.add_argument("--workers", type=int, default=d.workers, help="semrank serve --workers (use --channels >= 16)")
    p.add_argument("--events", choices=("local", "jetstream"), default=d.events)
    p.add_argument("--nats-url", default=d.nats_url)
    p.add_argument("--tokens", action="store_true", help="bearer tokens on (the production configuration)")
    p.add_argument("--mixed-candidates", type=int, nargs="*", default=list(d.mixed_candidates),
                   help="sizes of the mixed phase (Ranks with tokens + LogEvents); none: skip it")
    p.add_argument("--events-rate", type=float, default=d.mixed_events_rate, help="LogEvents events/s in the mixed phase")
    p.add_argument("--no-null-service", action="store_true", help="skip the null-service floor (half the phases)")
    p.add_argument("--sequence", action="store_true",
                   help="a bundle with a sequence model (issue 31): the pooled tower plus sequence_score")
    p.add_argument("--tower", choices=("pooled", "text"), default=d.tower,
                   help="the bench bundle's user tower (text: every event makes the next Rank call Triton)")
    p.add_argument("--heavy-mix", nargs=2, type=float, action="append", default=None, metavar=("EVENTS_PER_S", "USERS"),
                   help="a heavier mixed phase, no target (repeatable; default 1000 events/s from 2000 users, 20 per call; "
                        "--heavy-mix 0 0: none)")
    p.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                   help="one more `semrank serve` argument for the measured server (repeatable; "
                        "--serve-arg=--snapshot-interval-s --serve-arg=0)")
    a = p.parse_args(argv)
    heavy = d.heavy_mixes if a.heavy_mix is None else tuple((r, int(u)) for r, u in a.heavy_mix if r > 0 and u > 0)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads (see bench/encoder.py)
    # SIGTERM unwinds like Ctrl-C, so the server (and its Triton) and the generators are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = BenchConfig(
        work_dir=a.work_dir, seconds=a.seconds, warmup_s=a.warmup_s, candidates=tuple(a.candidates), offered_rps=a.rps,
        saturation_concurrency=tuple(a.concurrency), processes=a.processes, channels=a.channels, bench_users=a.bench_users,
        inprocess_reps=a.inprocess_reps, n_users=a.users, n_items=a.items, seed=a.seed,
        workers=a.workers, events=a.events, nats_url=a.nats_url, tokens=a.tokens,
        mixed_candidates=tuple(a.mixed_candidates), mixed_events_rate=a.events_rate, heavy_mixes=heavy, tower=a.tower,
        sequence=a.sequence,
        null_service=not a.no_null_service, serve_args=tuple(a.serve_arg),
    )
    if a.prepare_only:
        shop, _ = prepare(cfg)
        online_snapshot(cfg.work_dir / "state", shop, SEQUENCE_ITEMS if cfg.sequence else 0)
        return 0
    print(json.dumps(run(cfg, a.out_dir), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
