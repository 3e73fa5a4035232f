"""Helpers shared by the production-service integration tests (test_triton_failures, test_durability,
test_request_handling, test_experiments_and_auth): calls, waits and a background load of good Ranks.
"""

from __future__ import annotations

import os
import threading
from datetime import datetime, timezone
from pathlib import Path

import grpc
import polars as pl
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc

from semrank.ranking.v1 import ranking_service_pb2 as pb
from semrank.ranking.v1 import ranking_service_pb2_grpc as pb_grpc
from serving.server import SERVICE_NAME
from tests.integration.serving_kit import (
    ServerThread,
    kill_group,
    live_group_members,
    tritonservers_in_group,
    wait_until,
)

RPC_TIMEOUT_S = 60  # per call; a liveness bound
TRITON_EXIT_S = 90  # a Triton group must be gone this long after its server died or stopped
MAIN_MAX_CANDIDATES = 50
MAIN_MAX_MESSAGE_BYTES = 64 * 1024

def engaged_users(shop) -> list[str]:
    """Users with engagement history in the data directory, most engaged first."""
    eng = shop.events.filter(pl.col("event") != "impression").group_by("user_id").len()
    return eng.sort(["len", "user_id"], descending=[True, False])["user_id"].to_list()


def stub(channel) -> pb_grpc.RankingServiceStub:
    return pb_grpc.RankingServiceStub(channel)


def rank(channel, user_id: str, item_ids: list[str], **kw) -> pb.RankResponse:
    cands = [pb.RankCandidate(item_id=i) for i in item_ids] + list(kw.pop("extra", []))
    return stub(channel).Rank(pb.RankRequest(user_id=user_id, candidates=cands, **kw), timeout=RPC_TIMEOUT_S)


def timestamp(t: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(t.astimezone(timezone.utc).replace(tzinfo=None))
    return ts


def contributions(resp: pb.RankResponse, family: str) -> dict[str, float]:
    """item_id -> that family's score contribution (the response must have been asked with explain)."""
    out = {}
    for it in resp.items:
        values = [c.contribution for c in it.contributions if c.family == family]
        assert len(values) == 1, f"no {family!r} contribution for {it.item_id}: {it}"
        out[it.item_id] = values[0]
    return out


def health_status(channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=RPC_TIMEOUT_S
    ).status


def kill_tritons(st: ServerThread) -> list[int]:
    """SIGKILL the process group of every Triton this in-process server started; wait until each is gone."""
    pgids = [tp.pid for tp in st.server.tritons.values() if tp.pid is not None]
    for pgid in pgids:
        kill_group(pgid)
    for pgid in pgids:
        wait_until(lambda: not live_group_members(pgid), TRITON_EXIT_S, f"Triton group {pgid} to die after SIGKILL")
    return pgids


def atomic_write(path: Path, data: str | bytes) -> None:
    """Replace a file in one rename, so the bundle watcher never sees it half-written."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def wait_triton_groups_gone(pgids: list[int], when: str = "") -> None:
    """Every Triton process group (worker, tritonserver, stub) exits within TRITON_EXIT_S."""
    for pgid in pgids:
        wait_until(lambda: not live_group_members(pgid), TRITON_EXIT_S, f"Triton group {pgid} to exit {when}")
        assert tritonservers_in_group(pgid) == []


class GoodTraffic:
    """Threads ranking valid requests in a loop until stopped; collects every outcome."""

    def __init__(self, channel, users: list[str], items: list[str], threads: int = 2):
        self.channel, self.users, self.items = channel, users, items
        self.results: list[object] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(threads)]

    def _run(self, k: int) -> None:
        n = 0
        while not self._stop.is_set():
            try:
                self.results.append(rank(self.channel, self.users[(k + n) % len(self.users)], self.items))
            except grpc.RpcError as e:
                self.results.append(e)
            n += 1

    def __enter__(self):
        for t in self._threads:
            t.start()
        wait_until(lambda: len(self.results) >= 2, 120, "the first good Ranks")
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in self._threads), "a good-traffic thread hung"

    def errors(self) -> list[grpc.RpcError]:
        return [r for r in self.results if isinstance(r, grpc.RpcError)]
