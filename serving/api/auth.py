"""Bearer-token auth of gRPC calls: who may call what (tokens and roles are configured in
`serving.config.TokenAuth`).

Clients send `authorization: Bearer <token>` metadata, e.g. with
`grpc.composite_channel_credentials(channel_credentials(ca), grpc.access_token_call_credentials(token))`.
A call without a valid token raises `Unauthenticated`; a client token on an admin method
`PermissionDenied`; `serving.api.errors.ErrorInterceptor` answers them. Rejected calls never
reach the servicer.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import grpc

from featurizer.errors import ConfigError, SemrankError
from serving.api.interceptors import wrap_handler
from serving.config import DEFAULT_ADMIN_METHODS, DEFAULT_PUBLIC_METHODS, TokenAuth

log = logging.getLogger(__name__)


class Unauthenticated(SemrankError):
    grpc_code = "UNAUTHENTICATED"
    reason = "UNAUTHENTICATED"


class PermissionDenied(SemrankError):
    grpc_code = "PERMISSION_DENIED"
    reason = "ADMIN_REQUIRED"



HOW_TO = "send metadata 'authorization: Bearer <token>' with a semrank token"


def bearer_token(metadata) -> tuple[str | None, str | None]:
    """(token, None) or (None, why it is missing/malformed) from invocation metadata."""
    values = [v for k, v in (metadata or ()) if k == "authorization"]
    if not values:
        return None, f"missing credentials: {HOW_TO}"
    if len(values) > 1:
        return None, f"more than one authorization header: {HOW_TO}"
    value = values[0] if isinstance(values[0], str) else values[0].decode("latin-1")
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None, f"malformed authorization metadata (expected the Bearer scheme): {HOW_TO}"
    return token.strip(), None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Bearer-token auth for every method but `public_methods`; `admin_methods` need role admin.

    A rejected call raises `Unauthenticated` (missing/malformed/unknown token) or `PermissionDenied`
    (client token on an admin method) in place of the servicer's behavior, so the error interceptor
    (placed before this one) answers it like any other error.
    """

    def __init__(
        self,
        token_auth: TokenAuth,
        admin_methods: Iterable[str] = DEFAULT_ADMIN_METHODS,
        public_methods: Iterable[str] = DEFAULT_PUBLIC_METHODS,
    ):
        self.token_auth = token_auth
        self.admin_methods = frozenset(admin_methods)
        self.public_methods = frozenset(public_methods)
        if overlap := self.admin_methods & self.public_methods:
            raise ConfigError(f"methods both public and admin: {sorted(overlap)}; pick one")

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None or method in self.public_methods:
            return handler
        token, why = bearer_token(handler_call_details.invocation_metadata)
        principal = self.token_auth.authenticate(token) if token is not None else None
        if principal is None:
            why = why or f"unknown or revoked bearer token: {HOW_TO}"
            return _rejecting(handler, Unauthenticated(why))
        if method in self.admin_methods:
            short = method.rsplit("/", 1)[-1]
            if principal.role != "admin":
                msg = f"{short} needs an admin token; token {principal.name!r} has role {principal.role!r}"
                return _rejecting(handler, PermissionDenied(msg))
            log.info("admin call %s by %s", short, principal.name)
        return handler


def _rejecting(handler: grpc.RpcMethodHandler, error: SemrankError) -> grpc.RpcMethodHandler:
    """A handler of the same kind (so the server reads the request as usual) that raises `error` at once."""

    async def reject(_request_or_iterator, _context: grpc.aio.ServicerContext):
        raise error

    return wrap_handler(handler, lambda _behavior: reject)
