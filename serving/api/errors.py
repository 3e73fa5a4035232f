"""The one place where errors become gRPC statuses.

`ErrorInterceptor` wraps every RankingService method (and the admission and auth checks placed
after it). When a call raises:

- a `featurizer.errors.SemrankError`: its `grpc_code`, its message, and as details a
  `google.rpc.ErrorInfo` (reason, domain "semrank", `error_metadata()`), plus a
  `google.rpc.BadRequest` when it names `field_violations()`;
- anything else (a bug, a library error nobody translated): INTERNAL with a generic message
  naming the request id, never the exception's text (it may hold internal addresses), and the
  traceback in the server's log;
- a call already aborted, or cancelled, passes through untouched.

It also reads every request message first: one over `max_message_bytes` is `MessageTooLarge`
(RESOURCE_EXHAUSTED, ErrorInfo MESSAGE_TOO_LARGE: never retry it as is), told apart from overload
(RESOURCE_EXHAUSTED, OVERLOADED: retry with back-off). gRPC's own limit is set higher
(`too_large_backstop`), so only messages far over the limit get grpc's bare RESOURCE_EXHAUSTED.
And it decodes requests: a message that is not a valid protobuf of the method's request type
(truncated bytes, invalid UTF-8 in a string field, a wrong wire type) never reaches a handler as
an exception inside grpc (which would answer UNKNOWN and log a traceback); it becomes
`MalformedMessage`, INVALID_ARGUMENT. In a request stream, the messages before it were handled;
LogEvents says how many of its events were stored (`stored_before`).

Handlers therefore raise; they never call `context.abort` themselves. The table of which error
gives which status is `tests/serving/api/test_errors.py`.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
import logging
import uuid

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from featurizer.errors import SemrankError
from serving.api.interceptors import wrap_handler
from serving.observability.metrics import set_error_reason

log = logging.getLogger(__name__)

DOMAIN = "semrank"
INTERNAL_REASON = "INTERNAL"


class StreamCutShort(Exception):
    """Mixed into the errors that end a request stream before the client finished it: the streaming
    handler sets `stored_before` (what of the call was stored), which the status carries."""

    stored_before: int | None = None  # set by a streaming handler: its items stored before the error

    def error_metadata(self) -> dict[str, str]:
        return {} if self.stored_before is None else {"stored_before": str(self.stored_before)}


class MalformedMessage(StreamCutShort, SemrankError):
    """A request message that does not decode as the method's request type."""

    grpc_code = "INVALID_ARGUMENT"
    reason = "MALFORMED_MESSAGE"


class StreamIdle(StreamCutShort, SemrankError):
    """A client stream (LogEvents, UpsertItems) that sent nothing for `Budgets.stream_idle_s`: it is
    closed, so that idle streams cannot hold the writes budget."""

    grpc_code = "DEADLINE_EXCEEDED"
    reason = "STREAM_IDLE"


class MessageTooLarge(SemrankError):
    """A request message over the server's limit; send smaller messages (split a stream's batches)."""

    grpc_code = "RESOURCE_EXHAUSTED"
    reason = "MESSAGE_TOO_LARGE"

    def __init__(self, message: str, size: int, limit: int):
        super().__init__(message)
        self.size, self.limit = size, limit

    def error_metadata(self) -> dict[str, str]:
        return {"bytes": str(self.size), "max_bytes": str(self.limit)}


def too_large_backstop(max_message_bytes: int) -> int:
    """gRPC's own receive limit for a server whose limit is `max_message_bytes`: high enough that
    messages up to about twice the limit are refused by the interceptor, with details."""
    return max_message_bytes + max(max_message_bytes, 1 << 20)


class _Refused:
    """What the request deserializer hands on instead of raising: a message it refused to decode.
    `error(where)` builds the error; `where` names the message's place in a stream ("" for unary)."""

    __slots__ = ("error",)

    def __init__(self, error: Callable[[str], SemrankError]):
        self.error = error

    def raise_(self, index: int | None = None) -> None:
        raise self.error("" if index is None else f" (message {index} of the stream)")


def _safe_deserializer(deserialize, what: str, max_bytes: int | None):
    if deserialize is None:
        return None

    def safe(data: bytes):
        size = len(data)
        if max_bytes is not None and size > max_bytes:
            return _Refused(lambda where: MessageTooLarge(
                f"the {what} message{where} is {size} bytes, over the server's limit of {max_bytes}; send smaller "
                "messages (fewer candidates or events per message)", size, max_bytes))
        try:
            return deserialize(data)
        except Exception as e:  # noqa: BLE001 - DecodeError, UnicodeDecodeError, ...
            return _Refused(lambda where, e=e: MalformedMessage(
                f"the request{where} is not a valid {what} message: {type(e).__name__}: {str(e)[:200]}"))

    return safe


async def _checked(request_iterator, idle_s: float | None = None):
    """The stream's messages; an undecodable one raises MalformedMessage, and waiting over `idle_s`
    for the next one raises StreamIdle."""
    index = 0
    it = request_iterator.__aiter__()
    while True:
        try:
            message = await (it.__anext__() if idle_s is None else asyncio.wait_for(it.__anext__(), idle_s))
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise StreamIdle(f"no message for {idle_s:g} s after message {index}: the stream was closed "
                             "(send the rest in a new call)") from None
        if isinstance(message, _Refused):
            message.raise_(index)
        yield message
        index += 1


def to_status(error: BaseException, request_id: str = "") -> grpc.Status:
    """The status a call that raised `error` is answered with (see the module docstring)."""
    if isinstance(error, SemrankError):
        code, reason, message = error.grpc_code, error.reason, str(error) or type(error).__name__
        metadata = dict(error.error_metadata())
        violations = error.field_violations()
    else:
        code, reason, violations = "INTERNAL", INTERNAL_REASON, []
        message = f"internal error ({type(error).__name__}); the server logged it" + (
            f" with request id {request_id}" if request_id else "")
        metadata = {}
    if request_id:
        metadata.setdefault("request_id", request_id)
    details = [_pack(error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=metadata))]
    if violations:
        details.append(_pack(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in violations])))
    return rpc_status.to_status(status_pb2.Status(code=code_pb2.Code.Value(code), message=message, details=details))


def _pack(message) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(message)
    return out


def _request_id(request) -> str:
    return getattr(request, "request_id", "") or ""


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, service_prefix: str = "/semrank.", max_message_bytes: int | None = None,
                 stream_idle_s: float | None = None):
        self.service_prefix = service_prefix
        self.max_message_bytes = max_message_bytes
        self.stream_idle_s = stream_idle_s  # a client stream's longest wait for its next message (None: any)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(self.service_prefix):
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        what = f"{method} request"
        guarded = wrap_handler(handler, lambda behavior: self._guard(behavior, method, handler.request_streaming))
        return guarded._replace(request_deserializer=_safe_deserializer(handler.request_deserializer, what,
                                                                        self.max_message_bytes))

    def _guard(self, behavior, method: str, request_streaming: bool):
        def checked(request_or_iterator):
            if request_streaming:
                return _checked(request_or_iterator, self.stream_idle_s)
            if isinstance(request_or_iterator, _Refused):
                request_or_iterator.raise_()
            return request_or_iterator

        if inspect.isasyncgenfunction(behavior):

            async def stream(request_or_iterator, context):
                try:
                    async for response in behavior(checked(request_or_iterator), context):
                        yield response
                except Exception as e:  # noqa: BLE001 - every error gets a status
                    await self._abort(context, e, method, _request_id(request_or_iterator))

            return stream

        async def unary(request_or_iterator, context):
            try:
                return await behavior(checked(request_or_iterator), context)
            except Exception as e:  # noqa: BLE001 - every error gets a status
                await self._abort(context, e, method, _request_id(request_or_iterator))

        return unary

    async def _abort(self, context: grpc.aio.ServicerContext, error: Exception, method: str, request_id: str) -> None:
        if isinstance(error, grpc.aio.AbortError) or context.code() is not None:
            raise error  # already answered (context.abort)
        if isinstance(error, SemrankError):
            log.info("%s failed: %s %s: %s", method, error.grpc_code, error.reason, error)
            set_error_reason(error.reason)
        else:
            set_error_reason(INTERNAL_REASON)
            request_id = request_id or uuid.uuid4().hex
            log.error("%s failed with an unexpected error (request id %s)", method, request_id, exc_info=error)
        await context.abort_with_status(to_status(error, request_id))
