"""Prometheus metrics for the serving process (`serving.api.interceptors.MetricsInterceptor` records every RPC).

Each `Metrics` owns its own `CollectorRegistry`, so tests and several servers in one
process never collide. Exported names carry the `semrank_` prefix
(`semrank_rpc_latency_seconds`, ...); the attributes drop it (`metrics.rpc_latency_seconds`).

Wiring (metrics outermost, so it also times and counts the calls auth rejects):

    metrics = Metrics()
    server = grpc.aio.server(interceptors=[MetricsInterceptor(metrics), AuthInterceptor(auth)])
    metrics_port = metrics.start_http("127.0.0.1", 9464)

Inside a handler, `metrics.set_variant("treatment")` labels the call's latency sample;
calls that never set it are labelled variant="none". The error interceptor records the ErrorInfo
reason of the status it answers (`set_error_reason`), so `semrank_errors_total{method, reason}`
counts failures by a bounded reason: the error classes' reasons, INTERNAL, or the status code's
name where no reason was given (CANCELLED, DEADLINE_EXCEEDED). Decode failures are
reason="MALFORMED_MESSAGE"; cancelled streams reason="CANCELLED".

`semrank_rpc_latency_seconds` runs from the moment the handler starts; the time a call waits
before that (in gRPC's queue, or for a busy event loop) is not visible per call in grpc.aio, so
`semrank_event_loop_lag_seconds` measures it: how late a probe scheduled every 100 ms runs. A
client sees about the sum of the two, plus the network.
"""

from __future__ import annotations

import gc
import threading
import time
from contextvars import ContextVar
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    start_http_server,
)

from featurizer.contracts.event_rules import FIELDS as EVENT_FIELDS
from serving.ranking.outcome import ENCODE_CAUSES


LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
CANDIDATE_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)
CACHES = ("item_embedding", "user_embedding", "sequence_user")
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
class CallState:
    variant: str = "none"
    reason: str | None = None  # the ErrorInfo reason of the error status the call ended with


_call_state: ContextVar[CallState | None] = ContextVar("semrank_call_state", default=None)


def begin_call() -> CallState:
    """Start the labels of the current RPC (the metrics interceptor calls it); `set_variant` fills them."""
    state = CallState()
    _call_state.set(state)
    return state


def set_variant(name: str) -> None:
    """Label the current RPC's latency sample with `variant`; a no-op outside an intercepted call."""
    state = _call_state.get()
    if state is not None:
        state.variant = name


def set_error_reason(reason: str) -> None:
    """Record the ErrorInfo reason the current RPC is answered with; a no-op outside an intercepted call."""
    state = _call_state.get()
    if state is not None:
        state.reason = reason


LOOP_LAG_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


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
        self.store_rebuilds_total = Counter("store_rebuilds", "Times the online store had lost its data and was refilled",
                                            namespace=ns, registry=r)
        self.triton_up = Gauge("triton_up", "1 while the supervisor's last check of this encoder's Triton passed",
                               ("encoder",), namespace=ns, registry=r)
        self.triton_restarts_total = Counter("triton_restarts", "Triton processes the supervisor restarted",
                                             ("encoder",), namespace=ns, registry=r)
        self.triton_breaker_state = Gauge(
            "triton_breaker_state", "Triton circuit breaker: 0 closed, 1 half_open, 2 open", namespace=ns, registry=r
        )
        self.cache_requests_total = Counter(
            "cache_requests", "Cache lookups of the ranking engine: embeddings, and the sequence model's user states", ("cache", "result"), namespace=ns, registry=r
        )
        self.rank_engine_seconds = Histogram(
            "rank_engine_seconds", "Time a Rank spends in the ranking engine (features, user vector, encoder calls "
            "it makes, scoring): the rest of rpc_latency_seconds is validation, waits and the response",
            namespace=ns, registry=r, buckets=LATENCY_BUCKETS_S)
        self.rank_engine_cpu_seconds_total = Counter(
            "rank_engine_cpu_seconds", "CPU time of the serving thread while Ranks were in the ranking engine "
            "(time.thread_time): beside rank_engine_seconds it tells the engine's work from its waits for the CPU "
            "(other threads, other processes); while the engine awaits the encoder, other tasks' CPU on the same "
            "thread counts too", namespace=ns, registry=r)
        self.rank_encoder_calls_total = Counter(
            "rank_encoder_calls", "Encoder (Triton) calls issued by Rank, by cause: user_text (a text user tower), "
            "inline_item (an inline candidate the item store does not know), stale_item (a known item whose text "
            "changed and is not re-embedded yet); a call with texts of two causes counts under both",
            ("cause",), namespace=ns, registry=r)
        self.rank_encoder_texts_total = Counter(
            "rank_encoder_texts", "Texts Rank sent to the encoder, by cause (as rank_encoder_calls)", ("cause",),
            namespace=ns, registry=r)
        self.user_history_skipped_total = Counter(
            "user_history_items_skipped", "History items a pooled user tower left out: no current item vector (an id "
            "never upserted, or a text not re-embedded yet); counted each time a user vector is computed (it is "
            "cached until the history or the item vectors change)", namespace=ns, registry=r)
        self.degraded_total = Counter("degraded", "Responses served degraded, by reason code (serving.ranking.outcome.DEGRADED_CODES, or other)", ("reason",), namespace=ns, registry=r)
        self.admission_refused_total = Counter(
            "admission_refused", "Calls refused because their budget of calls in flight was full (serving.config.Budgets: "
            "ranks, writes, admin, watches, health_checks; a caller's share of writes or watches counts here too)",
            ("budget",), namespace=ns, registry=r)
        self.rejected_total = Counter("rejected", "Requests rejected, by reason", ("reason",), namespace=ns, registry=r)
        self.errors_total = Counter("errors", "RPCs that ended in an error status, by method and ErrorInfo reason "
                                    "(or status code name)", ("method", "reason"), namespace=ns, registry=r)
        self.event_loop_lag_seconds = Histogram(
            "event_loop_lag_seconds", "How late a probe on the serving event loop ran: the wait of a call ready to run",
            namespace=ns, registry=r, buckets=LOOP_LAG_BUCKETS_S,
        )
        self.gc_pause_seconds = Histogram(
            "gc_pause_seconds", "Python garbage collections of this process, by generation: every thread (the event "
            "loop included) stops for their duration", ("generation",), namespace=ns, registry=r,
            buckets=LOOP_LAG_BUCKETS_S)
        self.inflight_requests = Gauge("inflight_requests", "RPCs currently being handled", namespace=ns, registry=r)
        self.events_applied_seq = Gauge("events_applied_seq", "The last event-log (or JetStream) sequence this "
                                        "process's online features hold", namespace=ns, registry=r)
        self.events_lag = Gauge("events_lag", "Stored events this process knows of but has not applied yet (JetStream: "
                                "not folded yet)", namespace=ns, registry=r)
        self.write_share_paused = Gauge("write_share_paused_seconds", "Seconds the fold's commits waited so that "
                                        "writes take at most --write-share of the loop while Ranks are served (since "
                                        "start; grows under a write flood: writes queue, not Ranks)",
                                        namespace=ns, registry=r)
        self.stream_refused_events = Gauge("stream_refused_events", "JetStream events this process's fold refused "
                                           "(since start): the event rules LogEvents applies, by the field they named (item: an item message the "
                                           "item rules refused; erased: a user erased on request, docs/privacy.md)",
                                           ("reason",), namespace=ns, registry=r)
        self.stream_bad_messages = Gauge("stream_bad_messages", "JetStream messages skipped by this process's fold: "
                                         "not a semrank event or item (since start)", namespace=ns, registry=r)
        self.events_total = Counter("events", "Logged events by result", ("result",), namespace=ns, registry=r)
        self.bundle_info = Info("bundle", "The model bundle being served", namespace=ns, registry=r)
        self.bundle_reloads_total = Counter("bundle_reloads", "Bundle reloads by result", ("result",), namespace=ns, registry=r)
        # Create the known series at 0, so rate() and absent() work before the first event.
        for cache in CACHES:
            for result in ("hit", "miss"):
                self.cache_requests_total.labels(cache=cache, result=result)
        for reason in REJECT_CODES.values():
            self.rejected_total.labels(reason=reason)
        for budget in ("ranks", "writes", "admin", "watches", "health_checks"):
            self.admission_refused_total.labels(budget=budget)
        for cause in ENCODE_CAUSES:
            self.rank_encoder_calls_total.labels(cause=cause)
            self.rank_encoder_texts_total.labels(cause=cause)
        for result in ("accepted", "rejected"):
            self.events_total.labels(result=result)
        for result in ("ok", "rejected"):
            self.bundle_reloads_total.labels(result=result)
        self._error_kinds: set[str] = set()
        self._http: tuple[WSGIServer, threading.Thread] | None = None
        self._gc_started: float | None = None

    def watch_gc(self) -> None:
        """Time every garbage collection of this process into gc_pause_seconds (`unwatch_gc` stops it)."""
        if self._gc_callback not in gc.callbacks:
            gc.callbacks.append(self._gc_callback)

    def unwatch_gc(self) -> None:
        if self._gc_callback in gc.callbacks:
            gc.callbacks.remove(self._gc_callback)

    def _gc_callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        elif self._gc_started is not None:
            self.gc_pause_seconds.labels(generation=str(info.get("generation", "?"))).observe(
                time.perf_counter() - self._gc_started)
            self._gc_started = None

    # -- thin recording helpers -------------------------------------------------------------
    set_variant = staticmethod(set_variant)

    def record_cache(self, cache: str, hits: int, misses: int) -> None:
        """Count one batched lookup: `hits` found, `misses` not found."""
        if cache not in CACHES:
            raise ValueError(f"unknown cache {cache!r}: use one of {CACHES}")
        self.cache_requests_total.labels(cache=cache, result="hit").inc(hits)
        self.cache_requests_total.labels(cache=cache, result="miss").inc(misses)

    def record_rank_encode(self, cause: str, texts: int) -> None:
        """One encoder call a Rank issued for `texts` texts of `cause` (serving.ranking.outcome.ENCODE_CAUSES)."""
        if cause not in ENCODE_CAUSES:
            raise ValueError(f"unknown encode cause {cause!r}: use one of {ENCODE_CAUSES}")
        self.rank_encoder_calls_total.labels(cause=cause).inc()
        self.rank_encoder_texts_total.labels(cause=cause).inc(texts)

    def record_events(self, accepted: int, rejected: int) -> None:
        self.events_total.labels(result="accepted").inc(accepted)
        self.events_total.labels(result="rejected").inc(rejected)

    def set_bundle(self, version: str, **labels: str) -> None:
        """Replace the bundle_info labels, e.g. set_bundle("2024-06-01", encoder="minilm", ranker="lgbm-3")."""
        self.bundle_info.info({"version": version, **{k: str(v) for k, v in labels.items()}})

    def watch_ingest(self, ingest) -> None:
        """Read the ingest path's applied seq, lag and (JetStream) skipped messages at each scrape."""
        self.events_applied_seq.set_function(lambda: ingest.committed_seq)
        self.events_lag.set_function(lambda: ingest.behind)
        self.write_share_paused.set_function(lambda: ingest.slices.paused_s)
        stats = getattr(ingest, "stats", None)
        if stats is not None:
            self.stream_bad_messages.set_function(lambda: stats.bad_messages)
            for reason in (*EVENT_FIELDS, "item", "erased", "other"):
                self.stream_refused_events.labels(reason=reason).set_function(lambda r=reason: stats.refused.get(r, 0))

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

    def on_triton(self, encoder: str, up: bool) -> None:
        """The supervisor's check of one encoder's Triton (process alive and model ready)."""
        self._m.triton_up.labels(encoder=encoder).set(1 if up else 0)

    def on_triton_restart(self, encoder: str) -> None:
        self._m.triton_restarts_total.labels(encoder=encoder).inc()

    def on_breaker(self, state: str) -> None:
        if state not in BREAKER_STATES:
            raise ValueError(f"unknown breaker state {state!r}: use one of {sorted(BREAKER_STATES)}")
        self._m.triton_breaker_state.set(BREAKER_STATES[state])
