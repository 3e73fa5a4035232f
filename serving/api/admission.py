"""Bounded concurrency: beyond `max_inflight` calls of the service, answer RESOURCE_EXHAUSTED at once.

A server interceptor rather than grpc's `maximum_concurrent_rpcs`, so the refusal carries a
message and is counted like any other answer (the metrics interceptor, placed before this one,
sees its status code). Health checks and reflection are never refused: probes must get through
an overloaded server.
"""

from __future__ import annotations

import grpc

from serving.api.handler_wrap import wrap_handler


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
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the server is at its limit of {self.max_inflight} concurrent calls; retry with back-off",
                )
            self.inflight += 1
            try:
                return await behavior(request_or_iterator, context)
            finally:
                self.inflight -= 1

        return guarded
