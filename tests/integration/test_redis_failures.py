"""The service on Redis while Redis fails (issue 14, problems 2 to 5), against a real redis-server
the test starts, kills, SIGSTOPs and flushes on a port of its own.

- Redis down: Rank answers, degraded (`online_store_unavailable`), never UNKNOWN and never with
  Redis's address; the overall health stays SERVING while the readiness name
  (`semrank.readiness`) turns NOT_SERVING.
- LogEvents while Redis is down tells the truth: the events are stored in the event log
  (UNAVAILABLE, ErrorInfo EVENTS_STORED_NOT_APPLIED, `stored` = 3: do not resend), and once
  Redis is back they reach the features, once.
- A hung Redis (SIGSTOP: connections accepted, nothing answered) never freezes the server: health
  answers, Ranks come back degraded within their deadline, and a LogEvents waits for the store's
  answer and then tells the truth.
- Lost data (FLUSHALL) is noticed, answers are marked, and the store is rebuilt from the log.
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from featurizer.definitions import NAMES
from featurizer.store.config import RedisConfig
from semrank.ranking.v1 import ranking_service_pb2 as pb
from serving.config import JetStreamConfig, ServeConfig
from serving.readiness import READINESS
from tests.integration.production_kit import (
    RPC_TIMEOUT_S,
    contributions,
    engaged_users,
    health_status,
    rank,
    stub,
    timestamp,
)
from tests.integration.serving_kit import MACHINE_NATS, RedisProcess, ServerThread, error_info, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


@contextmanager
def served_on_redis(small_shop, small_bundle, tmp_path, namespace: str, socket_timeout_s: float = 1.0,
                    events: JetStreamConfig | None = None):
    """(redis, server thread, channel): a real server whose online store is a redis-server of the
    test's own, which the test may kill, restart or flush; the Redis is killed at the end. `events`:
    JetStream instead of the local event log."""
    redis = RedisProcess(tmp_path / "redis").start()
    cfg = ServeConfig(bundle_dir=small_bundle[0], data_dir=small_shop, state_dir=tmp_path / "state", port=0,
                      reload_poll_s=0, encoder_timeout_s=5.0, readiness_interval_s=0.2,
                      store=RedisConfig(url=redis.url, namespace=namespace, socket_timeout_s=socket_timeout_s),
                      events=events)
    try:
        with ServerThread(cfg) as st, grpc.insecure_channel(f"127.0.0.1:{st.port}") as channel:
            yield redis, st, channel
    finally:
        redis.kill()


def readiness(channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=READINESS),
                                                     timeout=RPC_TIMEOUT_S).status


def test_redis_down_degrades_ranks_and_log_events_says_what_was_stored(small_shop, small_bundle, shop, catalog,
                                                                         tmp_path):
    user, items = engaged_users(shop)[0], catalog[:15]
    with served_on_redis(small_shop, small_bundle, tmp_path, "redis-failure-test") as (redis, st, channel):
        before = rank(channel, user, items)
        assert not before.degraded and readiness(channel) == health_pb2.HealthCheckResponse.SERVING

        redis.kill()
        down = rank(channel, user, items)  # answered, not UNKNOWN / UNAVAILABLE
        assert down.degraded and "online_store_unavailable" in down.degraded_reason, down.degraded_reason
        assert sorted(it.item_id for it in down.items) == sorted(items)
        assert str(redis.port) not in down.degraded_reason
        wait_until(lambda: readiness(channel) == health_pb2.HealthCheckResponse.NOT_SERVING, 30, "not ready")
        assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING

        now = datetime.now(timezone.utc)
        events = [pb.Event(ts=timestamp(now - timedelta(seconds=3 - k)), user_id="u-redis", item_id=items[k],
                           type=pb.EVENT_TYPE_PURCHASE, event_id=f"e-redis-{k}") for k in range(3)]
        with pytest.raises(grpc.RpcError) as e:
            stub(channel).LogEvents(iter([pb.LogEventsRequest(events=events)]), timeout=RPC_TIMEOUT_S)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value
        info = error_info(e.value)
        assert info.reason == "EVENTS_STORED_NOT_APPLIED" and info.metadata["stored"] == "3"
        assert "do not resend" in e.value.details() and str(redis.port) not in e.value.details()
        assert st.server.state.ingest.behind == 3

        redis.start()  # same port, same data (append-only file)
        wait_until(lambda: readiness(channel) == health_pb2.HealthCheckResponse.SERVING, 30, "ready again")
        assert st.server.state.ingest.behind == 0  # the readiness probe applied what Redis had missed
        after = rank(channel, "u-redis", items, explain=True)
        cold = rank(channel, "never-seen-redis-user", items, explain=True)
        assert not after.degraded
        mine, theirs = contributions(after, "personal"), contributions(cold, "personal")
        assert any(abs(mine[i] - theirs[i]) > 1e-6 for i in items[:3])  # the purchases reached the features
        engine = st.server.engine
        feats = engine.online.features("u-redis", items[:1], engine.now())
        assert feats[0, NAMES.index("user_purchases_30d")] == 3  # once each, not twice


@pytest.mark.parametrize("log", ["local", "jetstream"])
def test_lost_redis_data_is_noticed_marked_and_rebuilt_from_the_log(small_shop, small_bundle, shop, catalog, tmp_path,
                                                                    log, request):
    """Issue 14, problem 5: a FLUSHALL (or failover to an empty replica) was silent and permanent.
    Now the readiness probe notices the missing state row, answers are marked degraded while the
    single writer refills the store from the data directory and the event log (the local log, or
    the whole JetStream stream folded again), and the features come back as they were."""
    import redis as redis_py

    jetstream = None
    if log == "jetstream":
        name, prefix = request.getfixturevalue("stream")
        jetstream = JetStreamConfig(url=MACHINE_NATS, stream=name, subject_prefix=prefix)
    user, items = engaged_users(shop)[0], catalog[:10]
    with served_on_redis(small_shop, small_bundle, tmp_path, f"redis-loss-{log}", events=jetstream) as (
            redis, st, channel):
        now = datetime.now(timezone.utc)
        events = [pb.Event(ts=timestamp(now - timedelta(seconds=5 - k)), user_id="u-lost", item_id=items[k],
                           type=pb.EVENT_TYPE_PURCHASE, event_id=f"e-lost-{k}") for k in range(3)]
        assert stub(channel).LogEvents(iter([pb.LogEventsRequest(events=events)]), timeout=RPC_TIMEOUT_S).accepted == 3
        engine = st.server.engine
        at = engine.now()  # one instant for both reads: recency features move with the clock

        def state():
            return [engine.online.features(u, items, at) for u in (user, "u-lost")]

        before = state()
        client = redis_py.Redis.from_url(redis.url)
        client.flushall()
        client.close()
        rebuilds = lambda: st.server.metrics.registry.get_sample_value("semrank_store_rebuilds_total")  # noqa: E731
        wait_until(lambda: rebuilds() == 1, 60, "the lost store to be noticed")
        wait_until(lambda: readiness(channel) == health_pb2.HealthCheckResponse.SERVING, 120, "the rebuild")
        after = state()
        for who, a, b in zip((user, "u-lost"), before, after):
            differ = ~((a == b) | (np.isnan(a) & np.isnan(b)))
            assert not differ.any(), f"{who}: {[NAMES[j] for j in np.flatnonzero(differ.any(axis=0))]} differ after the refill"
        assert not rank(channel, user, items).degraded and rebuilds() == 1


def test_hung_redis_never_freezes_the_server(small_shop, small_bundle, shop, catalog, tmp_path):
    """Issue 14, problem 3: the synchronous Redis client ran on the event loop, so a SIGSTOPped
    Redis froze every call, health checks included, for its socket timeout per call. Each call
    here has a deadline (2 s) well under that timeout (6 s): a frozen loop misses it."""
    user, items = engaged_users(shop)[0], catalog[:12]
    deadline_s = 2.0
    with served_on_redis(small_shop, small_bundle, tmp_path, "redis-hang-test", socket_timeout_s=6.0) as (
            redis, st, channel):
        assert not rank(channel, user, items).degraded
        now = datetime.now(timezone.utc)
        events = [pb.Event(ts=timestamp(now - timedelta(seconds=3 - k)), user_id="u-hang", item_id=items[k],
                           type=pb.EVENT_TYPE_PURCHASE, event_id=f"e-hang-{k}") for k in range(3)]
        os.kill(redis.proc.pid, signal.SIGSTOP)
        try:
            for _ in range(3):  # the first read finds the store silent; the next ones fail at once
                down = stub(channel).Rank(pb.RankRequest(user_id=user, candidates=[pb.RankCandidate(item_id=i)
                                                                                    for i in items]), timeout=deadline_s)
                assert down.degraded and "online_store_unavailable" in down.degraded_reason, down.degraded_reason
                assert sorted(it.item_id for it in down.items) == sorted(items)
            outcome = {}

            def log_events():  # waits for the store's answer (its socket timeout), never a guess
                try:
                    stub(channel).LogEvents(iter([pb.LogEventsRequest(events=events)]), timeout=RPC_TIMEOUT_S)
                except grpc.RpcError as e:
                    outcome["error"] = e

            writer = threading.Thread(target=log_events)
            writer.start()
            wait_until(lambda: st.server.state.ingest.applied_seq >= 3 or not writer.is_alive(), 30, "the append")
            health = health_pb2_grpc.HealthStub(channel)
            assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=deadline_s).status == \
                health_pb2.HealthCheckResponse.SERVING  # while the write waits on the hung store
            assert stub(channel).Rank(pb.RankRequest(user_id=user, candidates=[pb.RankCandidate(item_id=items[0])]),
                                      timeout=deadline_s).degraded
            wait_until(lambda: health.Check(health_pb2.HealthCheckRequest(service=READINESS), timeout=deadline_s).status
                       == health_pb2.HealthCheckResponse.NOT_SERVING, 30, "not ready")
            writer.join(timeout=60)
            assert not writer.is_alive()
        finally:
            os.kill(redis.proc.pid, signal.SIGCONT)
        e = outcome["error"]
        assert e.code() == grpc.StatusCode.UNAVAILABLE, e
        info = error_info(e)
        assert info.reason == "EVENTS_STORED_NOT_APPLIED" and info.metadata["stored"] == "3", (info, e.details())

        wait_until(lambda: readiness(channel) == health_pb2.HealthCheckResponse.SERVING, 60, "ready again")
        assert st.server.state.ingest.behind == 0
        assert not rank(channel, user, items).degraded
        engine = st.server.engine
        feats = engine.online.features("u-hang", items[:1], engine.now())
        assert feats[0, NAMES.index("user_purchases_30d")] == 3  # once each
