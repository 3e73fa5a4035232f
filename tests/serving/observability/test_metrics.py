"""Metrics: the interceptor against a real grpc.aio server, /metrics scraped over HTTP."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from semrank.ranking.v1 import ranking_service_pb2_grpc as pb_grpc
from serving.api.interceptors import MetricsInterceptor
from serving.observability.metrics import MAX_ERROR_KINDS, Metrics, set_variant
from tests.serving.api.grpc_testkit import call_code, events_stream, rank_request, serve


def sample(m: Metrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def latency_count(m: Metrics, method: str, code: str, variant: str = "none") -> float | None:
    return sample(m, "semrank_rpc_latency_seconds_count", method=method, variant=variant, code=code)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        return r.read().decode()


def test_interceptor_records_method_variant_code_and_serves_them_over_http():
    m = Metrics()

    async def run():
        async with serve([MetricsInterceptor(m)]) as (port, _):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = pb_grpc.RankingServiceStub(ch)
                await stub.Rank(rank_request())
                await stub.Rank(rank_request())
                assert await call_code(stub.Rank(rank_request(user_id=""))) == grpc.StatusCode.INVALID_ARGUMENT
                assert await call_code(stub.Rank(rank_request(user_id="boom"))) == grpc.StatusCode.UNKNOWN
                resp = await stub.LogEvents(events_stream(3))
                assert resp.accepted == 6
                await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())

    asyncio.run(run())
    assert latency_count(m, "Rank", "OK", variant="treatment") == 2
    assert latency_count(m, "Rank", "INVALID_ARGUMENT") == 1  # aborted before set_variant
    assert latency_count(m, "Rank", "UNKNOWN") == 1
    assert latency_count(m, "LogEvents", "OK") == 1  # client streaming
    assert latency_count(m, "Check", "OK") == 1
    assert sample(m, "semrank_rejected_total", reason="invalid_argument") == 1
    assert sample(m, "semrank_rejected_total", reason="unauthenticated") == 0  # pre-created series
    assert sample(m, "semrank_inflight_requests") == 0

    port = m.start_http()
    try:
        text = scrape(port)
    finally:
        m.stop_http()
    assert 'semrank_rpc_latency_seconds_bucket{code="OK",le="0.0005",method="Rank",variant="treatment"}' in text
    assert 'semrank_rpc_latency_seconds_count{code="INVALID_ARGUMENT",method="Rank",variant="none"} 1.0' in text
    assert 'semrank_rejected_total{reason="invalid_argument"} 1.0' in text


def test_inflight_gauge_and_deadline_exceeded_code():
    m = Metrics()

    async def run():
        async with serve([MetricsInterceptor(m)]) as (port, servicer):
            servicer.gate = asyncio.Event()
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = pb_grpc.RankingServiceStub(ch)
                call = asyncio.ensure_future(stub.Rank(rank_request(user_id="block")))
                while servicer.entered == 0:
                    await asyncio.sleep(0.01)
                assert sample(m, "semrank_inflight_requests") == 1
                servicer.gate.set()
                await call
                assert sample(m, "semrank_inflight_requests") == 0

                servicer.gate = asyncio.Event()  # never set: the client's deadline ends the call
                code = await call_code(stub.Rank(rank_request(user_id="block"), timeout=0.2))
                assert code == grpc.StatusCode.DEADLINE_EXCEEDED
                for _ in range(200):  # the server notices the deadline on its own clock
                    if latency_count(m, "Rank", "DEADLINE_EXCEEDED"):
                        break
                    await asyncio.sleep(0.01)

    asyncio.run(run())
    assert latency_count(m, "Rank", "DEADLINE_EXCEEDED") == 1
    assert sample(m, "semrank_inflight_requests") == 0


@pytest.mark.parametrize("style", ["async_generator", "context_write"])
def test_response_streaming_handlers_of_both_styles_are_timed(style):
    """The aio server drives async generators and write()-coroutines differently; both stay timed."""
    m = Metrics()

    async def gen(request: bytes, context):
        m.set_variant("a")  # the method and the module function are the same
        for k in range(3):
            yield bytes([k])

    async def writer(request: bytes, context):
        set_variant("a")
        for k in range(3):
            await context.write(bytes([k]))

    behavior = gen if style == "async_generator" else writer
    handler = grpc.method_handlers_generic_handler("test.Stream", {"Get": grpc.unary_stream_rpc_method_handler(behavior)})

    async def run():
        async with serve([MetricsInterceptor(m)], generic_handlers=[handler]) as (port, _):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                return [r async for r in ch.unary_stream("/test.Stream/Get")(b"")]

    assert asyncio.run(run()) == [b"\x00", b"\x01", b"\x02"]
    assert latency_count(m, "Get", "OK", variant="a") == 1


def test_two_instances_in_one_process_do_not_collide():
    a, b = Metrics(), Metrics()
    a.record_cache("item_embedding", hits=3, misses=1)
    assert sample(a, "semrank_cache_requests_total", cache="item_embedding", result="hit") == 3
    assert sample(b, "semrank_cache_requests_total", cache="item_embedding", result="hit") == 0
    with pytest.raises(ValueError, match="item_embedding"):
        a.record_cache("item_embeddings", hits=1, misses=0)


def test_recording_helpers_and_triton_observer():
    m = Metrics()
    m.record_events(accepted=5, rejected=2)
    m.rank_candidates.observe(300)
    m.degraded_total.labels(reason="triton_unavailable").inc()
    m.bundle_reloads_total.labels(result="ok").inc()
    m.set_bundle("v1", encoder="minilm")
    m.set_bundle("v2", encoder="minilm-ft")
    obs = m.triton_observer()
    obs.on_call(True, 0.004)
    obs.on_call(False, 1.5, "DEADLINE_EXCEEDED")
    obs.on_call(False, 0.01, None)
    obs.on_call(False, 0.0, "CIRCUIT_OPEN")  # not sent: an error, but no latency sample
    obs.on_breaker("open")
    assert sample(m, "semrank_events_total", result="accepted") == 5
    assert sample(m, "semrank_events_total", result="rejected") == 2
    assert sample(m, "semrank_rank_candidates_bucket", le="250.0") == 0
    assert sample(m, "semrank_rank_candidates_bucket", le="500.0") == 1
    assert sample(m, "semrank_bundle_info", version="v2", encoder="minilm-ft") == 1
    assert sample(m, "semrank_bundle_info", version="v1", encoder="minilm") is None  # replaced, not added
    assert sample(m, "semrank_triton_latency_seconds_count") == 3
    assert sample(m, "semrank_triton_errors_total", kind="deadline_exceeded") == 1
    assert sample(m, "semrank_triton_errors_total", kind="circuit_open") == 1
    assert sample(m, "semrank_triton_errors_total", kind="unknown") == 1
    assert sample(m, "semrank_triton_breaker_state") == 2
    obs.on_breaker("half_open")
    assert sample(m, "semrank_triton_breaker_state") == 1
    with pytest.raises(ValueError, match="half_open"):
        obs.on_breaker("half-open")
    for k in range(MAX_ERROR_KINDS + 5):  # free-form error strings cannot grow the label set without bound
        obs.on_call(False, 0.01, f"error {k}")
    assert sample(m, "semrank_triton_errors_total", kind="other") == 8


def test_http_server_start_stop():
    m = Metrics()
    port = m.start_http()
    assert port > 0
    with pytest.raises(RuntimeError, match="stop_http"):
        m.start_http()
    assert "semrank_inflight_requests 0.0" in scrape(port)
    m.stop_http()
    with pytest.raises(OSError):
        scrape(port)
    m.stop_http()  # idempotent


def test_triton_up_and_restarts_are_counted_per_encoder():
    m = Metrics()
    obs = m.triton_observer()
    obs.on_triton("enc-a", True)
    obs.on_triton("enc-a", False)
    obs.on_triton_restart("enc-a")
    obs.on_triton("enc-a", True)
    assert m.registry.get_sample_value("semrank_triton_up", {"encoder": "enc-a"}) == 1
    assert m.registry.get_sample_value("semrank_triton_restarts_total", {"encoder": "enc-a"}) == 1
