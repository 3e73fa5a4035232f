"""The gRPC RankingService: Rank, LogEvents, UpsertItems, GetModelInfo, ReloadBundle.

Each handler validates, calls the engine / logs / registry held by `ServingState`, and
builds the response. Every Rank takes one bundle runtime at its start and finishes on
it, whatever a concurrent reload does; every Rank writes one exposure record.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from featurizer.definitions import FAMILIES
from featurizer.online.features import OnlineFeatures
from semrank.ranking.v1 import ranking_service_pb2 as pb
from semrank.ranking.v1 import ranking_service_pb2_grpc as pb_grpc
from serving.ingest.event_log import EventLog, events_frame
from serving.api.convert import event_problem, item_problem, items_frame, to_logged
from featurizer.contracts.experiments import Experiments
from serving.experiments.exposure_log import Exposure, ExposureLog
from serving.observability.request_logging import bind_request
from serving.observability.metrics import Metrics, set_variant
from serving.ranking.engine import Candidate, RankingEngine, RankOutcome, holdout
from serving.ranking.registry import BundleRegistry, Loaded
from serving.api.validation import InvalidRequest, Limits, validate_rank_request

log = logging.getLogger(__name__)

LOG_SEQ_KEY = "event_log"  # online-store meta row: the last event-log seq folded into the features


@dataclass
class ServingState:
    """What the handlers share; built by serving.server.RankingServer."""

    engine: RankingEngine
    registry: BundleRegistry
    event_log: EventLog
    exposures: ExposureLog
    metrics: Metrics
    limits: Limits = field(default_factory=Limits)
    experiments: Experiments = field(default_factory=Experiments)
    encoder_timeout_s: float = 0.25  # per Triton call on the request path (further capped by the deadline)
    upsert_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        # Appends run concurrently (group commit: one fsync for all waiting batches); applying to
        # the features then goes strictly in seq order, so the recorded seq never runs ahead.
        self.applied_seq = self.event_log.last_seq
        self.applied_lock = asyncio.Condition()  # held while applying (and while snapshotting)

    async def log_events(self, batch) -> int:
        """Durably append, then apply in log order; returns the batch's last seq. Shielded: once
        appended, a batch is applied even if its caller goes away (later batches wait for it)."""
        return await asyncio.shield(asyncio.ensure_future(self._log_events(batch)))

    async def _log_events(self, batch) -> int:
        seq = await self.event_log.append_async(batch)
        first = seq - len(batch) + 1
        async with self.applied_lock:
            await self.applied_lock.wait_for(lambda: self.applied_seq == first - 1)
            try:
                apply_logged(self.online, batch, seq)
            finally:
                # Even if applying failed, the events are in the log (a restart replays them);
                # don't block every later batch behind this one.
                self.applied_seq = seq
                self.applied_lock.notify_all()
        return seq

    @property
    def online(self) -> OnlineFeatures:
        return self.engine.online


def apply_logged(online: OnlineFeatures, events, last_seq: int) -> None:
    """Fold logged events into the online features and remember how far the log is applied."""
    online.apply(events_frame(events))
    online.store.write("meta", {LOG_SEQ_KEY: {"seq": last_seq}})


def candidates_from_proto(req: pb.RankRequest) -> list[Candidate]:
    return [
        Candidate(item_id=c.item_id, title=c.title, description=c.description, category=c.category, brand=c.brand,
                  price=c.price if c.HasField("price") else None)
        for c in req.candidates
    ]


def _timestamp(t: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(t.astimezone(timezone.utc).replace(tzinfo=None))
    return ts


class RankingService(pb_grpc.RankingServiceServicer):
    def __init__(self, state: ServingState):
        self.s = state

    # ------------------------------------------------------------ Rank

    async def Rank(self, request: pb.RankRequest, context: grpc.aio.ServicerContext) -> pb.RankResponse:
        s = self.s
        t0 = time.perf_counter()
        request_id = request.request_id or uuid.uuid4().hex
        with bind_request(request_id=request_id, user_id=request.user_id):
            try:
                validate_rank_request(request, s.limits)
            except InvalidRequest as e:
                log.info("rejected: %s", e)
                await context.abort_with_status(e.to_status())
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed before ranking started")
            timeout = s.encoder_timeout_s if remaining is None else max(0.001, min(s.encoder_timeout_s, remaining * 0.5))
            now = datetime.now(timezone.utc)
            assignment = s.experiments.assign(request.user_id, now) if s.experiments.experiments else None
            experiment = assignment.experiment if assignment else ""
            variant = assignment.variant if assignment else ""
            set_variant(variant or "none")
            s.metrics.rank_candidates.observe(len(request.candidates))
            candidates = candidates_from_proto(request)
            if assignment is not None and assignment.holdout:
                outcome, version = holdout(candidates), ""
            else:
                loaded: Loaded = s.registry.variant(assignment.bundle if assignment else None)
                rt = loaded.runtime  # this request finishes on this bundle, whatever a reload does
                rt.inflight += 1
                try:
                    outcome = await s.engine.rank(rt, request.user_id, candidates, explain=request.explain, timeout_s=timeout)
                finally:
                    rt.inflight -= 1
                version = rt.version
            resp = self._response(request, request_id, outcome, version, experiment, variant)
            for reason in outcome.degraded_reasons:
                s.metrics.degraded_total.labels(reason.split(":")[0]).inc()
            if outcome.degraded:
                log.warning("degraded answer: %s", "; ".join(outcome.degraded_reasons))
            s.exposures.record(Exposure(
                request_id=request_id, user_id=request.user_id, experiment=experiment, variant=variant,
                bundle_version=version, item_ids=[i.item_id for i in resp.items], ts=now,
            ))
            log.debug("ranked %d candidates (variant=%s model_version=%s cold_start=%s) in %.2f ms",
                      len(candidates), variant or "-", version, outcome.cold_start_user, (time.perf_counter() - t0) * 1e3)
            return resp

    @staticmethod
    def _response(request: pb.RankRequest, request_id: str, outcome: RankOutcome, version: str,
                  experiment: str, variant: str) -> pb.RankResponse:
        k = request.top_k or len(outcome.item_ids)
        items = []
        for r, (item_id, score) in enumerate(zip(outcome.item_ids[:k], outcome.scores[:k].tolist())):
            item = pb.RankedItem(item_id=item_id, score=score, rank=r + 1)
            if request.explain and outcome.contributions is not None:
                item.contributions.extend(
                    pb.FamilyContribution(family=f, contribution=float(c)) for f, c in zip(FAMILIES, outcome.contributions[r])
                )
                item.contributions.append(pb.FamilyContribution(family="bias", contribution=float(outcome.bias[r])))
            items.append(item)
        return pb.RankResponse(
            request_id=request_id, items=items, model_version=version, missing_ids=outcome.missing_ids,
            experiment=experiment, variant=variant, degraded=outcome.degraded,
            degraded_reason="; ".join(outcome.degraded_reasons),
        )

    # ------------------------------------------------------------ LogEvents

    async def LogEvents(self, request_iterator, context: grpc.aio.ServicerContext) -> pb.LogEventsResponse:
        """Valid events are appended to the event log (fsync'd), then applied to the online
        features, then acknowledged; invalid ones are rejected one by one with a reason."""
        s = self.s
        resp = pb.LogEventsResponse()
        index = 0
        async for msg in request_iterator:
            now = datetime.now(timezone.utc)
            batch = []
            for ev in msg.events:
                problem = event_problem(ev, s.limits, now)
                if problem is None:
                    batch.append(to_logged(ev))
                else:
                    resp.rejected += 1
                    if len(resp.rejections) < s.limits.max_rejections_listed:
                        resp.rejections.append(pb.EventRejection(index=index, event_id=ev.event_id, reason=problem))
                index += 1
            if batch:
                try:
                    await s.log_events(batch)
                except Exception as e:  # noqa: BLE001 - nothing of this batch is acknowledged
                    log.exception("event log append failed")
                    await context.abort(
                        grpc.StatusCode.UNAVAILABLE,
                        f"events could not be stored ({type(e).__name__}); {resp.accepted} event(s) before "
                        f"stream index {index - len(msg.events)} were stored; retry the rest",
                    )
                resp.accepted += len(batch)
        s.metrics.events_total.labels("accepted").inc(resp.accepted)
        s.metrics.events_total.labels("rejected").inc(resp.rejected)
        return resp

    # ------------------------------------------------------------ UpsertItems

    async def UpsertItems(self, request_iterator, context: grpc.aio.ServicerContext) -> pb.UpsertItemsResponse:
        """Item data is stored (persisted) and embedded with every serving encoder before the
        acknowledgement. If the encoder is down the call fails with UNAVAILABLE; the data stays
        stored and a retry embeds what is still missing."""
        s = self.s
        resp = pb.UpsertItemsResponse()
        index = 0
        async for msg in request_iterator:
            good = []
            seen: dict[str, int] = {}
            for item in msg.items:
                problem = item_problem(item, s.limits, known=item.item_id in s.engine.items.index or item.item_id in seen)
                if problem is None:
                    good.append(item)
                    seen[item.item_id] = index
                else:
                    resp.rejected += 1
                    if len(resp.rejections) < s.limits.max_rejections_listed:
                        resp.rejections.append(pb.ItemRejection(index=index, item_id=item.item_id, reason=problem))
                index += 1
            if not good:
                continue
            frame = items_frame(good)
            s.engine.items.upsert(frame)
            s.online.upsert_items(frame)
            rows = s.engine.items.rows(frame["item_id"].to_list())
            for handle in s.registry.pool.handles():
                try:
                    await s.engine.items.ensure_embeddings(handle.key, handle.encoder.encode_bulk, handle.dim, only=rows)
                except Exception as e:  # noqa: BLE001
                    log.warning("upsert: embedding failed: %s", e)
                    await context.abort(
                        grpc.StatusCode.UNAVAILABLE,
                        f"the encoder could not embed the items ({type(e).__name__}); their data is stored "
                        f"({resp.accepted + len(good)} item(s) so far); retry the call to embed them",
                    )
            resp.accepted += len(good)
        return resp

    # ------------------------------------------------------------ info and admin

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.GetModelInfoResponse:
        s = self.s
        now = datetime.now(timezone.utc)
        paths = {p: s.registry.variants[p].runtime.version for p in s.registry.variants}
        experiments = []
        for e in s.experiments.experiments:
            experiments.append(pb.ExperimentInfo(
                name=e.name, start=_timestamp(e.start), end=_timestamp(e.end), active=e.is_active(now),
                variants=[pb.VariantInfo(name=v.name, share=v.share,
                                         bundle_version="" if v.holdout else paths.get(v.bundle.resolve(), ""))
                          for v in e.variants],
            ))
        return pb.GetModelInfoResponse(
            bundle=_bundle_info(s.registry.default),
            variant_bundles=[_bundle_info(v) for v in s.registry.variants.values()],
            experiments=experiments, max_candidates=s.limits.max_candidates, max_text_chars=s.limits.max_text_chars,
            items=len(s.engine.items),
        )

    async def ReloadBundle(self, request: pb.ReloadBundleRequest, context: grpc.aio.ServicerContext) -> pb.ReloadBundleResponse:
        ok, version, message = await self.s.registry.reload(request.path or None)
        return pb.ReloadBundleResponse(reloaded=ok, version=version, message=message)


def _bundle_info(loaded: Loaded) -> pb.BundleInfo:
    b = loaded.runtime.bundle
    return pb.BundleInfo(
        version=b.version, path=str(loaded.path), loaded_at=_timestamp(loaded.loaded_at),
        encoder=f"{b.encoder.base_model} ({'fine-tuned: ' + b.encoder.model_dir if b.encoder.model_dir != 'base' else 'pretrained'})",
        feature_names=b.feature_names, manifest_json=json.dumps(b.manifest, default=str),
    )
