"""`semrank serve --workers 2 --events jetstream` as a real process tree (issue 13): two workers on
one port behind SO_REUSEPORT, one Triton, one set of embedding files, one /metrics, read-your-writes
between workers, and a worker that dies is restarted.
"""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from pathlib import Path

import grpc
import nats
import pytest

from semrank.ranking.v1 import ranking_service_pb2 as pb
from tests.integration.production_kit import RPC_TIMEOUT_S, rank, stub
from tests.integration.serving_kit import (
    MACHINE_NATS,
    ServeProcess,
    _cmdline,
    live_group_members,
    metric,
    scrape_metrics,
    wait_until,
)
from tests.integration.test_scale_out import purchases

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


def children(pid: int) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                out.append(int(p.name))
    return out


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        kids = children(todo.pop())
        out += kids
        todo += kids
    return out


def tritonservers_under(pid: int) -> list[int]:
    return [p for p in descendants(pid) if any(a.endswith("tritonserver") for a in _cmdline(p)[:1])]


def serve_workers(pid: int) -> list[int]:
    return [c for c in children(pid) if "serve" in _cmdline(c) and "--worker-of" in _cmdline(c)]


def test_two_workers_share_one_port_one_triton_one_embedding_set_and_one_metrics(small_shop, small_bundle, catalog,
                                                                                 tmp_path):
    name = f"TEST_{uuid.uuid4().hex[:12]}"
    state = tmp_path / "state"
    proc = ServeProcess(["--bundle", str(small_bundle[0]), "--data", str(small_shop), "--state-dir", str(state),
                         "--port", "0", "--reload-poll-s", "0", "--metrics-port", "0", "--workers", "2",
                         "--events", "jetstream", "--nats-url", MACHINE_NATS, "--stream", name,
                         "--subject-prefix", f"test.{name}"], tmp_path / "serve.log").start()
    try:
        workers = serve_workers(proc.pid)
        assert len(workers) == 2, f"expected 2 workers under the supervisor, got {workers}\n{proc.log_tail()}"
        assert len(tritonservers_under(proc.pid)) == 1, f"one Triton for both workers: {tritonservers_under(proc.pid)}"
        key_dirs = list((state / "embeddings").iterdir())
        assert len(key_dirs) == 1 and list(key_dirs[0].glob("emb-*.safetensors")), "the catalog embedded once"
        assert not list((state / "workers").glob("*/embeddings")), "no worker keeps embeddings of its own"
        base = key_dirs[0] / "base.safetensors"
        for w in workers:  # both map the one file (copy-on-write: its pages are shared)
            assert str(base) in Path(f"/proc/{w}/maps").read_text(), f"worker {w} does not map {base}"

        channels = [grpc.insecure_channel(f"127.0.0.1:{proc.port}", options=[("grpc.use_local_subchannel_pool", 1)])
                    for _ in range(16)]
        try:
            for k, ch in enumerate(channels):  # 16 connections: the kernel spreads them over both workers
                assert not rank(ch, f"w-user-{k}", catalog[:10]).degraded
            metrics_port = int(proc.metrics_port)
            samples = scrape_metrics(metrics_port)
            per_worker = [metric(samples, "semrank_rpc_latency_seconds_count", worker=str(w), method="Rank", code="OK")
                          for w in (0, 1)]
            assert all(n > 0 for n in per_worker) and sum(per_worker) >= 16, per_worker
            assert metric(samples, "semrank_workers_up") == 2

            # Read-your-writes across workers: log on one connection, rank on every other with the token.
            ack = stub(channels[0]).LogEvents(iter([pb.LogEventsRequest(events=purchases("w-rw", catalog[:3], "w"))]),
                                              timeout=RPC_TIMEOUT_S)
            assert ack.accepted == 3 and ack.sequence > 0
            for ch in channels[1:]:
                r = rank(ch, "w-rw", catalog[:10], min_sequence=ack.sequence)
                assert not r.degraded, r.degraded_reason
        finally:
            for ch in channels:
                ch.close()

        victim = workers[0]
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: len(serve_workers(proc.pid)) == 2 and victim not in serve_workers(proc.pid), 120,
                   "the dead worker restarted")
        wait_until(lambda: metric(scrape_metrics(int(proc.metrics_port)), "semrank_workers_up") == 2, 120,
                   "both workers up again")
        assert sum(metric(scrape_metrics(int(proc.metrics_port)), "semrank_worker_restarts_total", worker=str(w))
                   for w in (0, 1)) == 1
        triton = tritonservers_under(proc.pid)
        assert proc.terminate() == 0, proc.log_tail()
        wait_until(lambda: not live_group_members(proc.pid), 60, "every process of the tree gone")
        wait_until(lambda: not [p for p in triton if Path(f"/proc/{p}").exists()], 60, "Triton stopped")
    finally:
        proc.kill()

        async def drop():
            nc = await nats.connect(MACHINE_NATS)
            for delete, what in ((nc.jetstream().delete_stream, name),
                                 (nc.jetstream().delete_object_store, f"{name}_SNAPSHOTS"),
                                 (nc.jetstream().delete_key_value, f"{name}_CONTROL")):
                try:
                    await delete(what)
                except Exception:  # noqa: BLE001
                    pass
            await nc.close()

        asyncio.run(drop())
