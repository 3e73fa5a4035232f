"""The gRPC RankingService: request in, validation, engine, response out."""

from __future__ import annotations

import logging
import time
import uuid

import grpc

from semrank.ranking.v1 import ranking_service_pb2 as pb
from semrank.ranking.v1 import ranking_service_pb2_grpc as pb_grpc
from serving.ranking import Candidate, RankingEngine
from serving.validation import InvalidRequest, Limits, validate_rank_request

log = logging.getLogger(__name__)


def candidates_from_proto(req: pb.RankRequest) -> list[Candidate]:
    return [
        Candidate(
            item_id=c.item_id,
            title=c.title,
            description=c.description,
            category=c.category,
            brand=c.brand,
            price=c.price if c.HasField("price") else None,
        )
        for c in req.candidates
    ]


class RankingService(pb_grpc.RankingServiceServicer):
    def __init__(self, engine: RankingEngine, limits: Limits):
        self.engine = engine
        self.limits = limits

    async def Rank(self, request: pb.RankRequest, context: grpc.aio.ServicerContext) -> pb.RankResponse:
        t0 = time.perf_counter()
        request_id = request.request_id or uuid.uuid4().hex
        try:
            validate_rank_request(request, self.limits)
        except InvalidRequest as e:
            log.info("request_id=%s rejected: %s", request_id, e)
            await context.abort_with_status(e.to_status())
        engine = self.engine  # one bundle for the whole request
        result = await engine.rank(request.user_id, candidates_from_proto(request))
        k = request.top_k or len(result.item_ids)
        resp = pb.RankResponse(
            request_id=request_id,
            model_version=engine.bundle.version,
            missing_ids=result.missing_ids,
            items=[
                pb.RankedItem(item_id=i, score=float(s), rank=r + 1)
                for r, (i, s) in enumerate(zip(result.item_ids[:k], result.scores[:k]))
            ],
        )
        log.debug(
            "request_id=%s user_id=%s candidates=%d cold_start=%s model_version=%s ms=%.2f",
            request_id, request.user_id, len(request.candidates), result.cold_start_user,
            engine.bundle.version, (time.perf_counter() - t0) * 1e3,
        )
        return resp
