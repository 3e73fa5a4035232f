"""The gRPC interceptors besides errors and auth, and the helper they share.

Order on the server (`serving.server`): metrics (sees every outcome), errors
(`serving.api.errors.ErrorInterceptor`: exceptions -> status), admission, auth, the servicer.

- `MetricsInterceptor` times every async RPC by method, variant and final status code, and counts
  error statuses by ErrorInfo reason (`semrank_errors_total`).
- `AdmissionInterceptor` bounds concurrency: beyond `max_inflight` calls of the service, a call
  raises `Overloaded` (RESOURCE_EXHAUSTED) at once, with a message, and is counted like any other
  answer. Health checks and reflection are never refused: probes must get through an overloaded
  server. (grpc's own `maximum_concurrent_rpcs` is only a backstop.)
- `wrap_handler` rebuilds a method handler around a wrapped behavior.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable

import grpc

from featurizer.errors import SemrankError
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


class AdmissionInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, max_inflight: int, service_prefix: str = "/semrank."):
        if max_inflight < 1:
            raise ValueError(f"max_inflight={max_inflight} must be >= 1")
        self.max_inflight = max_inflight
        self.service_prefix = service_prefix
        self.inflight = 0
        self.refused = 0

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(self.service_prefix):
            return handler
        if handler.response_streaming:  # none in RankingService; keep the wrapper simple
            return handler
        return wrap_handler(handler, self._guard)

    def _guard(self, behavior):
        async def guarded(request_or_iterator, context):
            if self.inflight >= self.max_inflight:
                self.refused += 1
                raise Overloaded(f"the server is at its limit of {self.max_inflight} concurrent calls; retry with back-off")
            self.inflight += 1
            try:
                return await behavior(request_or_iterator, context)
            finally:
                self.inflight -= 1

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
