"""The one root of semrank's errors.

Every error semrank raises on purpose derives from `SemrankError`, and is defined beside the code
that raises it (`DataContractError` in `featurizer.contracts.schema`, `BundleError` in
`ranker.bundle`, `EncoderUnavailable` in `serving.triton.client`, ...). Each class says how a
request that meets it is answered, without importing grpc:

- `grpc_code`: the name of the status code (a `grpc.StatusCode` / `google.rpc.Code` name);
- `reason`: a stable UPPER_SNAKE_CASE identifier, sent as `google.rpc.ErrorInfo.reason` with the
  domain "semrank", so clients can branch on it without parsing messages;
- `field_violations()`: (field, description) pairs, sent as a `google.rpc.BadRequest`;
- `error_metadata()`: string pairs for `ErrorInfo.metadata` (e.g. how many events were stored).

`serving.api.errors.ErrorInterceptor` is the one place that turns them into gRPC statuses; the
command line (`semrank.cli.main`) prints their message and exits with status 2. Messages say what
to do about the problem.
"""

from __future__ import annotations

from typing import ClassVar

# The status code names a SemrankError may carry (google.rpc.Code, without OK).
GRPC_CODES = frozenset({
    "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
    "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
})


class SemrankError(Exception):
    """Root of every error semrank raises on purpose; subclasses set `grpc_code` and `reason`."""

    grpc_code: ClassVar[str] = "INTERNAL"
    reason: ClassVar[str] = "INTERNAL"

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if cls.grpc_code not in GRPC_CODES:
            raise TypeError(f"{cls.__name__}.grpc_code {cls.grpc_code!r} is not a gRPC status code name")
        if not cls.reason.replace("_", "").isalnum() or cls.reason.upper() != cls.reason:
            raise TypeError(f"{cls.__name__}.reason {cls.reason!r} must be UPPER_SNAKE_CASE")

    def field_violations(self) -> list[tuple[str, str]]:
        """(field, description) of each bad field of a request; empty when the error is not about one."""
        return []

    def error_metadata(self) -> dict[str, str]:
        """Machine-readable facts about this error (string keys and values)."""
        return {}


class ConfigError(SemrankError, ValueError):
    """A configuration value is invalid; the message names the setting and the allowed values."""

    grpc_code = "INVALID_ARGUMENT"
    reason = "INVALID_CONFIG"
