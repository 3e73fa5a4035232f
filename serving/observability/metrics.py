"""Prometheus metrics for the serving process, and a grpc.aio interceptor that records every RPC.

Each `Metrics` owns its own `CollectorRegistry`, so tests and several servers in one
process never collide. Exported names carry the `semrank_` prefix
(`semrank_rpc_latency_seconds`, ...); the attributes drop it (`metrics.rpc_latency_seconds`).

Wiring (metrics outermost, so it also times and counts the calls auth rejects):

    metrics = Metrics()
    server = grpc.aio.server(interceptors=[MetricsInterceptor(metrics), AuthInterceptor(auth)])
    metrics_port = metrics.start_http("127.0.0.1", 9464)

Inside a handler, `metrics.set_variant("treatment")` labels the call's latency sample;
calls that never set it are labelled variant="none".
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from contextvars import ContextVar
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

from serving.api.handler_wrap import wrap_handler

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
CANDIDATE_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)
CACHES = ("item_embedding", "user_embedding")
# Status codes counted in rejected_total (reason = lower-case code name) by MetricsInterceptor.
REJECT_CODES = {
    grpc.StatusCode.RESOURCE_EXHAUSTED: "resource_exhausted",
    grpc.StatusCode.INVALID_ARGUMENT: "invalid_argument",
    grpc.StatusCode.UNAUTHENTICATED: "unauthenticated",
    grpc.StatusCode.PERMISSION_DENIED: "permission_denied",
}
BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}
MAX_ERROR_KINDS = 32  # distinct triton_errors_total{kind}; later kinds are counted as "other"
# Error kinds of calls that were never sent (serving.triton.resilience reports CIRCUIT_OPEN with 0 s):
# counted as errors, kept out of the latency histogram.
NOT_SENT_KINDS = frozenset({"circuit_open"})


@dataclass
class _CallState:
    variant: str = "none"


_call_state: ContextVar[_CallState | None] = ContextVar("semrank_call_state", default=None)


def set_variant(name: str) -> None:
    """Label the current RPC's latency sample with `variant`; a no-op outside an intercepted call."""
    state = _call_state.get()
    if state is not None:
        state.variant = name


class Metrics:
    def __init__(self, namespace: str = "semrank"):
        self.registry = r = CollectorRegistry(auto_describe=True)
        ns = namespace
        self.rpc_latency_seconds = Histogram(
            "rpc_latency_seconds", "Server-side RPC latency by method, variant and status code",
            ("method", "variant", "code"), namespace=ns, registry=r, buckets=LATENCY_BUCKETS_S,
        )
        self.rank_candidates = Histogram(
            "rank_candidates", "Candidates per Rank request", namespace=ns, registry=r, buckets=CANDIDATE_BUCKETS
        )
        self.triton_latency_seconds = Histogram(
            "triton_latency_seconds", "Latency of Triton encoder calls, failed ones included",
            namespace=ns, registry=r, buckets=LATENCY_BUCKETS_S,
        )
        self.triton_errors_total = Counter("triton_errors", "Failed Triton calls by kind", ("kind",), namespace=ns, registry=r)
        self.triton_breaker_state = Gauge(
            "triton_breaker_state", "Triton circuit breaker: 0 closed, 1 half_open, 2 open", namespace=ns, registry=r
        )
        self.cache_requests_total = Counter(
            "cache_requests", "Embedding cache lookups", ("cache", "result"), namespace=ns, registry=r
        )
        self.degraded_total = Counter("degraded", "Responses served degraded, by reason", ("reason",), namespace=ns, registry=r)
        self.rejected_total = Counter("rejected", "Requests rejected, by reason", ("reason",), namespace=ns, registry=r)
        self.inflight_requests = Gauge("inflight_requests", "RPCs currently being handled", namespace=ns, registry=r)
        self.events_total = Counter("events", "Logged events by result", ("result",), namespace=ns, registry=r)
        self.bundle_info = Info("bundle", "The model bundle being served", namespace=ns, registry=r)
        self.bundle_reloads_total = Counter("bundle_reloads", "Bundle reloads by result", ("result",), namespace=ns, registry=r)
        # Create the known series at 0, so rate() and absent() work before the first event.
        for cache in CACHES:
            for result in ("hit", "miss"):
                self.cache_requests_total.labels(cache=cache, result=result)
        for reason in REJECT_CODES.values():
            self.rejected_total.labels(reason=reason)
        for result in ("accepted", "rejected"):
            self.events_total.labels(result=result)
        for result in ("ok", "rejected"):
            self.bundle_reloads_total.labels(result=result)
        self._error_kinds: set[str] = set()
        self._http: tuple[WSGIServer, threading.Thread] | None = None

    # -- thin recording helpers -------------------------------------------------------------
    set_variant = staticmethod(set_variant)

    def record_cache(self, cache: str, hits: int, misses: int) -> None:
        """Count one batched lookup: `hits` found, `misses` not found."""
        if cache not in CACHES:
            raise ValueError(f"unknown cache {cache!r}: use one of {CACHES}")
        self.cache_requests_total.labels(cache=cache, result="hit").inc(hits)
        self.cache_requests_total.labels(cache=cache, result="miss").inc(misses)

    def record_events(self, accepted: int, rejected: int) -> None:
        self.events_total.labels(result="accepted").inc(accepted)
        self.events_total.labels(result="rejected").inc(rejected)

    def set_bundle(self, version: str, **labels: str) -> None:
        """Replace the bundle_info labels, e.g. set_bundle("2024-06-01", encoder="minilm", ranker="lgbm-3")."""
        self.bundle_info.info({"version": version, **{k: str(v) for k, v in labels.items()}})

    def triton_observer(self) -> TritonObserver:
        return TritonObserver(self)

    def _error_kind(self, error: str | None) -> str:
        kind = (error or "unknown").strip().lower()[:64] or "unknown"
        if kind not in self._error_kinds:
            if len(self._error_kinds) >= MAX_ERROR_KINDS:
                return "other"
            self._error_kinds.add(kind)
        return kind

    # -- /metrics over HTTP -----------------------------------------------------------------
    def start_http(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Serve this registry at http://host:port/metrics from a daemon thread; return the bound port."""
        if self._http is not None:
            raise RuntimeError("metrics HTTP server already running; call stop_http() first")
        httpd, thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = (httpd, thread)
        return httpd.server_port

    def stop_http(self) -> None:
        if self._http is None:
            return
        httpd, thread = self._http
        self._http = None
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


class TritonObserver:
    """What a Triton client (e.g. ResilientEncoder) reports to; thread-safe like the metrics it feeds."""

    def __init__(self, metrics: Metrics):
        self._m = metrics

    def on_call(self, ok: bool, seconds: float, error: str | None = None) -> None:
        """`error` is a short kind ("DEADLINE_EXCEEDED", "CIRCUIT_OPEN", ...), not a message: it becomes a
        lower-cased label."""
        kind = None if ok else self._m._error_kind(error)
        if kind not in NOT_SENT_KINDS:
            self._m.triton_latency_seconds.observe(seconds)
        if kind is not None:
            self._m.triton_errors_total.labels(kind=kind).inc()

    def on_breaker(self, state: str) -> None:
        if state not in BREAKER_STATES:
            raise ValueError(f"unknown breaker state {state!r}: use one of {sorted(BREAKER_STATES)}")
        self._m.triton_breaker_state.set(BREAKER_STATES[state])


# -- the interceptor ---------------------------------------------------------------------------


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Times every async RPC (unary and streaming) by method, variant and final status code.

    Counts calls ending in RESOURCE_EXHAUSTED / INVALID_ARGUMENT / UNAUTHENTICATED /
    PERMISSION_DENIED in rejected_total, so handlers must not count those themselves.
    Unknown methods (UNIMPLEMENTED) are not recorded, so clients cannot grow the label set.
    Synchronous handlers are passed through unrecorded: the aio server runs them in a thread pool.
    """

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.rsplit("/", 1)[-1]
        return wrap_handler(handler, lambda behavior: self._instrument(behavior, method))

    def _instrument(self, behavior, method: str):
        m = self.metrics

        def begin() -> tuple[float, _CallState]:
            m.inflight_requests.inc()
            state = _CallState()
            _call_state.set(state)
            return time.perf_counter(), state

        def end(t0: float, state: _CallState, context, exc: BaseException | None) -> None:
            code = _final_code(context, exc)
            m.inflight_requests.dec()
            m.rpc_latency_seconds.labels(method=method, variant=state.variant, code=code.name).observe(
                time.perf_counter() - t0
            )
            if code in REJECT_CODES:
                m.rejected_total.labels(reason=REJECT_CODES[code]).inc()

        if inspect.isasyncgenfunction(behavior):

            async def stream_wrapper(request_or_iterator, context):
                t0, state = begin()
                exc = None
                try:
                    async for response in behavior(request_or_iterator, context):
                        yield response
                except BaseException as e:
                    exc = e
                    raise
                finally:
                    end(t0, state, context, exc)

            return stream_wrapper
        if not inspect.iscoroutinefunction(behavior):
            return behavior

        async def wrapper(request_or_iterator, context):
            t0, state = begin()
            exc = None
            try:
                return await behavior(request_or_iterator, context)
            except BaseException as e:
                exc = e
                raise
            finally:
                end(t0, state, context, exc)

        return wrapper


def _final_code(context: grpc.aio.ServicerContext, exc: BaseException | None) -> grpc.StatusCode:
    code = context.code()  # set by abort() / set_code(); None otherwise
    if isinstance(code, grpc.StatusCode):
        return code
    if exc is None:
        return grpc.StatusCode.OK
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):  # client cancel, deadline, server stop
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN  # what the aio server answers for an unhandled exception

