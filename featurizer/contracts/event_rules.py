"""What a valid event is: one definition for every way an event enters semrank.

    rules = EventRules(max_user_id_chars=256, max_item_id_chars=256, max_event_clock_skew_s=300)
    rules.problem(event, now_us)     # "field: reason", or None for a valid event
    problem_field(problem)           # "ts": the bounded reason code metrics count by

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
