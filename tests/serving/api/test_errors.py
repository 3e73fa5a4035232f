"""The one table of which error gives which gRPC status, through `serving.api.errors.ErrorInterceptor`.

Every error class semrank defines under featurizer/, ranker/ and serving/ is a row here (the
completeness test fails when a new one is not), and each row is raised by a handler of a real
grpc.aio server and read back by a real channel: the status code, the message, the
`google.rpc.ErrorInfo` (reason, domain, metadata) and, where the error names fields, the
`google.rpc.BadRequest`. `RaisingService` is a fault-injection stand-in: its handlers raise
whatever the test gives them.
"""

from __future__ import annotations

import asyncio
import importlib
import pkgutil
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

import featurizer
import ranker
import serving
from featurizer.contracts.experiments import ExperimentConfigError
from featurizer.contracts.exposures import ExposureLogError
from featurizer.contracts.schema import DataContractError
from featurizer.errors import ConfigError, SemrankError
from featurizer.online.features import StaleQueryError, StateMismatchError
from featurizer.store.base import OnlineStoreError, WriteConflict
from featurizer.store.config import StoreConfigError
from ranker.bundle import BundleError
from semrank.ranking.v1 import ranking_service_pb2 as pb
from semrank.ranking.v1 import ranking_service_pb2_grpc as pb_grpc
from serving.api.auth import AdminDisabled, AdminRequired, PermissionDenied, Unauthenticated, WriterRequired
from serving.api.errors import (
    DOMAIN,
    ErrorInterceptor,
    MalformedMessage,
    MessageTooLarge,
    StreamIdle,
    too_large_backstop,
)
from serving.api.interceptors import Overloaded
from serving.api.service import DeadlinePassed
from serving.api.validation import FieldViolation, InvalidRequest
from serving.batch.input import BatchInputError
from serving.batch.output import OutputMismatch
from serving.batch.scorer import BatchScoringError
from serving.ingest.apply import EventsNotApplied, EventsNotStored
from serving.ingest.nats_link import EventsNotAcknowledged
from serving.ingest.log_format import EventLogCorrupt, EventLogError, EventLogLocked
from serving.ingest.items import ItemsNotEmbedded, ItemsNotShared
from serving.ingest.live_erasure import ErasureFailed, ErasureUnavailable
from serving.ingest.restore import ReadOnlyStateError
from serving.ranking.registry import BundlePathRefused, BundleRejected
from serving.triton.client import EncoderUnavailable
from serving.triton.onnx_graph import ExportError
from serving.triton.resilience import CircuitOpenError
from serving.triton.contract import ContractMismatch
from serving.triton.process import PortInUseError, TritonStartupError

C = grpc.StatusCode

# error raised by a handler -> (status code, ErrorInfo.reason, ErrorInfo.metadata it must carry, BadRequest fields)
TABLE: list[tuple[Exception, C, str, dict[str, str], list[str]]] = [
    (InvalidRequest([FieldViolation("user_id", "must be set"), FieldViolation("candidates", "must not be empty")]),
     C.INVALID_ARGUMENT, "INVALID_REQUEST", {}, ["user_id", "candidates"]),
    (DataContractError("items.parquet", "title", 3, "must not be empty"),
     C.INVALID_ARGUMENT, "DATA_CONTRACT_VIOLATION", {}, ["title[3]"]),
    (ConfigError("--data is required"), C.INVALID_ARGUMENT, "INVALID_CONFIG", {}, []),
    (StoreConfigError("store.kind must be one of ..."), C.INVALID_ARGUMENT, "INVALID_CONFIG", {}, []),
    (ExperimentConfigError("experiments.json", ["experiments[0].variants: shares sum to 0.9"]),
     C.INVALID_ARGUMENT, "INVALID_CONFIG", {}, []),
    (ExposureLogError("exposures: bad row"), C.INVALID_ARGUMENT, "EXPOSURE_LOG_INVALID", {}, []),
    (BatchInputError("input.parquet: no user_id column"), C.INVALID_ARGUMENT, "BATCH_INPUT_INVALID", {}, []),
    (DeadlinePassed("the deadline passed before ranking started"), C.DEADLINE_EXCEEDED, "DEADLINE_PASSED", {}, []),
    (Overloaded("too many requests in flight"), C.RESOURCE_EXHAUSTED, "OVERLOADED", {}, []),
    (Unauthenticated("missing bearer token"), C.UNAUTHENTICATED, "UNAUTHENTICATED", {}, []),
    (PermissionDenied("not allowed"), C.PERMISSION_DENIED, "PERMISSION_DENIED", {}, []),
    (AdminRequired("ReloadBundle needs an admin token"), C.PERMISSION_DENIED, "ADMIN_REQUIRED", {}, []),
    (WriterRequired("LogEvents needs a writer (or admin) token"), C.PERMISSION_DENIED, "WRITER_REQUIRED", {}, []),
    (AdminDisabled("admin RPCs are off"), C.PERMISSION_DENIED, "ADMIN_DISABLED", {}, []),
    (BundlePathRefused("path '/etc' is not an allowed bundle directory"), C.INVALID_ARGUMENT, "BUNDLE_PATH_REFUSED",
     {}, ["path"]),
    (EventsNotStored("event log write failed", stored_before=7), C.UNAVAILABLE, "EVENTS_NOT_STORED",
     {"stored_before": "7"}, []),
    (EventsNotApplied("online store down", stored=5), C.UNAVAILABLE, "EVENTS_STORED_NOT_APPLIED", {"stored": "5"}, []),
    (EventsNotAcknowledged("JetStream acknowledged 2 of 5", 2), C.UNAVAILABLE, "EVENTS_NOT_ACKNOWLEDGED",
     {"stored_before": "2"}, []),
    (ItemsNotEmbedded("encoder down", stored=3), C.UNAVAILABLE, "ITEMS_NOT_EMBEDDED", {"stored": "3"}, []),
    (ItemsNotShared("not shared", stored=2), C.UNAVAILABLE, "ITEMS_NOT_SHARED", {"stored": "2"}, []),
    (OnlineStoreError("redis: connection refused"), C.UNAVAILABLE, "ONLINE_STORE_UNAVAILABLE", {}, []),
    (WriteConflict("meta 'event_log' changed"), C.UNAVAILABLE, "ONLINE_STORE_CONFLICT", {}, []),  # ingest re-reads the seq; at start-up: a second writer
    (EncoderUnavailable("triton: connection refused", code="UNAVAILABLE"), C.UNAVAILABLE, "ENCODER_UNAVAILABLE", {}, []),
    (CircuitOpenError("triton failed recently; not sent"), C.UNAVAILABLE, "ENCODER_UNAVAILABLE", {}, []),
    (EventLogError("event log is closed"), C.UNAVAILABLE, "EVENT_LOG_UNAVAILABLE", {}, []),
    (EventLogLocked("another process holds the log"), C.FAILED_PRECONDITION, "EVENT_LOG_LOCKED", {}, []),
    (EventLogCorrupt(Path("seg-000001.log"), 128, "bad checksum"), C.DATA_LOSS, "EVENT_LOG_CORRUPT", {}, []),
    (PortInUseError("port 8001 in use"), C.UNAVAILABLE, "PORT_IN_USE", {}, []),
    (TritonStartupError("triton exited"), C.UNAVAILABLE, "TRITON_NOT_READY", {}, []),
    (ContractMismatch("model 'encoder_onnx' was exported with max_length 64"), C.FAILED_PRECONDITION,
     "ENCODER_CONTRACT_MISMATCH", {}, []),
    (StaleQueryError("as_of before the store's watermark"), C.FAILED_PRECONDITION, "STALE_FEATURE_QUERY", {}, []),
    (StateMismatchError("state built with other definitions"), C.FAILED_PRECONDITION, "ONLINE_STATE_MISMATCH", {}, []),
    (BundleError("bundle.json: missing"), C.FAILED_PRECONDITION, "BUNDLE_INVALID", {}, []),
    (BundleRejected("feature names differ"), C.FAILED_PRECONDITION, "BUNDLE_REJECTED", {}, []),
    (ReadOnlyStateError("state dir is read-only"), C.FAILED_PRECONDITION, "READ_ONLY_STATE", {}, []),
    (ErasureUnavailable("not with JetStream"), C.FAILED_PRECONDITION, "ERASURE_UNAVAILABLE", {}, []),
    (ErasureFailed("rebuild failed"), C.INTERNAL, "ERASURE_INCOMPLETE", {}, []),
    (ExportError("onnx differs from torch"), C.FAILED_PRECONDITION, "EXPORT_FAILED", {}, []),
    (BatchScoringError("bundle has no catalog"), C.FAILED_PRECONDITION, "BATCH_SCORING_FAILED", {}, []),
    (OutputMismatch("OUT holds another job"), C.FAILED_PRECONDITION, "BATCH_OUTPUT_MISMATCH", {}, []),
    (MalformedMessage("the request is not a valid Rank request message"), C.INVALID_ARGUMENT, "MALFORMED_MESSAGE", {}, []),
    (StreamIdle("no message for 30 s after message 3"), C.DEADLINE_EXCEEDED, "STREAM_IDLE", {}, []),
    (MessageTooLarge("the Rank request message is 9000 bytes", 9000, 4096), C.RESOURCE_EXHAUSTED, "MESSAGE_TOO_LARGE",
     {"bytes": "9000", "max_bytes": "4096"}, []),
    (SemrankError("an error nobody classified"), C.INTERNAL, "INTERNAL", {}, []),
]


class RaisingService(pb_grpc.RankingServiceServicer):
    """Fault injection: Rank (unary-unary) and LogEvents (stream-unary) raise `self.error`; with
    `error` None they answer (LogEvents: the number of events it read)."""

    error: BaseException | None = None

    async def Rank(self, request, context):
        if self.error is None:
            return pb.RankResponse(request_id=request.request_id)
        raise self.error

    async def LogEvents(self, request_iterator, context):
        n = 0
        async for msg in request_iterator:
            if self.error is not None:
                raise self.error
            n += len(msg.events)
        return pb.LogEventsResponse(accepted=n)

    async def ReloadBundle(self, request, context):
        await context.abort(C.NOT_FOUND, "aborted by the handler itself")


UNEXPECTED = KeyError("redis://10.0.0.3:6379 secret-internal-detail")
RANK_REQUEST = pb.RankRequest(request_id="req-7", user_id="u1")
RANK_METHOD = "/semrank.ranking.v1.RankingService/Rank"
LOG_EVENTS_METHOD = "/semrank.ranking.v1.RankingService/LogEvents"
EVENTS = pb.LogEventsRequest(events=[pb.Event(user_id="u1", item_id="i1")]).SerializeToString()
MALFORMED = {  # raw request bytes that are not a valid message of the method's type
    "truncated": b"\x0a\xff\xff\xff\x0f\x01",  # field 1, a length far past the end
    "invalid utf-8": pb.RankRequest(request_id="ab", user_id="cd").SerializeToString().replace(b"cd", b"\xff\xfe"),
    "varint too long": b"\x08" + b"\xff" * 11,  # field 1 as a varint of more than 10 bytes
}


async def _call(stub, method: str) -> grpc.aio.AioRpcError:
    try:
        if method == "Rank":
            await stub.Rank(RANK_REQUEST, timeout=10)
        elif method == "LogEvents":
            await stub.LogEvents(iter([pb.LogEventsRequest(events=[pb.Event(user_id="u1", item_id="i1")])]), timeout=10)
        else:
            await stub.ReloadBundle(pb.ReloadBundleRequest(), timeout=10)
    except grpc.aio.AioRpcError as e:
        return e
    raise AssertionError(f"{method} succeeded")


LIMIT = 64 * 1024


async def _call_request(call) -> grpc.aio.AioRpcError:
    try:
        await call
    except grpc.aio.AioRpcError as e:
        return e
    raise AssertionError("an oversized request succeeded")


async def _raw(call) -> grpc.aio.AioRpcError:
    try:
        await call
    except grpc.aio.AioRpcError as e:
        return e
    raise AssertionError("a malformed request succeeded")


@pytest.fixture(scope="module")
def answers() -> dict:
    """{(row or name, method): the AioRpcError a real channel got}, from one server."""

    async def run():
        server = grpc.aio.server(interceptors=[ErrorInterceptor(max_message_bytes=LIMIT)],
                                 options=[("grpc.max_receive_message_length", too_large_backstop(LIMIT))])
        service = RaisingService()
        pb_grpc.add_RankingServiceServicer_to_server(service, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        out = {}
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.RankingServiceStub(channel)
                for k, (error, *_) in enumerate(TABLE):
                    service.error = error
                    for method in ("Rank", "LogEvents"):
                        out[k, method] = await _call(stub, method)
                service.error = UNEXPECTED
                out["unexpected", "Rank"] = await _call(stub, "Rank")
                out["abort", "ReloadBundle"] = await _call(stub, "ReloadBundle")
                service.error = None
                raw_rank = channel.unary_unary(RANK_METHOD)
                raw_log = channel.stream_unary(LOG_EVENTS_METHOD, response_deserializer=pb.LogEventsResponse.FromString)
                for name, data in MALFORMED.items():
                    out["malformed", name] = await _raw(raw_rank(data, timeout=10))
                out["malformed", "stream"] = await _raw(raw_log(iter([EVENTS, EVENTS, MALFORMED["truncated"]]), timeout=10))
                out["well-formed", "stream"] = await raw_log(iter([EVENTS, EVENTS]), timeout=10)
                big = pb.RankRequest(user_id="u1", candidates=[pb.RankCandidate(item_id="i", title="t" * 2 * LIMIT)])
                out["too large", "Rank"] = await _call_request(stub.Rank(big, timeout=10))
                out["too large", "stream"] = await _raw(raw_log(iter([EVENTS, b"\x0a" + b"\x00" * (LIMIT + 10)]), timeout=10))
                huge = pb.RankRequest(user_id="u1", candidates=[pb.RankCandidate(item_id="i", title="t" * 3 * (1 << 20))])
                out["far too large", "Rank"] = await _call_request(stub.Rank(huge, timeout=10))
        finally:
            await server.stop(None)
        return out

    return asyncio.run(run())


def _details(err: grpc.aio.AioRpcError):
    status = rpc_status.from_call(err)
    assert status is not None, "no google.rpc.Status in the trailers"
    info, bad = error_details_pb2.ErrorInfo(), None
    assert status.details[0].Unpack(info)
    for d in status.details[1:]:
        if d.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            d.Unpack(bad)
    return info, bad


@pytest.mark.parametrize("method", ["Rank", "LogEvents"])
@pytest.mark.parametrize("row", range(len(TABLE)), ids=[type(r[0]).__name__ for r in TABLE])
def test_every_error_maps_to_its_status(answers, row, method):
    error, code, reason, metadata, fields = TABLE[row]
    got = answers[row, method]
    assert got.code() == code
    assert got.details() == str(error)
    info, bad = _details(got)
    assert (info.reason, info.domain) == (reason, DOMAIN)
    assert metadata.items() <= dict(info.metadata).items()
    if method == "Rank":
        assert info.metadata["request_id"] == "req-7"
    assert ([v.field for v in bad.field_violations] if bad else []) == fields


def test_an_unexpected_error_is_internal_without_its_text(answers):
    got = answers["unexpected", "Rank"]
    assert got.code() == C.INTERNAL
    assert "secret-internal-detail" not in got.details() and "req-7" in got.details()
    info, _ = _details(got)
    assert info.reason == "INTERNAL" and info.metadata["request_id"] == "req-7"


def test_a_handler_abort_passes_through(answers):
    got = answers["abort", "ReloadBundle"]
    assert (got.code(), got.details()) == (C.NOT_FOUND, "aborted by the handler itself")


@pytest.mark.parametrize("name", MALFORMED)
def test_a_malformed_message_is_invalid_argument(answers, name):
    got = answers["malformed", name]
    assert got.code() == C.INVALID_ARGUMENT, got
    assert "is not a valid Rank request message" in got.details()
    info, bad = _details(got)
    assert info.reason == "MALFORMED_MESSAGE" and bad is None


def test_a_malformed_message_in_a_stream_fails_the_call_after_the_messages_before_it(answers):
    got = answers["malformed", "stream"]
    assert got.code() == C.INVALID_ARGUMENT and "(message 2 of the stream)" in got.details()
    assert _details(got)[0].reason == "MALFORMED_MESSAGE"
    assert answers["well-formed", "stream"].accepted == 2  # the checking costs a well-formed stream nothing


def test_a_message_over_the_limit_is_told_apart_from_overload(answers):
    """Issue 14, problem 12: both are RESOURCE_EXHAUSTED; the reason says which (never retry this one)."""
    for key in ("Rank", "stream"):
        got = answers["too large", key]
        assert got.code() == C.RESOURCE_EXHAUSTED, got
        info, _ = _details(got)
        assert info.reason == "MESSAGE_TOO_LARGE" and info.metadata["max_bytes"] == str(LIMIT)
    assert "(message 1 of the stream)" in answers["too large", "stream"].details()
    far = answers["far too large", "Rank"]  # beyond grpc's backstop: grpc's own answer, no details
    assert far.code() == C.RESOURCE_EXHAUSTED and rpc_status.from_call(far) is None


def _all_error_classes() -> set[type]:
    for package in (featurizer, ranker, serving):
        for m in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            importlib.import_module(m.name)
    found, todo = set(), [SemrankError]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.__module__.split(".")[0] in {"featurizer", "ranker", "serving"}:
            found.add(cls)
    return found


def test_the_table_lists_every_error_class():
    listed = {type(error) for error, *_ in TABLE}
    missing = sorted(c.__qualname__ for c in _all_error_classes() - listed)
    assert not missing, f"add these SemrankError classes to the table: {missing}"
