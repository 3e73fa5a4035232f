"""Events and items arriving over gRPC: validation (a reason naming the field) and conversion.

`LogEvents` and `UpsertItems` accept what is valid and reject the rest one by one, so a
bad event never costs the good ones in the same stream.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone

import polars as pl

from semrank.ranking.v1 import ranking_service_pb2 as pb
from serving.ingest.event_log import LoggedEvent
from serving.api.validation import Limits

EVENT_NAMES = {
    pb.EVENT_TYPE_IMPRESSION: "impression",
    pb.EVENT_TYPE_CLICK: "click",
    pb.EVENT_TYPE_ADD_TO_CART: "add_to_cart",
    pb.EVENT_TYPE_PURCHASE: "purchase",
}
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
OLDEST_EVENT = datetime(2000, 1, 1, tzinfo=timezone.utc)


def event_problem(ev: pb.Event, limits: Limits, now: datetime) -> str | None:
    """Why the event is rejected ("field: reason"), or None when it is valid."""
    for name, limit in (("user_id", limits.max_user_id_chars), ("item_id", limits.max_item_id_chars)):
        value = getattr(ev, name)
        if not value.strip():
            return f"{name}: must not be empty"
        if len(value) > limit:
            return f"{name}: longer than {limit} characters"
    if ev.type not in EVENT_NAMES:
        return f"type: must be one of {', '.join(pb.EventType.Name(k) for k in EVENT_NAMES)}"
    if not ev.HasField("ts"):
        return "ts: must be set (the UTC time of the event)"
    if not 0 <= ev.ts.nanos < 1_000_000_000:
        return "ts: nanos out of range"
    ts = EPOCH + timedelta(seconds=ev.ts.seconds, microseconds=ev.ts.nanos // 1000)
    if ts < OLDEST_EVENT:
        return f"ts: {ts.isoformat()} is before {OLDEST_EVENT.date()}"
    if ts > now + timedelta(seconds=limits.max_event_clock_skew_s):
        return f"ts: {ts.isoformat()} is more than {limits.max_event_clock_skew_s:g} s in the future"
    if len(ev.request_id) > limits.max_item_id_chars:
        return f"request_id: longer than {limits.max_item_id_chars} characters"
    if len(ev.event_id) > limits.max_item_id_chars:
        return f"event_id: longer than {limits.max_item_id_chars} characters"
    if ev.position < 0:
        return "position: must be >= 0 (0 = not shown in a ranked list)"
    return None


def to_logged(ev: pb.Event) -> LoggedEvent:
    return LoggedEvent(
        ts_us=ev.ts.seconds * 1_000_000 + ev.ts.nanos // 1000, user_id=ev.user_id, item_id=ev.item_id,
        event=EVENT_NAMES[ev.type], request_id=ev.request_id, position=ev.position, event_id=ev.event_id,
    )


def item_problem(item: pb.RankCandidate, limits: Limits, known: bool) -> str | None:
    if not item.item_id.strip():
        return "item_id: must not be empty"
    if len(item.item_id) > limits.max_item_id_chars:
        return f"item_id: longer than {limits.max_item_id_chars} characters"
    if not known and not item.title.strip():
        return "title: required for a new item (the text it is ranked by)"
    for name in ("title", "description", "category", "brand"):
        if len(getattr(item, name)) > limits.max_text_chars:
            return f"{name}: longer than {limits.max_text_chars} characters"
    if item.HasField("price") and not (math.isfinite(item.price) and item.price >= 0):
        return "price: must be a finite number >= 0"
    return None


def items_frame(items: list[pb.RankCandidate]) -> pl.DataFrame:
    """Upserted items; an empty text field or an unset price leaves the known value unchanged (null)."""
    def text(name: str) -> list[str | None]:
        return [getattr(i, name) or None for i in items]

    return pl.DataFrame(
        {
            "item_id": [i.item_id for i in items], "title": text("title"), "description": text("description"),
            "category": text("category"), "brand": text("brand"),
            "price": [i.price if i.HasField("price") else None for i in items],
        },
        schema={"item_id": pl.Utf8, "title": pl.Utf8, "description": pl.Utf8, "category": pl.Utf8, "brand": pl.Utf8, "price": pl.Float64},
    )
