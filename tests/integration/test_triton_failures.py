"""The service while its Triton dies: degraded answers only where needed, upserts refused but kept,
and the supervisor restarting a dead Triton. Faults: SIGKILL of the Triton process group.
"""

from __future__ import annotations

import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2

from ranker.bundle import load_bundle
from semrank.ranking.v1 import ranking_service_pb2 as pb
from serving.config import ServeConfig
from tests.integration.production_kit import (
    RPC_TIMEOUT_S,
    engaged_users,
    health_status,
    kill_tritons,
    rank,
    stub,
    wait_triton_groups_gone,
)
from tests.integration.serving_kit import (
    ServerThread,
    metric,
    scrape_metrics,
    tritonservers_in_group,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


# -- 1. Triton killed mid-run ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def kill_server(small_shop, small_bundle, tmp_path_factory):
    """Its Triton gets SIGKILLed by the tests (so nobody else uses it). A generous encoder deadline:
    before the kill no answer may be degraded on a slow machine; after it, failures come at once."""
    cfg = ServeConfig(bundle_dir=small_bundle[0], data_dir=small_shop, state_dir=tmp_path_factory.mktemp("kill-state"),
                      port=0, metrics_port=0, reload_poll_s=0, encoder_timeout_s=5.0, triton_supervise_s=0)
    with ServerThread(cfg) as st, grpc.insecure_channel(f"127.0.0.1:{st.port}") as channel:
        yield st, channel


INLINE_ITEMS = [
    pb.RankCandidate(item_id="inline-trail-shoe", title="Trailblazer Waterproof Trail Running Shoes",
                     category="Sports & Fitness", brand="Ironpeak", price=89.0),
    pb.RankCandidate(item_id="inline-kettle", title="Stainless Steel Electric Kettle 1.7L", category="Kitchen",
                     price=34.5),
]


def test_triton_killed_mid_run_every_rank_answers_degraded_only_where_needed(kill_server, shop, catalog):
    st, channel = kill_server
    users = engaged_users(shop)
    cached, uncached = users[:6], users[6:36]
    items = catalog[:20]
    version = load_bundle(st.server.cfg.bundle_dir).version
    results: list[tuple[bool, str, object]] = []  # (sent after the kill, user, response or RpcError)
    warm, killed = threading.Event(), threading.Event()

    def loop() -> None:
        k = 0
        # Before the kill: only the cached users, over and over (their user embeddings and the
        # inline items' embeddings are cached after the first round).
        while not killed.is_set():
            user = cached[k % len(cached)]
            results.append((False, user, _rank_or_error(channel, user, items)))
            k += 1
            if k >= 2 * len(cached):
                warm.set()
        # After the kill: users never ranked before (need Triton) between cached ones.
        for j, user in enumerate(uncached):
            for u in (user, cached[j % len(cached)]):
                results.append((True, u, _rank_or_error(channel, u, items)))

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        wait_until(warm.is_set, 120, "the warm-up round of Ranks")
        killed_groups = kill_tritons(st)  # while the loop keeps ranking
        assert killed_groups and all(tritonservers_in_group(g) == [] for g in killed_groups)
    finally:
        killed.set()
        thread.join(timeout=300)
    assert not thread.is_alive(), "the Rank loop hung after Triton died"

    errors = [(u, r) for _, u, r in results if isinstance(r, grpc.RpcError)]
    assert errors == [], f"Ranks failed: {errors[:3]}"
    for after, user, r in results:
        assert sorted(it.item_id for it in r.items) == sorted(items + [c.item_id for c in INLINE_ITEMS])
        assert r.model_version == version and not r.missing_ids
        if not after or user in cached:
            # Pre-kill answers, and cached users after it: every embedding was in a cache.
            assert not r.degraded, (after, user, r.degraded_reason)
        else:
            assert r.degraded and "encoder" in r.degraded_reason, (user, r.degraded_reason)
    n_degraded = sum(1 for after, u, _ in results if after and u not in cached)
    assert n_degraded == len(uncached)

    m = scrape_metrics(st.server.metrics_port)
    assert metric(m, "semrank_degraded_total") >= n_degraded
    assert metric(m, "semrank_triton_errors_total") > 0
    # 30 failing users > breaker_failures (5): the breaker opened, later calls were never sent,
    # and it cannot have closed again (that takes a successful probe).
    assert metric(m, "semrank_triton_errors_total", kind="circuit_open") > 0
    assert metric(m, "semrank_triton_breaker_state") >= 1
    assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING


def _rank_or_error(channel, user: str, items: list[str]):
    try:
        return rank(channel, user, items, extra=INLINE_ITEMS)
    except grpc.RpcError as e:
        return e


def test_upsert_while_triton_is_dead_is_unavailable_and_the_data_is_kept(kill_server, shop, catalog):
    st, channel = kill_server
    kill_tritons(st)  # already dead when the test above ran first
    items = [pb.RankCandidate(item_id="sku-while-dead", title="Insulated Camping Mug 350ml",
                              category="Outdoor & Camping")]
    with pytest.raises(grpc.RpcError) as e:
        stub(channel).UpsertItems(iter([pb.UpsertItemsRequest(items=items)]), timeout=RPC_TIMEOUT_S)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "retry" in e.value.details()
    # The item data is stored: it is ranked from its stored text (degraded: no embedding yet), not missing.
    r = rank(channel, engaged_users(shop)[0], ["sku-while-dead", *catalog[:5]])
    assert "sku-while-dead" not in r.missing_ids and len(r.items) == 6
    assert r.degraded and "encoder" in r.degraded_reason
    assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING



# -- 1b. a dead Triton is restarted -------------------------------------------------------------------


def test_dead_triton_is_restarted_and_answers_recover(small_shop, small_bundle, shop, catalog, tmp_path):
    """The supervisor notices the killed Triton, starts a new one on the same ports, and the client
    (short reconnect back-off, breaker half-open probe) finds it: new users get full answers again."""
    cfg = ServeConfig(bundle_dir=small_bundle[0], data_dir=small_shop, state_dir=tmp_path / "state", port=0,
                      metrics_port=0, reload_poll_s=0, encoder_timeout_s=5.0, triton_supervise_s=0.5,
                      breaker_open_s=0.5)
    users = engaged_users(shop)
    with ServerThread(cfg) as st, grpc.insecure_channel(f"127.0.0.1:{st.port}") as channel:
        kill_tritons(st)
        first = rank(channel, users[0], catalog[:10])
        assert first.degraded and "encoder" in first.degraded_reason
        fresh = iter(users[1:])

        def recovered() -> bool:
            return not rank(channel, next(fresh), catalog[:10]).degraded  # a new user: needs Triton

        wait_until(recovered, 240, "a restarted Triton answering", poll_s=1.0)
        assert len(st.server.tritons) == 1
        restarted = [t.pid for t in st.server.tritons.values()]
        # issue 14, problem 11: the restart and the state are visible in /metrics
        (key,) = st.server.tritons
        scraped = scrape_metrics(st.server.metrics_port)
        assert metric(scraped, "semrank_triton_restarts_total", encoder=key) >= 1
        assert metric(scraped, "semrank_triton_up", encoder=key) == 1
    wait_triton_groups_gone(restarted, "after stop (the restarted Triton too)")
