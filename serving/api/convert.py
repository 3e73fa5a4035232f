"""Proto <-> domain conversion: candidates, events and items in; ranked answers and model info out."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone

import polars as pl
from google.protobuf.timestamp_pb2 import Timestamp

from semrank.ranking.v1 import ranking_service_pb2 as pb
from serving.ingest.log_format import LoggedEvent

EVENT_NAMES = {
    pb.EVENT_TYPE_IMPRESSION: "impression",
    pb.EVENT_TYPE_CLICK: "click",
    pb.EVENT_TYPE_ADD_TO_CART: "add_to_cart",
    pb.EVENT_TYPE_PURCHASE: "purchase",
}


def to_logged(ev: pb.Event, pseudonyms: Callable[[str], str] = str) -> LoggedEvent:
    """The event as stored: its user id mapped by `pseudonyms` (featurizer.privacy; identity by default)."""
    return LoggedEvent(
        ts_us=ev.ts.seconds * 1_000_000 + ev.ts.nanos // 1000, user_id=pseudonyms(ev.user_id), item_id=ev.item_id,
        event=EVENT_NAMES[ev.type], request_id=ev.request_id, position=ev.position, event_id=ev.event_id,
    )


def to_us(t: datetime) -> int:
    """An aware datetime as µs since the epoch (what LoggedEvent.ts_us and the event rules use)."""
    return round(t.timestamp() * 1_000_000)


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


def timestamp(t: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(t.astimezone(timezone.utc).replace(tzinfo=None))
    return ts
