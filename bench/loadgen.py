"""The bench's load generator: asyncio grpc.aio in child processes, open or closed loop.

`LoadGenerator(port, pools, processes, channels, timeout_s)` spawns `processes` children (spawn,
not fork: no inherited gRPC state), each with `channels` channels, and keeps them for every phase:

- open loop (`run("open", n, rate, ...)`): requests leave on a fixed schedule (the processes
  interleave one schedule); latency counts from the *scheduled* send time, so when the generator
  or the server falls behind it shows as latency, not as fewer requests (coordinated omission);
  each sample also records the send lag (actual minus scheduled send time);
- closed loop (`run("closed", n, None, concurrency, ...)`): `concurrency` requests always in flight;
- mixed (`run("mixed", n, rate, ..., events_rate=E, events_per_call=K)`): the open loop of Ranks, plus
  LogEvents calls of K clicks each (default 1) at E events/s from the same users (a writer token); every Rank of a user who
  logged an event carries that call's `sequence` as `min_sequence` (read-your-writes). The Rank
  bytes get the field appended (protobuf: a later field wins), so they stay serialised in advance.

Requests are serialised in advance and sent as bytes (the client does no proto work but parse
the small response, to count degraded answers). `summarize` turns the raw samples into a row.

The generator must not add latency of its own: its garbage collector is off while a phase runs
(collected between phases; what set-up made is frozen), and a probe measures how late its event
loop wakes (`generator_loop_lag_max_ms`): a stall there would show as Rank latency that the server
never caused.
"""

from __future__ import annotations

import asyncio
import gc
import multiprocessing as mp
import random
import time

import numpy as np

RANK_METHOD = "/semrank.ranking.v1.RankingService/Rank"
LOG_EVENTS_METHOD = "/semrank.ranking.v1.RankingService/LogEvents"


def with_min_sequence(request: bytes, seq: int) -> bytes:
    """A serialised RankRequest with min_sequence (field 7, varint) appended."""
    out = bytearray(request)
    out.append(7 << 3)
    while True:
        b, seq = seq & 0x7F, seq >> 7
        out.append(b | (0x80 if seq else 0))
        if not seq:
            return bytes(out)


def serialize(user: str, ids: list[str], top_k: int) -> bytes:
    from semrank.ranking.v1 import ranking_service_pb2 as pb

    return pb.RankRequest(user_id=user, candidates=[pb.RankCandidate(item_id=i) for i in ids], top_k=top_k).SerializeToString()


def _generator_main(conn, port: int, pools: dict[int, list[bytes]], channels: int, timeout_s: float,
                    token: str | None = None, mixed: dict | None = None) -> None:
    """One load-generator process: runs the phases the parent sends, returns raw samples."""
    asyncio.run(_generator(conn, port, pools, channels, timeout_s, token, mixed))


async def _generator(conn, port: int, pools: dict[int, list[bytes]], channels: int, timeout_s: float,
                     token: str | None = None, mixed: dict | None = None) -> None:
    import grpc

    from semrank.ranking.v1 import ranking_service_pb2 as pb

    chans = [grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
             for _ in range(channels)]
    calls = [ch.unary_unary(RANK_METHOD) for ch in chans]  # bytes in, bytes out: no client-side proto work
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    mixed = mixed or {}
    writer_md = (("authorization", f"Bearer {mixed['writer_token']}"),) if mixed.get("writer_token") else None
    log_events = [ch.stream_unary(LOG_EVENTS_METHOD, request_serializer=pb.LogEventsRequest.SerializeToString,
                                  response_deserializer=pb.LogEventsResponse.FromString) for ch in chans]
    loop = asyncio.get_running_loop()
    gc.freeze()  # the pools and channels: never walked by a collection
    conn.send("ready")
    while True:
        cmd = await loop.run_in_executor(None, conn.recv)
        if cmd is None:
            break
        gc.collect()
        gc.disable()  # no collection pause inside a phase (between phases: above)
        kind, n, rate, concurrency, t0, warmup_s, seconds, phase_seed, events_rate, per_call = cmd
        reqs = pools[n]
        rng = random.Random(phase_seed)
        samples: list[tuple[float, float, float, int]] = []  # (scheduled/sent, done, send lag, status)
        writes: list[tuple[float, float, int]] = []  # mixed: LogEvents (scheduled, done, status)
        tokens: dict[str, int] = {}  # mixed: user -> the sequence of their last logged event
        errors: dict[str, int] = {}
        degraded = stale = tokened = accepted = duplicates = 0

        async def one(k: int, sched: float, lag: float) -> None:
            nonlocal degraded, stale, tokened
            j = rng.randrange(len(reqs))
            req = reqs[j]
            if kind == "mixed" and (seq := tokens.get(mixed["users"][n][j])):
                req, tokened = with_min_sequence(req, seq), tokened + 1
            try:
                raw = await calls[k % channels](req, timeout=timeout_s, metadata=metadata)
            except grpc.aio.AioRpcError as e:
                done = time.monotonic()
                errors[e.code().name] = errors.get(e.code().name, 0) + 1
                samples.append((sched, done, lag, 1))
                return
            done = time.monotonic()
            resp = pb.RankResponse.FromString(raw)
            degraded += resp.degraded
            stale += resp.degraded_reason.startswith("stale_features") or "; stale_features" in resp.degraded_reason
            samples.append((sched, done, lag, 0))

        async def write(k: int, sched: float) -> None:
            from datetime import datetime, timezone

            nonlocal accepted, duplicates
            users, evs = [], []
            now = datetime.now(timezone.utc).replace(tzinfo=None)
            for e in range(per_call):
                j = rng.randrange(len(reqs))
                user, item = mixed["users"][n][j], rng.choice(mixed["items"])
                # Ids of this run only: the server keeps event ids (exactly once, 24 h), and a rerun on the same
                # state would send duplicates, which are neither stored nor applied and return no sequence.
                ev = pb.Event(event_id=f"bench-{mixed['run']}-{phase_seed}-{k}-{e}", user_id=user, item_id=item,
                              type=pb.EVENT_TYPE_CLICK)
                ev.ts.FromDatetime(now)
                users.append(user)
                evs.append(ev)
            try:
                resp = await log_events[k % channels](iter([pb.LogEventsRequest(events=evs)]), timeout=timeout_s,
                                                      metadata=writer_md)
            except grpc.aio.AioRpcError as e:
                errors["LogEvents " + e.code().name] = errors.get("LogEvents " + e.code().name, 0) + 1
                writes.append((sched, time.monotonic(), 1))
                return
            writes.append((sched, time.monotonic(), 0))
            accepted, duplicates = accepted + resp.accepted, duplicates + resp.duplicates
            if resp.sequence:
                for user in users:
                    tokens[user] = max(tokens.get(user, 0), resp.sequence)

        async def writer() -> None:
            period, tasks, i = per_call / events_rate, set(), 0
            while (sched := t0 + i * period) < end:
                delay = sched - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                task = asyncio.create_task(write(i, sched))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                i += 1
            if tasks:
                await asyncio.wait(tasks)

        end = t0 + warmup_s + seconds
        cpu0 = cpu1 = None
        lag_max = 0.0  # the generator's own worst event-loop wake-up delay in the measured window

        async def probe(every: float = 0.01) -> None:
            nonlocal lag_max
            while (before := time.monotonic()) < end:
                await asyncio.sleep(every)
                if before >= t0 + warmup_s:
                    lag_max = max(lag_max, time.monotonic() - before - every)

        probing = asyncio.create_task(probe())
        while time.monotonic() < t0:
            await asyncio.sleep(t0 - time.monotonic())
        writing = asyncio.create_task(writer()) if kind == "mixed" else None
        if kind in ("open", "mixed"):
            period, tasks, i = 1.0 / rate, set(), 0
            while True:
                sched = t0 + i * period
                if sched >= end:
                    break
                if cpu0 is None and sched >= t0 + warmup_s:
                    cpu0 = time.process_time()
                delay = sched - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                task = asyncio.create_task(one(i, sched, time.monotonic() - sched))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                i += 1
            cpu1 = time.process_time()
            if tasks:
                await asyncio.wait(tasks)
        else:
            async def worker(w: int) -> None:
                nonlocal cpu0
                k = w
                while (now := time.monotonic()) < end:
                    if cpu0 is None and now >= t0 + warmup_s:
                        cpu0 = time.process_time()
                    await one(k, now, 0.0)
                    k += concurrency
            await asyncio.gather(*(worker(w) for w in range(concurrency)))
            cpu1 = time.process_time()
        if writing is not None:
            await writing
        await probing
        gc.enable()
        conn.send({"samples": samples, "errors": errors, "degraded": degraded, "stale": stale, "tokened": tokened,
                   "accepted": accepted, "duplicates": duplicates, "lag_max_s": lag_max,
                   "writes": writes, "cpu_s": (cpu1 - cpu0) if cpu0 is not None else 0.0})
    for ch in chans:
        await ch.close()


class LoadGenerator:
    """`processes` generator processes (spawned: no forked gRPC state), each with `channels` channels."""

    def __init__(self, port: int, pools: dict[int, list[bytes]], processes: int, channels: int, timeout_s: float,
                 token: str | None = None, mixed: dict | None = None):
        """`mixed`: {"users": {n: the user of each pooled request}, "items": [...], "writer_token": ...,
        "run": an id of this run, in every event id}."""
        ctx = mp.get_context("spawn")
        self.conns, self.procs = [], []
        for _ in range(processes):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_generator_main, args=(child, port, pools, channels, timeout_s, token, mixed),
                            daemon=True)
            p.start()
            self.conns.append(parent)
            self.procs.append(p)
        for c in self.conns:
            if c.recv() != "ready":
                raise RuntimeError("load generator failed to start")

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def run(self, kind: str, n: int, rate: float | None, concurrency: int, warmup_s: float, seconds: float,
            seed: int, events_rate: float = 0.0, events_per_call: int = 1) -> dict:
        """One phase on every process; open loop: process j sends requests j, j+P, ... of one schedule."""
        P = len(self.conns)
        t0 = time.monotonic() + 0.5
        for j, c in enumerate(self.conns):
            if kind in ("open", "mixed"):
                # Interleave the processes' schedules: together they send at `rate`, evenly spaced.
                cmd = (kind, n, rate / P, 0, t0 + j / rate, warmup_s, seconds, seed * 100 + j, events_rate / P,
                       events_per_call)
            else:
                cmd = (kind, n, None, max(1, concurrency // P + (j < concurrency % P)), t0, warmup_s, seconds,
                       seed * 100 + j, 0.0, 1)
            c.send(cmd)
        parts = [c.recv() for c in self.conns]
        return {"t0": t0, "parts": parts}

    def close(self) -> None:
        for c in self.conns:
            try:
                c.send(None)
            except OSError:
                pass
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()


def summarize(kind: str, n: int, rate: float | None, raw: dict, warmup_s: float, seconds: float) -> dict:
    t_measure = raw["t0"] + warmup_s
    samples = [s for part in raw["parts"] for s in part["samples"] if s[0] >= t_measure]
    ok = np.array([(s[1] - s[0]) for s in samples if s[3] == 0]) * 1e3
    lags = np.array([s[2] for s in samples]) * 1e3
    errors = sum(1 for s in samples if s[3] != 0)
    if kind in ("open", "mixed"):
        # Responses to the requests scheduled in the window, over the time until the last came back.
        span = max((s[1] for s in samples), default=t_measure + seconds) - t_measure
        achieved = len(ok) / max(span, seconds)
    else:
        achieved = sum(1 for s in samples if s[3] == 0 and s[1] <= t_measure + seconds) / seconds
    pct = (lambda q: round(float(np.percentile(ok, q)), 3)) if len(ok) else (lambda q: None)
    codes: dict[str, int] = {}
    for part in raw["parts"]:
        for k, v in part["errors"].items():
            codes[k] = codes.get(k, 0) + v
    return {
        "candidates": n,
        "offered_rps": rate if kind != "closed" else "saturation",
        "achieved_rps": round(achieved, 1),
        "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99),
        "errors": errors,
        "error_codes": codes,
        "degraded": sum(part["degraded"] for part in raw["parts"]),
        "requests": len(samples),
        "send_lag_p99_ms": round(float(np.percentile(lags, 99)), 3) if kind != "closed" and len(lags) else None,
        "client_cpu_cores": round(sum(part["cpu_s"] for part in raw["parts"]) / seconds, 3),
        "generator_loop_lag_max_ms": round(max(part["lag_max_s"] for part in raw["parts"]) * 1e3, 1),
        **(_mixed_summary(raw, t_measure) if kind == "mixed" else {}),
    }


def _mixed_summary(raw: dict, t_measure: float) -> dict:
    writes = [w for part in raw["parts"] for w in part["writes"] if w[0] >= t_measure]
    ok = np.array([w[1] - w[0] for w in writes if w[2] == 0]) * 1e3
    pct = (lambda q: round(float(np.percentile(ok, q)), 3)) if len(ok) else (lambda q: None)
    return {"log_events_calls": len(writes), "log_events_errors": sum(1 for w in writes if w[2]),
            "log_events_p50_ms": pct(50), "log_events_p99_ms": pct(99),
            "ranks_with_token": sum(part["tokened"] for part in raw["parts"]),
            # events stored and applied, and events the server had already (over the whole phase)
            "events_accepted": sum(part["accepted"] for part in raw["parts"]),
            "events_duplicate": sum(part["duplicates"] for part in raw["parts"]),
            "stale_features": sum(part["stale"] for part in raw["parts"])}
