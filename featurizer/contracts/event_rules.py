"""What a valid event and a valid item are: one definition for every way they enter semrank.

    rules = EventRules(max_user_id_chars=256, max_item_id_chars=256, max_event_clock_skew_s=300)
    rules.problem(event, now_us)     # "field: reason", or None for a valid event
    problem_field(problem)           # "ts": the bounded reason code metrics count by
    ItemRules(256, 4096).problem(row, known)   # an item row (UpsertItems, the stream's item messages)

`event` is anything with the fields of a logged event (`ts_us`, `user_id`, `item_id`, `event`,
`request_id`, `position`, `event_id`): the API checks a `LogEvents` event with it after the
wire-only checks (a set timestamp, nanos in range, a known enum), and the JetStream fold checks
every stream message with it, whoever published it. Both reject the same events with the same
reason, so an event refused by the API is never applied from the stream either (issue 30).

`now_us` is the instant the future bound is measured from: the server's clock for the API, and
the message's own JetStream timestamp for the stream, so every replica that folds one message
makes the same decision whatever its clock says. Events are accepted from 2000-01-01 to
`now + max_event_clock_skew_s`; the feature clock (the latest applied event) therefore only moves
with events inside that window.

Types are checked as well as ranges (a stream message is JSON from any producer): ids and texts
are strings, the time and position integers (not booleans), the position a non-negative int32.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from featurizer.contracts.schema import EVENT_TYPES

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
OLDEST_EVENT = datetime(2000, 1, 1, tzinfo=timezone.utc)
OLDEST_EVENT_US = int((OLDEST_EVENT - EPOCH).total_seconds()) * 1_000_000
MAX_POSITION = 2**31 - 1  # the wire's int32
_DATETIME_RANGE_S = (-62_135_596_800, 253_402_300_799)  # 0001-01-01 .. 9999-12-31T23:59:59 UTC


def describe_time(ts_us: int) -> str:
    """µs since the epoch as an ISO time when datetime can hold it, else as a number of seconds."""
    seconds = ts_us // 1_000_000
    if _DATETIME_RANGE_S[0] <= seconds <= _DATETIME_RANGE_S[1]:
        return (EPOCH + timedelta(seconds=seconds)).isoformat()
    return f"{seconds} s since 1970-01-01"


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def problem_field(problem: str) -> str:
    """The field a problem names (its text before the colon): a bounded label for metrics."""
    field = problem.split(":", 1)[0]
    return field if field in FIELDS else "other"


FIELDS = ("user_id", "item_id", "type", "ts", "request_id", "event_id", "position")


@dataclass(frozen=True)
class EventRules:
    max_user_id_chars: int = 256
    max_item_id_chars: int = 256  # also request_id and event_id
    max_event_clock_skew_s: float = 300.0  # events stamped further past `now` are refused

    def __post_init__(self) -> None:
        if min(self.max_user_id_chars, self.max_item_id_chars) < 1 or self.max_event_clock_skew_s < 0:
            raise ValueError(f"id limits must be >= 1 and the clock skew >= 0: {self}")

    def problem(self, e: object, now_us: int) -> str | None:
        """Why `e` is refused ("field: reason"), or None when it is valid at `now_us`."""
        for name, limit in (("user_id", self.max_user_id_chars), ("item_id", self.max_item_id_chars)):
            value = getattr(e, name, None)
            if not isinstance(value, str):
                return f"{name}: must be a string"
            if not value.strip():
                return f"{name}: must not be empty"
            if len(value) > limit:
                return f"{name}: longer than {limit} characters"
        if getattr(e, "event", None) not in EVENT_TYPES:
            return f"type: must be one of {', '.join(EVENT_TYPES)}"
        ts = getattr(e, "ts_us", None)
        if not _is_int(ts):
            return "ts: must be an integer (µs since 1970-01-01 UTC)"
        if ts < OLDEST_EVENT_US:
            return f"ts: {describe_time(ts)} is before {OLDEST_EVENT.date()}"
        if ts > now_us + int(self.max_event_clock_skew_s * 1_000_000):
            return f"ts: {describe_time(ts)} is more than {self.max_event_clock_skew_s:g} s in the future"
        for name in ("request_id", "event_id"):
            value = getattr(e, name, "")
            if not isinstance(value, str):
                return f"{name}: must be a string"
            if len(value) > self.max_item_id_chars:
                return f"{name}: longer than {self.max_item_id_chars} characters"
        position = getattr(e, "position", 0)
        if not _is_int(position) or not 0 <= position <= MAX_POSITION:
            return f"position: must be an integer from 0 to {MAX_POSITION} (0 = not shown in a ranked list)"
        return None


ITEM_TEXT_FIELDS = ("title", "description", "category", "brand")


@dataclass(frozen=True)
class ItemRules:
    """A valid item row (`item_id`, the text fields, `price`; a None field leaves a known item's value
    unchanged): UpsertItems checks each item with it, and the JetStream fold each item message."""

    max_item_id_chars: int = 256
    max_text_chars: int = 4096  # per text field

    def problem(self, row: Mapping[str, object], known: bool) -> str | None:
        """Why the row is refused ("field: reason"), or None; `known`: the item is in the catalog
        (a new one needs a title, the text it is ranked by)."""
        item_id = row.get("item_id")
        if not isinstance(item_id, str):
            return "item_id: must be a string"
        if not item_id.strip():
            return "item_id: must not be empty"
        if len(item_id) > self.max_item_id_chars:
            return f"item_id: longer than {self.max_item_id_chars} characters"
        for name in ITEM_TEXT_FIELDS:
            value = row.get(name)
            if value is not None and not isinstance(value, str):
                return f"{name}: must be a string"
        title = row.get("title")
        if not known and not (title and title.strip()):
            return "title: required for a new item (the text it is ranked by)"
        for name in ITEM_TEXT_FIELDS:
            value = row.get(name)
            if value is not None and len(value) > self.max_text_chars:
                return f"{name}: longer than {self.max_text_chars} characters"
        price = row.get("price")
        if price is not None and (isinstance(price, bool) or not isinstance(price, (int, float))
                                  or not math.isfinite(price) or price < 0):
            return "price: must be a finite number >= 0"
        return None
