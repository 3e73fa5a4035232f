"""RankingService end to end: a real Triton process, the asyncio gRPC server on a free port, a real channel."""

from __future__ import annotations

import time

import grpc
import numpy as np
import polars as pl
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from featurizer.contracts.schema import read_dataset
from featurizer.offline.pipeline import offline_features, user_recent_items
from featurizer.text import item_text_expr
from ranker.bundle import load_bundle
from ranker.feature_matrix import BundleInputs
from ranker.user_tower import user_vectors
from semrank.ranking.v1 import ranking_service_pb2 as pb
from semrank.ranking.v1 import ranking_service_pb2_grpc as pb_grpc
from serving.config import Limits, ServeConfig
from serving.server import SERVICE_NAME
from tests.integration.serving_kit import (
    ServerThread,
    bad_request_fields,
    error_info,
    metric,
    scrape_metrics,
    tritonservers_in_group,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

MAX_CANDIDATES = 50


@pytest.fixture(scope="module")
def service(small_shop, small_bundle):
    bundle_dir, _ = small_bundle
    cfg = ServeConfig(bundle_dir=bundle_dir, data_dir=small_shop, port=0, metrics_port=0,
                      limits=Limits(max_candidates=MAX_CANDIDATES))
    with ServerThread(cfg) as st:
        groups = [t.pid for t in st.server.tritons.values()]  # each Triton worker leads its own process group
        assert groups, "the server started no Triton"
        with grpc.insecure_channel(f"127.0.0.1:{st.port}") as channel:
            yield st, channel
    left = {g: tritonservers_in_group(g) for g in groups}
    assert not any(left.values()), f"tritonserver left behind (process group -> pids): {left}"


@pytest.fixture(scope="module")
def shop(small_shop):
    return read_dataset(small_shop)


def active_user(shop) -> str:
    eng = shop.events.filter(pl.col("event") != "impression").group_by("user_id").len().sort(["len", "user_id"], descending=True)
    return eng["user_id"][0]


def rank(channel, **kw) -> pb.RankResponse:
    return pb_grpc.RankingServiceStub(channel).Rank(pb.RankRequest(**kw), timeout=60)


def test_health_and_reflection(service):
    _, channel = service
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", SERVICE_NAME):
        assert health.Check(health_pb2.HealthCheckRequest(service=name)).status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    resp = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in resp.list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names
    # issue 14, problem 12: grpc.reflection.v1 too (same messages as v1alpha, field for field)
    v1 = channel.stream_stream("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                               request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                               response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
    resp = next(v1(iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME)]), timeout=60))
    assert resp.file_descriptor_response.file_descriptor_proto  # the service's proto, for grpcurl
    resp = next(v1(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=60))
    assert {SERVICE_NAME, "grpc.reflection.v1.ServerReflection"} <= {s.name for s in resp.list_services_response.service}


def test_rank_returns_every_candidate_best_first(service, shop, small_bundle):
    _, channel = service
    ids = shop.items["item_id"].head(30).to_list()
    resp = rank(channel, request_id="r-1", user_id=active_user(shop), candidates=[pb.RankCandidate(item_id=i) for i in ids])
    assert resp.request_id == "r-1"
    assert resp.model_version == load_bundle(small_bundle[0]).version
    assert sorted(it.item_id for it in resp.items) == sorted(ids)
    assert [it.rank for it in resp.items] == list(range(1, 31))
    scores = [it.score for it in resp.items]
    assert scores == sorted(scores, reverse=True)
    assert not resp.missing_ids


def test_scores_equal_offline_computation(service, shop, small_bundle, encoder):
    """The service's scores equal the bundle applied to the offline features at the same instant."""
    st, channel = service
    user = active_user(shop)
    ids = shop.items["item_id"].tail(25).to_list()
    resp = rank(channel, user_id=user, candidates=[pb.RankCandidate(item_id=i) for i in ids])
    got = {it.item_id: it.score for it in resp.items}

    bundle = load_bundle(small_bundle[0])
    t = st.server.engine.now()
    q = pl.DataFrame({"user_id": [user] * len(ids), "item_id": ids, "ts": [t] * len(ids)}).with_columns(
        pl.col("ts").cast(pl.Datetime("us", "UTC"))
    )
    inputs = BundleInputs.of(bundle)
    hist = user_recent_items(shop.events.lazy(), shop.items.lazy(), q.head(1).lazy(), inputs.history_items).collect()
    texts = shop.items.select("item_id", "title", item_text_expr())
    all_emb = encoder.encode(texts["item_text"].to_list())
    row = {i: k for k, i in enumerate(texts["item_id"])}
    user_emb = user_vectors(inputs.tower, [[row[i] for i in hist["history"][0]]], all_emb, texts["title"].to_list(),
                            encoder.encode)[0]
    item_emb = {i: all_emb[row[i]] for i in ids}
    q = q.with_columns(interest_score=pl.Series([float(item_emb[i] @ user_emb) for i in ids]))
    feats = offline_features(shop.events.lazy(), shop.items.lazy(), q.lazy()).collect()
    want = bundle.score(inputs.frame_matrix(feats))
    np.testing.assert_allclose([got[i] for i in ids], want, rtol=1e-4, atol=1e-4)


def test_top_k_cold_start_and_inline_items(service, shop):
    _, channel = service
    ids = shop.items["item_id"].head(10).to_list()
    cands = [pb.RankCandidate(item_id=i) for i in ids] + [
        pb.RankCandidate(item_id="new-sku", title="Wireless Noise-Cancelling Headphones", category="Audio", price=99.0),
        pb.RankCandidate(item_id="ghost-sku"),
    ]
    resp = rank(channel, user_id="never-seen-user", candidates=cands, top_k=5)
    assert len(resp.items) == 5 and [it.rank for it in resp.items] == [1, 2, 3, 4, 5]
    full = rank(channel, user_id=active_user(shop), candidates=cands)
    assert {it.item_id for it in full.items} == set(ids) | {"new-sku", "ghost-sku"}
    assert list(full.missing_ids) == ["ghost-sku"]


@pytest.mark.parametrize(
    "kw, fields",
    [
        (dict(user_id="", candidates=[pb.RankCandidate(item_id="i1")]), ["user_id"]),
        (dict(user_id="u1", candidates=[]), ["candidates"]),
        (dict(user_id="u1", candidates=[pb.RankCandidate(item_id="a"), pb.RankCandidate(item_id="")]), ["candidates[1].item_id"]),
        (dict(user_id="u1", candidates=[pb.RankCandidate(item_id=f"i{k}") for k in range(MAX_CANDIDATES + 1)]), ["candidates"]),
        (dict(user_id="u1", candidates=[pb.RankCandidate(item_id="a")], top_k=-3), ["top_k"]),
    ],
)
def test_malformed_requests_get_invalid_argument_and_server_keeps_serving(service, shop, kw, fields):
    _, channel = service
    with pytest.raises(grpc.RpcError) as e:
        rank(channel, **kw)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(e.value) == fields
    assert fields[0].split("[")[0] in e.value.details()
    ok = rank(channel, user_id="u1", candidates=[pb.RankCandidate(item_id=shop.items["item_id"][0])])
    assert len(ok.items) == 1


def test_without_tokens_admin_rpcs_are_off_and_writes_are_open(service, shop):
    """Issue 14, problem 1: a server started without tokens (and without --open-admin) refuses
    ReloadBundle with PERMISSION_DENIED / ADMIN_DISABLED, whatever path it names; writes stay open."""
    _, channel = service
    stub = pb_grpc.RankingServiceStub(channel)
    messages = set()
    for path in ("", "/etc", "/nonexistent/bundle"):
        with pytest.raises(grpc.RpcError) as e:
            stub.ReloadBundle(pb.ReloadBundleRequest(path=path), timeout=60)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED, e.value
        assert error_info(e.value).reason == "ADMIN_DISABLED"
        messages.add(e.value.details())
    assert len(messages) == 1 and "admin RPCs are off" in messages.pop()
    event = pb.Event(ts=Timestamp(seconds=int(time.time()) - 5), user_id="u-open",
                     item_id=shop.items["item_id"][0], type=pb.EVENT_TYPE_CLICK)
    assert stub.LogEvents(iter([pb.LogEventsRequest(events=[event])]), timeout=60).accepted == 1


# --------------------------------------------------------------------------- the pooled user tower (issue 28)


def _encoder_calls(st) -> tuple[float, dict[str, float]]:
    """(Triton calls so far, Rank's encoder calls by cause) from /metrics."""
    m = scrape_metrics(st.server.metrics_port)
    causes = {c: metric(m, "semrank_rank_encoder_calls_total", cause=c) for c in ("user_text", "inline_item", "stale_item")}
    return metric(m, "semrank_triton_latency_seconds_count"), causes


def _text_contributions(resp: pb.RankResponse) -> dict[str, float]:
    return {it.item_id: next(c.contribution for c in it.contributions if c.family == "text") for it in resp.items}


def test_the_engine_time_of_ranks_is_counted_as_wall_and_as_cpu(service, shop):
    """semrank_rank_engine_seconds (wall) and semrank_rank_engine_cpu_seconds_total (the serving
    thread's CPU): both grow with each Rank, and the engine cannot use more CPU on its thread than
    the time it took (a bench reads the difference as the engine waiting for the CPU)."""
    st, channel = service
    ids = shop.items["item_id"].head(50).to_list()  # (the fixture's limit)

    def engine() -> tuple[float, float, float]:
        m = scrape_metrics(st.server.metrics_port)
        return (metric(m, "semrank_rank_engine_seconds_count"), metric(m, "semrank_rank_engine_seconds_sum"),
                metric(m, "semrank_rank_engine_cpu_seconds_total"))

    n0, wall0, cpu0 = engine()
    for _ in range(5):
        rank(channel, user_id=active_user(shop), candidates=[pb.RankCandidate(item_id=i) for i in ids])
    n1, wall1, cpu1 = engine()
    assert n1 - n0 == 5
    assert 0 < cpu1 - cpu0 <= (wall1 - wall0) + 1e-3  # (thread_time ticks coarser than perf_counter)


def test_a_rank_after_log_events_calls_no_encoder_and_its_user_vector_has_the_event(service, shop):
    """The next Rank after an event reflects it in the user vector (the text family's contribution
    for the same candidates moves), and neither Rank calls Triton: the pooled tower reads the item
    vectors the server holds."""
    st, channel = service
    assert load_bundle(st.server.cfg.bundle_dir).tower.kind == "pooled"
    user = active_user(shop)
    ids = shop.items["item_id"].head(20).to_list()
    before = rank(channel, user_id=user, candidates=[pb.RankCandidate(item_id=i) for i in ids], explain=True)
    calls0 = _encoder_calls(st)
    # a purchase of an item from far down the catalog: the user's most recent item from now on
    item = shop.items["item_id"][-3]
    event = pb.Event(event_id=f"tower-{time.time_ns()}", ts=Timestamp(seconds=int(time.time()) - 1), user_id=user,
                     item_id=item, type=pb.EVENT_TYPE_PURCHASE)
    stub = pb_grpc.RankingServiceStub(channel)
    ack = stub.LogEvents(iter([pb.LogEventsRequest(events=[event])]), timeout=60)
    assert ack.accepted == 1
    after = rank(channel, user_id=user, candidates=[pb.RankCandidate(item_id=i) for i in ids], explain=True,
                 min_sequence=ack.sequence)
    assert not before.degraded and not after.degraded
    assert _encoder_calls(st) == calls0  # no Triton call at all, by Rank or anyone
    b, a = _text_contributions(before), _text_contributions(after)
    assert max(abs(a[i] - b[i]) for i in ids) > 1e-6, "the event did not reach the user vector"


def test_an_inline_unseen_item_is_still_embedded(service, shop):
    st, channel = service
    user = active_user(shop)
    ids = shop.items["item_id"].head(5).to_list()
    triton0, causes0 = _encoder_calls(st)
    title = f"Bamboo cutting board with juice groove {time.time_ns()}"  # a text nobody embedded yet
    cands = [pb.RankCandidate(item_id=i) for i in ids] + [pb.RankCandidate(item_id="inline-board", title=title,
                                                                            category="Kitchen")]
    resp = rank(channel, user_id=user, candidates=cands, explain=True)
    triton1, causes1 = _encoder_calls(st)
    assert not resp.degraded
    assert causes1["inline_item"] == causes0["inline_item"] + 1 and causes1["user_text"] == causes0["user_text"]
    assert triton1 == triton0 + 1  # that one call, for the inline text only
    assert _text_contributions(resp)["inline-board"] != 0.0  # it has the text feature
    rank(channel, user_id=user, candidates=cands)  # its vector is cached by text now
    assert _encoder_calls(st) == (triton1, causes1)


def test_what_start_up_loaded_is_out_of_the_collectors_way(service):
    """`gc.freeze()` once the server is up: a full collection no longer walks the catalog and the
    feature state (bench/gc_pause.py: about 250-300 ms on the bench's state before, 0 after)."""
    import gc

    assert gc.get_freeze_count() > 10_000
    assert gc.get_threshold() == ServeConfig.gc_thresholds  # and full collections stay rare while serving


def test_the_null_service_answers_a_reply_built_in_advance(small_shop, small_bundle, shop):
    """bench/serve.py's floor (`semrank serve --null-service 10`): the same server, whose Rank parses the
    request (grpc) and answers a reply of 10 catalog items built at start, doing no ranking."""
    import gc

    before = gc.get_threshold()
    cfg = ServeConfig(bundle_dir=small_bundle[0], data_dir=small_shop, port=0, null_service_top_k=10,
                      gc_thresholds=(1234, 5, 6))
    with ServerThread(cfg) as st, grpc.insecure_channel(f"127.0.0.1:{st.port}") as channel:
        assert gc.get_threshold() == (1234, 5, 6)
        ids = shop.items["item_id"].tail(50).to_list()
        a = rank(channel, user_id=active_user(shop), candidates=[pb.RankCandidate(item_id=i) for i in ids])
        b = rank(channel, user_id="anyone", candidates=[pb.RankCandidate(item_id="x")])
        assert a == b and len(a.items) == 10 and [it.rank for it in a.items] == list(range(1, 11))
        assert a.model_version == load_bundle(small_bundle[0]).version
    assert gc.get_threshold() == before  # the process's own thresholds again once the server stopped
