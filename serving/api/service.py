"""The gRPC RankingService: Rank, LogEvents, UpsertItems, GetModelInfo, ReloadBundle, DeleteUser.

Each handler validates (`serving.api.validation`), converts (`serving.api.convert`), calls the
engine, the ingest path or the registry held by `ServingState`, and builds the response. Handlers
raise `featurizer.errors.SemrankError`s and never set a status themselves: the error interceptor
(`serving.api.errors`) answers every error. Every Rank takes one bundle runtime at its start and
finishes on it, whatever a concurrent reload does; every Rank writes one exposure record, except
those of users erased on request.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import grpc
import numpy as np

from featurizer.contracts.experiments import Experiments
from featurizer.definitions import FAMILIES
from featurizer.erasure import Erasures
from featurizer.errors import SemrankError
from featurizer.online.features import OnlineFeatures
from featurizer.privacy import Pseudonyms
from semrank.ranking.v1 import ranking_service_pb2 as pb
from semrank.ranking.v1 import ranking_service_pb2_grpc as pb_grpc
from serving.api.convert import items_frame, timestamp, to_logged
from serving.api.errors import StreamCutShort
from serving.api.validation import event_problem, item_problem, validate_delete_user, validate_rank_request
from serving.config import Limits
from serving.experiments.exposure_log import Exposure, ExposureLog
from serving.ingest.apply import EventIngest
from serving.ingest.items import upsert_items
from serving.ingest.jetstream import StreamIngest
from serving.ingest.live_erasure import ErasureUnavailable, LiveErasure
from serving.observability.metrics import Metrics, set_variant
from serving.observability.request_logging import bind_request, update_request
from serving.ranking.engine import RankingEngine
from serving.ranking.outcome import STALE_FEATURES, RankOutcome, degraded_code, holdout
from serving.ranking.registry import BundleRegistry, Loaded, allowed_bundle_path

log = logging.getLogger(__name__)


class DeadlinePassed(SemrankError):
    grpc_code = "DEADLINE_EXCEEDED"
    reason = "DEADLINE_PASSED"


@dataclass
class ServingState:
    """What the handlers share; built by serving.server.RankingServer."""

    engine: RankingEngine
    registry: BundleRegistry
    ingest: EventIngest | StreamIngest  # the local event log, or JetStream
    exposures: ExposureLog
    metrics: Metrics
    limits: Limits = field(default_factory=Limits)
    experiments: Experiments = field(default_factory=Experiments)
    encoder_timeout_s: float = 0.25  # per Triton call on the request path (further capped by the deadline)
    bundle_roots: list[Path] = field(default_factory=list)  # where ReloadBundle may load from
    pseudonyms: Pseudonyms = field(default_factory=Pseudonyms)  # caller's user id -> the stored one (featurizer.privacy)
    erasures: Erasures | None = None  # users erased on request: their events are refused (featurizer.erasure)
    erasure: LiveErasure | None = None  # DeleteUser, and a JetStream fleet's erasures
    # The bench's null service (`semrank serve --null-service`): Rank answers this reply, built in
    # advance, after grpc parsed the request in full; the rest of the server is the same.
    null_reply: pb.RankResponse | None = None

    @property
    def online(self) -> OnlineFeatures:
        return self.engine.online


def null_reply(item_ids: list[str], version: str, top_k: int = 10) -> pb.RankResponse:
    """A Rank reply the size of a real one with `top_k` items (ids from the catalog, scores, ranks,
    a request id, the model version), for the null service."""
    resp = pb.RankResponse(request_id=uuid.uuid4().hex, model_version=version)
    for k, item_id in enumerate(item_ids[:top_k]):
        resp.items.append(pb.RankedItem(item_id=item_id, score=1.0 / (k + 3), rank=k + 1))
    return resp


class RankingService(pb_grpc.RankingServiceServicer):
    def __init__(self, state: ServingState):
        self.s = state

    # ------------------------------------------------------------ Rank

    async def _rank_on(self, loaded: Loaded, request: pb.RankRequest, user_id: str, candidates, ids, timeout: float
                       ) -> tuple[RankOutcome, str]:
        """The engine's answer on one loaded bundle, and its version."""
        s = self.s
        rt = loaded.runtime  # this request finishes on this bundle, whatever a reload does
        rt.inflight += 1
        t_engine, c_engine = time.perf_counter(), time.thread_time()
        try:
            outcome = await s.engine.rank(rt, user_id, candidates, explain=request.explain, timeout_s=timeout,
                                          ids=ids)
        finally:
            rt.inflight -= 1
        s.metrics.rank_engine_seconds.observe(time.perf_counter() - t_engine)
        s.metrics.rank_engine_cpu_seconds_total.inc(time.thread_time() - c_engine)
        return outcome, rt.version

    async def Rank(self, request: pb.RankRequest, context: grpc.aio.ServicerContext) -> pb.RankResponse:
        s = self.s
        if s.null_reply is not None:  # the floor any gRPC service pays (bench/serve.py measures it)
            return s.null_reply
        t0 = time.perf_counter()
        request_id = request.request_id or uuid.uuid4().hex
        with bind_request(request_id=request_id):
            valid = validate_rank_request(request, s.limits)
            user_id = s.pseudonyms(request.user_id)  # the stored id, from here on: logs, A/B, features, exposure
            update_request(user_id=user_id)
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                raise DeadlinePassed("the deadline passed before ranking started")
            timeout = s.encoder_timeout_s if remaining is None else max(0.001, min(s.encoder_timeout_s, remaining * 0.5))
            now = datetime.now(timezone.utc)
            assignment = s.experiments.assign(user_id, now) if s.experiments.experiments else None
            experiment = assignment.experiment if assignment else ""
            variant = assignment.variant if assignment else ""
            set_variant(variant or "none")
            s.metrics.rank_candidates.observe(len(request.candidates))
            candidates = valid.candidates  # the messages as validation read them: no object per candidate again
            stale = None
            if request.min_sequence:  # read-your-writes: wait for this replica to hold the caller's events
                wait_s = s.limits.max_sequence_wait_s if remaining is None else min(s.limits.max_sequence_wait_s,
                                                                                     remaining * 0.5)
                if not await s.ingest.wait_folded(request.min_sequence, wait_s):
                    stale = (f"{STALE_FEATURES}: this replica's features hold events up to sequence "
                             f"{s.ingest.committed_seq}, not {request.min_sequence} (waited {wait_s * 1e3:.0f} ms)")
            teams: list[str] = []
            if assignment is not None and assignment.holdout:
                outcome, version = holdout(candidates), ""
            elif assignment is not None and assignment.interleaved is not None:
                pair = []
                for path in assignment.interleaved:  # team A's ranking, then team B's, on the same candidates
                    out, ver = await self._rank_on(s.registry.variant(path), request, user_id, candidates, valid.ids, timeout)
                    pair.append((out, ver))
                outcome, teams = interleave(pair[0][0], pair[1][0], assignment.salt, request_id)
                version = f"{pair[0][1]}+{pair[1][1]}"  # team A's bundle + team B's
            else:
                outcome, version = await self._rank_on(s.registry.variant(assignment.bundle if assignment else None),
                                                       request, user_id, candidates, valid.ids, timeout)
            if stale is not None and version:  # (a holdout's answer uses no features)
                outcome.degraded_reasons.append(stale)
            resp = _rank_response(request, request_id, outcome, version, experiment, variant)
            for reason in outcome.degraded_reasons:
                s.metrics.degraded_total.labels(degraded_code(reason)).inc()
            if outcome.degraded:
                log.warning("degraded answer: %s", "; ".join(outcome.degraded_reasons))
            if not s.erasures or user_id not in s.erasures:  # (an erased user's Ranks leave no record)
                s.exposures.record(Exposure(
                    request_id=request_id, user_id=user_id, experiment=experiment, variant=variant,
                    bundle_version=version, item_ids=outcome.item_ids[:len(resp.items)], ts=now,  # (not read back: 130 µs at 1000)
                    teams=teams[:len(resp.items)],
                ))
            log.debug("ranked %d candidates (variant=%s model_version=%s cold_start=%s) in %.2f ms",
                      len(candidates), variant or "-", version, outcome.cold_start_user, (time.perf_counter() - t0) * 1e3)
            return resp

    # ------------------------------------------------------------ LogEvents

    async def LogEvents(self, request_iterator, context: grpc.aio.ServicerContext) -> pb.LogEventsResponse:
        """Valid events are appended to the event log (fsync'd), then applied to the online
        features, then acknowledged; invalid ones are rejected one by one with a reason. When a
        batch cannot be stored or applied, the error says how many events of the call were stored."""
        s = self.s
        resp = pb.LogEventsResponse()
        index = 0
        try:
            async for msg in request_iterator:
                now = datetime.now(timezone.utc)
                batch = []
                for ev in msg.events:
                    problem = event_problem(ev, s.limits, now)
                    if problem is None:
                        event = to_logged(ev, s.pseudonyms)
                        if s.erasures is not None and event.user_id in s.erasures:
                            problem = "user_id: erased on request; events of this user are not stored (docs/privacy.md)"
                        else:
                            batch.append(event)
                    if problem is not None:
                        resp.rejected += 1
                        if len(resp.rejections) < s.limits.max_rejections_listed:
                            resp.rejections.append(pb.EventRejection(index=index, event_id=ev.event_id, reason=problem))
                    index += 1
                if batch:
                    logged = await s.ingest.log_events(batch, stored_before=resp.accepted)
                    resp.accepted += logged.stored
                    resp.duplicates += logged.duplicates
                    resp.sequence = max(resp.sequence, logged.last_seq)
        except StreamCutShort as e:  # a message did not decode, or none came in time; the ones before are stored
            e.stored_before = resp.accepted
            raise
        finally:
            s.metrics.events_total.labels("accepted").inc(resp.accepted)
            s.metrics.events_total.labels("rejected").inc(resp.rejected)
            s.metrics.events_total.labels("duplicate").inc(resp.duplicates)
        return resp

    # ------------------------------------------------------------ UpsertItems

    async def UpsertItems(self, request_iterator, context: grpc.aio.ServicerContext) -> pb.UpsertItemsResponse:
        """Item data is stored (persisted) and embedded with every serving encoder before the
        acknowledgement. If an encoder is down the call fails with UNAVAILABLE
        (`serving.ingest.items.ItemsNotEmbedded`); the data stays stored and a retry embeds what is missing."""
        resp = pb.UpsertItemsResponse()
        index = 0
        try:
            async for msg in request_iterator:
                await self._upsert_message(msg, resp, index)
                index += len(msg.items)
        except StreamCutShort as e:
            e.stored_before = resp.accepted
            raise
        return resp

    async def _upsert_message(self, msg: pb.UpsertItemsRequest, resp: pb.UpsertItemsResponse, index: int) -> None:
        """Validate one message's items (`index`: the stream position of its first), store and embed the good ones."""
        s = self.s
        good = []
        seen: set[str] = set()
        for k, item in enumerate(msg.items, start=index):
            problem = item_problem(item, s.limits, known=item.item_id in s.engine.items.index or item.item_id in seen)
            if problem is None:
                good.append(item)
                seen.add(item.item_id)
            else:
                resp.rejected += 1
                if len(resp.rejections) < s.limits.max_rejections_listed:
                    resp.rejections.append(pb.ItemRejection(index=k, item_id=item.item_id, reason=problem))
        if good:
            share = s.ingest.publish_items if isinstance(s.ingest, StreamIngest) else None
            seq = await upsert_items(s.engine, s.registry.pool, items_frame(good), stored_before=resp.accepted,
                                     share=share)
            resp.accepted += len(good)
            resp.sequence = max(resp.sequence, seq)

    # ------------------------------------------------------------ info and admin

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.GetModelInfoResponse:
        s = self.s
        now = datetime.now(timezone.utc)
        paths = {p: s.registry.variants[p].runtime.version for p in s.registry.variants}
        experiments = []
        for e in s.experiments.experiments:
            experiments.append(pb.ExperimentInfo(
                name=e.name, start=timestamp(e.start), end=timestamp(e.end), active=e.is_active(now),
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
        """Reload the serving bundle, from `path` when given: a bundle directory under the server's
        allowed roots (`ServingState.bundle_roots`), else INVALID_ARGUMENT with one message."""
        path = allowed_bundle_path(request.path, self.s.bundle_roots) if request.path else None
        ok, version, message = await self.s.registry.reload(path)
        return pb.ReloadBundleResponse(reloaded=ok, version=version, message=message)

    async def DeleteUser(self, request: pb.DeleteUserRequest, context: grpc.aio.ServicerContext) -> pb.DeleteUserResponse:
        """Erase users on request (serving.ingest.live_erasure; admin only, as every admin RPC)."""
        s = self.s
        ids = validate_delete_user(request, s.limits)
        why = "this server has no erasure" if s.erasure is None else s.erasure.refusal()
        if why is not None:
            raise ErasureUnavailable(why)
        stored = [s.pseudonyms(u) for u in ids]
        out = await s.erasure.erase(stored, request.requested_by)
        return pb.DeleteUserResponse(users=out["users"], events_erased=out["events"], exposures_erased=out["exposures"],
                                     data_events=out["data_events"], events_caught_up=out["caught_up"],
                                     seconds=out["seconds"])


def interleave(a: RankOutcome, b: RankOutcome, salt: str, request_id: str) -> tuple[RankOutcome, list[str]]:
    """Team-draft interleaving of two answers over the same candidates (`featurizer.contracts.interleaving`,
    coins from the experiment's salt and the request_id). Each item keeps its own team's score, contributions and bias, so
    `score` orders nothing across teams: the list's order is the draft's. Degraded reasons and missing ids
    of both answers are kept."""
    from featurizer.contracts.interleaving import TEAM_A, team_draft

    items, teams = team_draft(a.item_ids, b.item_ids, salt, request_id)
    pos = [{item: k for k, item in enumerate(o.item_ids)} for o in (a, b)]
    src = [(0 if t == TEAM_A else 1, pos[0 if t == TEAM_A else 1][item]) for item, t in zip(items, teams)]
    scores = np.array([(a, b)[o].scores[k] for o, k in src], dtype=np.float64)
    contributions = bias = None
    if a.contributions is not None and b.contributions is not None:
        contributions = np.stack([(a, b)[o].contributions[k] for o, k in src]) if src else a.contributions[:0]
        bias = np.array([(a, b)[o].bias[k] for o, k in src])
    reasons = list(dict.fromkeys([*a.degraded_reasons, *b.degraded_reasons]))
    missing = list(dict.fromkeys([*a.missing_ids, *b.missing_ids]))
    return RankOutcome(items, scores, missing, a.cold_start_user and b.cold_start_user, reasons, contributions,
                       bias), teams


def _rank_response(request: pb.RankRequest, request_id: str, outcome: RankOutcome, version: str,
                   experiment: str, variant: str) -> pb.RankResponse:
    k = request.top_k or len(outcome.item_ids)
    resp = pb.RankResponse(
        request_id=request_id, model_version=version, missing_ids=outcome.missing_ids,
        experiment=experiment, variant=variant, degraded=outcome.degraded,
        degraded_reason="; ".join(outcome.degraded_reasons),
    )
    # Items made in place (`add`): a RankedItem made apart and then copied into the repeated field
    # cost twice as much, 0.7 ms at 1000 candidates (runs of bench/response_build.py).
    add = resp.items.add
    ranked = zip(outcome.item_ids[:k], outcome.scores[:k].tolist())
    if not (request.explain and outcome.contributions is not None):
        for r, (item_id, score) in enumerate(ranked, 1):
            add(item_id=item_id, score=score, rank=r)
        return resp
    for r, (item_id, score) in enumerate(ranked):
        contributions = add(item_id=item_id, score=score, rank=r + 1).contributions
        for f, c in zip(FAMILIES, outcome.contributions[r].tolist()):
            contributions.add(family=f, contribution=c)
        contributions.add(family="bias", contribution=float(outcome.bias[r]))
    return resp


def _bundle_info(loaded: Loaded) -> pb.BundleInfo:
    b = loaded.runtime.bundle
    return pb.BundleInfo(
        version=b.version, path=str(loaded.path), loaded_at=timestamp(loaded.loaded_at),
        encoder=f"{b.encoder.base_model} ({'fine-tuned: ' + b.encoder.model_dir if b.encoder.model_dir != 'base' else 'pretrained'})",
        feature_names=b.feature_names, manifest_json=json.dumps(b.manifest, default=str),
    )
