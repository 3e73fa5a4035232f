"""Structured logs: one JSON object per line, carrying the current request's ids.

The service binds the request once and every log line below it, in this task and in
tasks it starts, carries the ids:

    with bind_request(request_id=rid, user_id=req.user_id):
        variant = assign(...)
        update_request(variant=variant.name, model_version=bundle.version)
        log.info("ranked %d candidates", n)
    # {"ts": "2025-06-01T12:00:00.123Z", "level": "INFO", "logger": "serving.api.service",
    #  "message": "ranked 300 candidates", "request_id": "ab12", "user_id": "u1", "variant": "treatment", ...}

Only entry points call `configure_logging`; modules use `logging.getLogger(__name__)`.
"""

from __future__ import annotations

import json as _json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone


@dataclass(frozen=True)
class RequestContext:
    request_id: str | None = None
    user_id: str | None = None
    variant: str | None = None
    model_version: str | None = None

    def fields(self) -> dict[str, str]:
        return {k: v for k, v in asdict(self).items() if v is not None}


request_context: ContextVar[RequestContext] = ContextVar("semrank_request_context", default=RequestContext())

MAX_LOGGED_CHARS = 128  # a caller's value longer than this is logged cut short, with its length


def clip(value: str | None, limit: int = MAX_LOGGED_CHARS) -> str | None:
    """`value` for a log line: as is when short, else its first `limit` characters and its length,
    so that a rejected 10,000-character id neither floods the logs nor hides that it was long."""
    if value is None or len(value) <= limit:
        return value
    return f"{value[:limit]}...({len(value)} chars)"


@contextmanager
def bind_request(**fields: str | None) -> Iterator[RequestContext]:
    """Add request fields (request_id, user_id, variant, model_version) for the block; nested binds merge.

    Unknown field names raise TypeError, so a typo fails in tests rather than vanishing from logs.
    """
    ctx = replace(request_context.get(), **{k: clip(v) for k, v in fields.items()})
    token = request_context.set(ctx)
    try:
        yield ctx
    finally:
        request_context.reset(token)


def update_request(**fields: str | None) -> None:
    """Set more fields on the current request (e.g. variant once assigned); undone when the bind ends."""
    request_context.set(replace(request_context.get(), **{k: clip(v) for k, v in fields.items()}))


# LogRecord attributes that are not `extra=` fields.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (ISO-8601 UTC), level, logger, message, request fields, extras, exc."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update(request_context.get().fields())
        for key, value in vars(record).items():
            # Private attributes are other libraries' bookkeeping (Ray's record factory adds
            # `_ray_timestamp_ns` to every record once it is imported), not extra= fields.
            if key not in _RECORD_ATTRS and key not in out and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        # ensure_ascii keeps U+2028 and friends escaped: exactly one physical line per record.
        return _json.dumps(out, default=str)


class ContextTextFormatter(logging.Formatter):
    """Human-readable lines with the request fields appended, for local runs."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = request_context.get().fields()
        if fields:
            line += " [" + " ".join(f"{k}={v}" for k, v in fields.items()) + "]"
        return line


def configure_logging(level: int | str = "INFO", json: bool = False) -> logging.Handler:
    """Log to stderr, as JSON lines or text. For entry points only; calling it again replaces its handler.

    Handlers installed by others (e.g. pytest's capture) are left alone.
    """
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, "_semrank", False)]:
        root.removeHandler(h)
        h.close()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json else ContextTextFormatter())
    handler._semrank = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    return handler
