"""The service on Redis while Redis fails (issue 14, problems 2 and 4), against a real redis-server
the test starts and kills on a port of its own.

- Redis down: Rank answers, degraded (`online_store_unavailable`), never UNKNOWN and never with
  Redis's address; the overall health stays SERVING while the readiness name
  (`semrank.readiness`) turns NOT_SERVING.
- LogEvents while Redis is down tells the truth: the events are stored in the event log
  (UNAVAILABLE, ErrorInfo EVENTS_STORED_NOT_APPLIED, `stored` = 3: do not resend), and once
  Redis is back they reach the features, once.
"""

from __future__ import annotations

from contextlib import contextmanager
from datetime import datetime, timedelta, timezone

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from featurizer.definitions import NAMES
from featurizer.store.config import RedisConfig
from semrank.ranking.v1 import ranking_service_pb2 as pb
from serving.config import ServeConfig
from serving.server import READINESS
from tests.integration.production_kit import (
    RPC_TIMEOUT_S,
    contributions,
    engaged_users,
    health_status,
    rank,
    stub,
    timestamp,
)
from tests.integration.serving_kit import RedisProcess, ServerThread, error_info, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


@contextmanager
def served_on_redis(small_shop, small_bundle, tmp_path, namespace: str):
    """(redis, server thread, channel): a real server whose online store is a redis-server of the
    test's own, which the test may kill, restart or flush; the Redis is killed at the end."""
    redis = RedisProcess(tmp_path / "redis").start()
    cfg = ServeConfig(bundle_dir=small_bundle[0], data_dir=small_shop, state_dir=tmp_path / "state", port=0,
                      reload_poll_s=0, encoder_timeout_s=5.0, readiness_interval_s=0.2,
                      store=RedisConfig(url=redis.url, namespace=namespace, socket_timeout_s=1.0))
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


def test_lost_redis_data_is_noticed_marked_and_rebuilt_from_the_log(small_shop, small_bundle, shop, catalog, tmp_path):
    """Issue 14, problem 5: a FLUSHALL (or failover to an empty replica) was silent and permanent.
    Now the readiness probe notices the missing state row, answers are marked degraded while the
    single writer refills the store from the data directory and the event log, and the features
    come back as they were."""
    import redis as redis_py

    user, items = engaged_users(shop)[0], catalog[:10]
    with served_on_redis(small_shop, small_bundle, tmp_path, "redis-loss-test") as (redis, st, channel):
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
        for a, b in zip(before, after):
            np.testing.assert_array_equal(a, b)
        assert not rank(channel, user, items).degraded and rebuilds() == 1
