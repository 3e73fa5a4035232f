"""The gRPC interceptors besides errors and auth, and the helper they share.

Order on the server (`serving.server`): metrics (sees every outcome), errors
(`serving.api.errors.ErrorInterceptor`: exceptions -> status), admission, auth, the servicer.

- `MetricsInterceptor` times every async RPC by method, variant and final status code, and counts
  error statuses by ErrorInfo reason (`semrank_errors_total`).
- `AdmissionInterceptor` bounds concurrency by class of call (`serving.config.Budgets`: Ranks,
  writes, admin calls, watch and reflection streams, health checks) and per caller for writes and
  watches (and for Ranks per bearer token where tokens are configured): a class at its limit refuses its next call with `Overloaded` (RESOURCE_EXHAUSTED) at
  once, with a message, and leaves the other classes alone. Health checks have a room of their own.
  (grpc's own `maximum_concurrent_rpcs` is set above the sum: a backstop only.)
- `wrap_handler` rebuilds a method handler around a wrapped behavior.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import time
from collections.abc import Callable

import grpc

from featurizer.errors import SemrankError
from serving.config import Budgets
from serving.observability.metrics import REJECT_CODES, CallState, Metrics, begin_call


class Overloaded(SemrankError):
    grpc_code = "RESOURCE_EXHAUSTED"
    reason = "OVERLOADED"


def wrap_handler(handler: grpc.RpcMethodHandler, wrap: Callable) -> grpc.RpcMethodHandler:
    """Return `handler` with `wrap(behavior)` as its behavior, keeping its streaming kind and codecs.

    The aio server picks how to drive a behavior from its kind (coroutine vs async
    generator), so `wrap` must return the same kind it was given, or a coroutine function
    (which may use `context.write` / `context.abort` for any streaming kind).
    """
    codecs = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(wrap(handler.stream_stream), **codecs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(wrap(handler.stream_unary), **codecs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(wrap(handler.unary_stream), **codecs)
    return grpc.unary_unary_rpc_method_handler(wrap(handler.unary_unary), **codecs)


SERVICE = "/semrank.ranking.v1.RankingService/"
HEALTH = "/grpc.health.v1.Health/"
REFLECTION = ("/grpc.reflection.v1alpha.ServerReflection/", "/grpc.reflection.v1.ServerReflection/")
# The class of each call (a budget of `serving.config.Budgets`); service methods not named here are admin.
CLASS_OF = {f"{SERVICE}Rank": "ranks", f"{SERVICE}GetModelInfo": "ranks", f"{SERVICE}LogEvents": "writes",
            f"{SERVICE}UpsertItems": "writes", f"{HEALTH}Check": "health_checks", f"{HEALTH}Watch": "watches"}
PER_CALLER = {"writes": "writes_per_caller", "watches": "watches_per_caller"}


def call_class(method: str) -> str | None:
    """The budget a method counts against (None: not admitted here)."""
    if method in CLASS_OF:
        return CLASS_OF[method]
    if method.startswith(REFLECTION):
        return "watches"  # a reflection stream, like a watch, may stay open doing nothing
    if method.startswith(SERVICE):
        return "admin"
    return None


def caller_of(context: grpc.aio.ServicerContext, by_token: bool) -> str:
    """Who a per-caller budget counts: the bearer token (hashed; auth checks it after admission), else
    the client's address without its port."""
    if by_token:
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                return "token:" + hashlib.blake2b(value.encode(), digest_size=8).hexdigest()
    peer = context.peer() or ""
    return "peer:" + peer.rsplit(":", 1)[0]


class AdmissionInterceptor(grpc.aio.ServerInterceptor):
    """One budget of calls in flight per class (`serving.config.Budgets`), and per caller for writes
    and watches, and for Ranks per token: a class at its limit refuses its next call with `Overloaded` (RESOURCE_EXHAUSTED) at
    once and leaves the others alone, so idle streams cannot take the room of Ranks, and health
    checks always get through. `refused` counts refusals by class; `on_refuse(class)` reports them."""

    def __init__(self, budgets: Budgets, by_token: bool = False, on_refuse: Callable[[str], None] | None = None):
        self.budgets, self.by_token, self.on_refuse = budgets, by_token, on_refuse
        self.inflight: dict[str, int] = {}
        self.per_caller: dict[tuple[str, str], int] = {}
        self.refused: dict[str, int] = {}
        self.entered_at: dict[str, float] = {}  # class -> time.monotonic() of its last admitted call

    @property
    def max_inflight(self) -> int:
        return self.budgets.ranks

    def busy(self, kind: str, within_s: float = 0.05) -> bool:
        """Whether calls of `kind` are in flight, or one was admitted within `within_s` (at 200 Ranks/s
        of a few ms each, most instants have none in flight, yet the next one is due)."""
        return self.inflight.get(kind, 0) > 0 or time.monotonic() - self.entered_at.get(kind, -1e9) < within_s

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        kind = None if handler is None else call_class(handler_call_details.method)
        if kind is None:
            return handler
        service_call = handler_call_details.method.startswith(SERVICE)
        return wrap_handler(handler, lambda behavior: self._guard(behavior, kind, service_call))

    def _enter(self, kind: str, context) -> tuple[str, str] | None:
        """Take a slot of `kind` (and of its caller's share), or raise Overloaded."""
        limit = getattr(self.budgets, kind)
        who = None
        share = self._share(kind)
        if share is not None:
            who = (kind, caller_of(context, self.by_token))
            if self.per_caller.get(who, 0) >= share:
                self._refuse(kind, f"this caller has {share} {kind.replace('_', ' ')} open, the most one caller "
                                   "may; close one, or retry with back-off")
        if self.inflight.get(kind, 0) >= limit:
            self._refuse(kind, f"the server is at its limit of {limit} concurrent {kind.replace('_', ' ')}; "
                               "retry with back-off")
        self.inflight[kind] = self.inflight.get(kind, 0) + 1
        self.entered_at[kind] = time.monotonic()
        if who is not None:
            self.per_caller[who] = self.per_caller.get(who, 0) + 1
        return who

    def _share(self, kind: str) -> int | None:
        """The most calls of `kind` one caller may have in flight (None: no share). Ranks have a share per
        bearer token only: without tokens one backend often sends every Rank from one address."""
        if kind in PER_CALLER:
            return getattr(self.budgets, PER_CALLER[kind])
        if kind == "ranks" and self.by_token:
            return self.budgets.rank_share
        return None

    def _leave(self, kind: str, who: tuple[str, str] | None) -> None:
        self.inflight[kind] -= 1
        if who is not None:
            left = self.per_caller[who] - 1
            if left:
                self.per_caller[who] = left
            else:
                del self.per_caller[who]

    def _refuse(self, kind: str, message: str) -> None:
        self.refused[kind] = self.refused.get(kind, 0) + 1
        if self.on_refuse is not None:
            self.on_refuse(kind)
        raise Overloaded(message)

    async def _admit(self, kind: str, context, service_call: bool) -> tuple[str, str] | None:
        """`_enter`; a refusal of a call outside the service (health, reflection), which the error
        interceptor does not see, is answered here."""
        try:
            return self._enter(kind, context)
        except Overloaded as e:
            if service_call:
                raise
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
            raise  # (abort raises)

    def _guard(self, behavior, kind: str, service_call: bool):
        if inspect.isasyncgenfunction(behavior):  # a response stream (reflection)

            async def streamed(request_or_iterator, context):
                who = await self._admit(kind, context, service_call)
                try:
                    async for response in behavior(request_or_iterator, context):
                        yield response
                finally:
                    self._leave(kind, who)

            return streamed

        async def guarded(request_or_iterator, context):  # unary answers, and streams written with context.write
            who = await self._admit(kind, context, service_call)
            try:
                return await behavior(request_or_iterator, context)
            finally:
                self._leave(kind, who)

        return guarded


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
        return wrap_handler(handler, lambda behavior: self._instrument(behavior, method, handler.request_streaming))

    def _instrument(self, behavior, method: str, request_streaming: bool = False):
        m = self.metrics

        def begin() -> tuple[float, CallState]:
            m.inflight_requests.inc()
            return time.perf_counter(), begin_call()

        def end(t0: float, state: CallState, context, exc: BaseException | None) -> None:
            code = _final_code(context, exc, request_streaming)
            m.inflight_requests.dec()
            m.rpc_latency_seconds.labels(method=method, variant=state.variant, code=code.name).observe(
                time.perf_counter() - t0
            )
            if code in REJECT_CODES:
                m.rejected_total.labels(reason=REJECT_CODES[code]).inc()
            if code != grpc.StatusCode.OK:
                m.errors_total.labels(method=method, reason=state.reason or code.name).inc()

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
                response = await behavior(request_or_iterator, context)
                if request_streaming:
                    # grpc.aio ends the request stream of a call the client cancelled as if it were
                    # half-closed, and cancels this task only later (10-50 ms measured under load): a
                    # cancel already on its way lands here and counts as CANCELLED; a later one is
                    # counted OK (no signal is left once the handler returned). A deadline that ended
                    # the stream is told by time_remaining (`_final_code`).
                    await asyncio.sleep(0)
                return response
            except BaseException as e:
                exc = e
                raise
            finally:
                end(t0, state, context, exc)

        return wrapper


# A request stream that "ended" this close to its deadline was ended by it: the client's cancel at
# its own deadline reaches the server a little before the server's copy of that deadline passes.
STREAM_DEADLINE_SLACK_S = 0.05


def _final_code(context: grpc.aio.ServicerContext, exc: BaseException | None,
                request_streaming: bool = False) -> grpc.StatusCode:
    code = context.code()  # set by abort() / set_code(); None otherwise
    if isinstance(code, grpc.StatusCode):
        return code
    if exc is None:
        remaining = context.time_remaining()
        if request_streaming and remaining is not None and remaining <= STREAM_DEADLINE_SLACK_S:
            return grpc.StatusCode.DEADLINE_EXCEEDED  # the stream "ended" because its deadline passed
        return grpc.StatusCode.OK
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):  # client cancel, deadline, server stop
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN  # what the aio server answers for an unhandled exception
