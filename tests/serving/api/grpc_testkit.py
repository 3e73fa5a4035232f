"""A real grpc.aio server on a free port with a small RankingService stand-in plus grpc.health.v1.

Used by test_metrics / test_security / test_logs; the stand-in exercises the interceptors
and logging without a model bundle or Triton.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from semrank.ranking.v1 import ranking_service_pb2 as pb
from semrank.ranking.v1 import ranking_service_pb2_grpc as pb_grpc
from serving.observability.metrics import set_variant
from serving.observability.request_logging import bind_request, update_request

log = logging.getLogger("tests.serving.api.grpc_testkit")

RANK = "/semrank.ranking.v1.RankingService/Rank"
LOG_EVENTS = "/semrank.ranking.v1.RankingService/LogEvents"
RELOAD = "/semrank.ranking.v1.RankingService/ReloadBundle"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"


class FakeRankingService(pb_grpc.RankingServiceServicer):
    """Rank: INVALID_ARGUMENT without user_id, waits on `gate` for user "block", raises for user "boom"."""

    def __init__(self) -> None:
        self.gate: asyncio.Event | None = None
        self.entered = 0

    async def Rank(self, request: pb.RankRequest, context: grpc.aio.ServicerContext) -> pb.RankResponse:
        self.entered += 1
        if not request.user_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "user_id: must be set")
        if request.user_id == "boom":
            raise RuntimeError("handler bug")
        if request.user_id == "block":
            await self.gate.wait()
        with bind_request(request_id=request.request_id or "generated", user_id=request.user_id):
            update_request(variant="treatment", model_version="v-test")
            set_variant("treatment")
            await asyncio.sleep(0)  # logs after a suspension still carry this request's ids
            log.info("ranked %d candidates", len(request.candidates))
        return pb.RankResponse(
            request_id=request.request_id,
            variant="treatment",
            items=[pb.RankedItem(item_id=c.item_id, rank=k + 1) for k, c in enumerate(request.candidates)],
        )

    async def LogEvents(self, request_iterator, context: grpc.aio.ServicerContext) -> pb.LogEventsResponse:
        n = 0
        async for msg in request_iterator:
            n += len(msg.events)
        return pb.LogEventsResponse(accepted=n)

    async def ReloadBundle(self, request: pb.ReloadBundleRequest, context) -> pb.ReloadBundleResponse:
        return pb.ReloadBundleResponse(reloaded=True, version="v-test")


def rank_request(user_id: str = "u1", n: int = 3, request_id: str = "req-1") -> pb.RankRequest:
    return pb.RankRequest(
        request_id=request_id, user_id=user_id, candidates=[pb.RankCandidate(item_id=f"i{k}") for k in range(n)]
    )


def events_stream(n_messages: int = 2):
    return iter([pb.LogEventsRequest(events=[pb.Event(user_id="u1", item_id="i1")] * 2) for _ in range(n_messages)])


@asynccontextmanager
async def serve(interceptors=(), credentials: grpc.ServerCredentials | None = None, generic_handlers=()):
    """Yield (port, servicer) for a started server on 127.0.0.1:0; stop it on exit."""
    server = grpc.aio.server(interceptors=list(interceptors))
    servicer = FakeRankingService()
    pb_grpc.add_RankingServiceServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if generic_handlers:
        server.add_generic_rpc_handlers(tuple(generic_handlers))
    address = "127.0.0.1:0"
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    assert port, "could not bind a free port"
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    try:
        yield port, servicer
    finally:
        await server.stop(None)


async def call_code(coro) -> grpc.StatusCode:
    """Await an RPC and return its status code (OK or the error's)."""
    try:
        await coro
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK
