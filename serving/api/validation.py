"""Request validation and its gRPC error shape.

A bad request is answered with INVALID_ARGUMENT as a google.rpc.Status whose
details carry a google.rpc.BadRequest listing every field violation, e.g.
`candidates[3].item_id: must not be empty`. The status message repeats the
violations so that clients without rich-status support still see the field.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from semrank.ranking.v1 import ranking_service_pb2 as pb


@dataclass(frozen=True)
class Limits:
    """Explicit, configurable request limits."""

    max_candidates: int = 2000
    max_item_id_chars: int = 256
    max_user_id_chars: int = 256
    max_text_chars: int = 4096  # per inline title/description/category/brand field
    max_top_k: int = 2000
    max_event_clock_skew_s: float = 300.0  # events stamped further in the future are rejected
    max_rejections_listed: int = 100  # per LogEvents/UpsertItems response; the counts cover all
    max_message_bytes: int = 4 * 1024 * 1024  # per gRPC message, both directions


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str

    def __str__(self) -> str:
        return f"{self.field}: {self.description}"


class InvalidRequest(Exception):
    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, violations: list[FieldViolation]):
        self.violations = violations
        super().__init__("; ".join(map(str, violations)))

    def to_status(self) -> grpc.Status:
        detail = any_pb2.Any()
        detail.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                    for v in self.violations
                ]
            )
        )
        return rpc_status.to_status(
            status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=f"invalid RankRequest: {self}", details=[detail])
        )


MAX_VIOLATIONS = 20  # report at most this many, so a huge bad request gets a small error


def validate_rank_request(req: pb.RankRequest, limits: Limits) -> None:
    """Raise InvalidRequest naming every bad field (up to MAX_VIOLATIONS)."""
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
    if req.context.device not in pb.Device.values():
        v.append(FieldViolation("context.device", f"unknown value {req.context.device}"))
    if n <= limits.max_candidates:
        first_seen: dict[str, int] = {}
        for k, c in enumerate(req.candidates):
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
    if v:
        raise InvalidRequest(v[:MAX_VIOLATIONS])
