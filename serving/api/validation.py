"""Validation of what arrives over gRPC, against the configured `serving.config.Limits`.

- A bad `RankRequest` raises `InvalidRequest` naming every bad field (up to MAX_VIOLATIONS), e.g.
  `candidates[3].item_id: must not be empty`; the error interceptor answers INVALID_ARGUMENT with
  a google.rpc.BadRequest, and the message repeats the violations for clients without
  rich-status support.
- `LogEvents` and `UpsertItems` accept what is valid and reject the rest one by one
  (`event_problem`, `item_problem` give the reason, naming the field), so a bad event never costs
  the good ones in the same stream.
"""

from __future__ import annotations

import math
from operator import attrgetter
from dataclasses import dataclass
from datetime import datetime

from featurizer.contracts.event_rules import ITEM_TEXT_FIELDS
from featurizer.errors import SemrankError
from semrank.ranking.v1 import ranking_service_pb2 as pb
from serving.api.convert import EVENT_NAMES, to_logged, to_us
from serving.config import Limits


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str

    def __str__(self) -> str:
        return f"{self.field}: {self.description}"


class InvalidRequest(SemrankError):
    """A request with bad fields; the message lists them, and so do the BadRequest details."""

    grpc_code = "INVALID_ARGUMENT"
    reason = "INVALID_REQUEST"

    def __init__(self, violations: list[FieldViolation], what: str = "RankRequest"):
        self.violations = violations
        super().__init__(f"invalid {what}: " + "; ".join(map(str, violations)))

    def field_violations(self) -> list[tuple[str, str]]:
        return [(v.field, v.description) for v in self.violations]


MAX_VIOLATIONS = 20  # report at most this many, so a huge bad request gets a small error


@dataclass(frozen=True)
class RankCandidates:
    """A valid request's candidates, read off the wire once: the messages as a list (each pass over
    the repeated field makes a Python object per candidate again: about 0.1 ms per 1000) and their
    ids, in the request's order, for the engine."""

    candidates: list
    ids: list[str]


def validate_rank_request(req: pb.RankRequest, limits: Limits) -> RankCandidates:
    """The request's candidates and ids; raises InvalidRequest naming every bad field (up to MAX_VIOLATIONS)."""
    v: list[FieldViolation] = []
    if not req.user_id.strip():
        v.append(FieldViolation("user_id", "must be set (users never seen before get a cold-start ranking)"))
    elif len(req.user_id) > limits.max_user_id_chars:
        v.append(FieldViolation("user_id", f"longer than {limits.max_user_id_chars} characters"))
    n = len(req.candidates)
    if n == 0:
        v.append(FieldViolation("candidates", "must not be empty"))
    elif n > limits.max_candidates:
        v.append(FieldViolation("candidates", f"{n} candidates exceed the limit of {limits.max_candidates}"))
    if req.top_k < 0:
        v.append(FieldViolation("top_k", "must be >= 0 (0 returns all candidates)"))
    elif req.top_k > limits.max_top_k:
        v.append(FieldViolation("top_k", f"must be <= {limits.max_top_k}"))
    for name in ("query", "page"):
        if len(getattr(req.context, name)) > limits.max_text_chars:
            v.append(FieldViolation(f"context.{name}", f"longer than {limits.max_text_chars} characters"))
    if req.min_sequence < 0:
        v.append(FieldViolation("min_sequence", "must be >= 0 (a LogEventsResponse.sequence, or 0)"))
    if req.context.device not in pb.Device.values():
        v.append(FieldViolation("context.device", f"unknown value {req.context.device}"))
    candidates = list(req.candidates) if n <= limits.max_candidates else []
    ids = list(map(_ITEM_ID, candidates))
    if candidates and not _candidates_valid(candidates, ids, limits):
        first_seen: dict[str, int] = {}
        for k, c in enumerate(candidates):
            if len(v) >= MAX_VIOLATIONS:
                break
            if not c.item_id.strip():
                v.append(FieldViolation(f"candidates[{k}].item_id", "must not be empty"))
            elif len(c.item_id) > limits.max_item_id_chars:
                v.append(FieldViolation(f"candidates[{k}].item_id", f"longer than {limits.max_item_id_chars} characters"))
            elif c.item_id in first_seen:
                v.append(FieldViolation(f"candidates[{k}].item_id", f"duplicate of candidates[{first_seen[c.item_id]}]"))
            else:
                first_seen[c.item_id] = k
            for name in ("title", "description", "category", "brand"):
                if len(getattr(c, name)) > limits.max_text_chars:
                    v.append(FieldViolation(f"candidates[{k}].{name}", f"longer than {limits.max_text_chars} characters"))
            if c.HasField("price") and not (math.isfinite(c.price) and c.price >= 0):
                v.append(FieldViolation(f"candidates[{k}].price", f"{c.price} is not a finite number >= 0"))
    if v:
        raise InvalidRequest(v[:MAX_VIOLATIONS])
    return RankCandidates(candidates, ids)


def _candidates_valid(candidates: list, ids: list[str], limits: Limits) -> bool:
    """Whether every candidate (the messages, and their ids) passes the per-candidate checks below,
    in a few passes of C-level maps over the list (the usual case: 0.9 ms at 1000 candidates as a
    Python loop, 0.3 ms for these passes). False sends the request to the loop, which names each bad
    field. A candidate's serialized size bounds each of its texts: one no larger than
    `max_text_chars` bytes has no text field over that many characters. An unset price reads 0.0,
    which passes."""
    if not candidates:
        return True
    if not (len(set(ids)) == len(ids) and max(map(len, ids)) <= limits.max_item_id_chars and all(map(str.strip, ids))):
        return False
    if max(map(pb.RankCandidate.ByteSize, candidates)) > limits.max_text_chars:
        return False
    prices = list(map(_PRICE, candidates))
    return all(map(math.isfinite, prices)) and min(prices) >= 0.0


_ITEM_ID, _PRICE = attrgetter("item_id"), attrgetter("price")


def event_problem(ev: pb.Event, limits: Limits, now: datetime) -> str | None:
    """Why the event is rejected ("field: reason"), or None when it is valid: the wire's own checks
    (a set timestamp, nanos in range, a known type), then the rules every entry point shares
    (`featurizer.contracts.event_rules`, which the JetStream fold applies to every message)."""
    if ev.type not in EVENT_NAMES:
        return f"type: must be one of {', '.join(pb.EventType.Name(k) for k in EVENT_NAMES)}"
    if not ev.HasField("ts"):
        return "ts: must be set (the UTC time of the event)"
    if not 0 <= ev.ts.nanos < 1_000_000_000:
        return "ts: nanos out of range"
    return limits.event_rules.problem(to_logged(ev), to_us(now))


def item_problem(item: pb.RankCandidate, limits: Limits, known: bool) -> str | None:
    """Why an upserted item is rejected ("field: reason"), or None: the rules the JetStream fold
    applies to item messages too (`featurizer.contracts.event_rules.ItemRules`)."""
    row = {"item_id": item.item_id, "price": item.price if item.HasField("price") else None,
           **{name: getattr(item, name) or None for name in ITEM_TEXT_FIELDS}}
    return limits.item_rules.problem(row, known)


def validate_delete_user(request: pb.DeleteUserRequest, limits: Limits) -> list[str]:
    """The request's distinct user ids, or InvalidRequest naming each bad field."""
    bad: list[FieldViolation] = []
    if not request.user_ids:
        bad.append(FieldViolation("user_ids", "must name at least one user"))
    elif len(request.user_ids) > limits.max_erase_users:
        bad.append(FieldViolation("user_ids", f"at most {limits.max_erase_users} per call, got {len(request.user_ids)}"))
    for k, user_id in enumerate(request.user_ids):
        if len(bad) >= MAX_VIOLATIONS:
            break
        if not user_id.strip():
            bad.append(FieldViolation(f"user_ids[{k}]", "must not be empty"))
        elif len(user_id) > limits.max_user_id_chars:
            bad.append(FieldViolation(f"user_ids[{k}]", f"longer than {limits.max_user_id_chars} characters"))
    if not request.requested_by.strip():
        bad.append(FieldViolation("requested_by", "must say who asked (a ticket or an operator); it is recorded"))
    elif len(request.requested_by) > limits.max_requested_by_chars:
        bad.append(FieldViolation("requested_by", f"longer than {limits.max_requested_by_chars} characters"))
    if bad:
        raise InvalidRequest(bad, "DeleteUserRequest")
    return list(dict.fromkeys(request.user_ids))
