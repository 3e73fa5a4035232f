"""Who may call what: bearer tokens with roles (configured in `serving.config.TokenAuth`), or, with
no tokens, a server that is open for Rank and writes and closed for admin RPCs.

Roles, each allowed what the ones before it are: `client` (Rank, GetModelInfo), `writer`
(+ LogEvents, UpsertItems), `admin` (+ ReloadBundle, DeleteUser). Clients send `authorization: Bearer <token>`
metadata, e.g. with `grpc.composite_channel_credentials(channel_credentials(ca),
grpc.access_token_call_credentials(token))`.

- With tokens: a call without a valid token raises `Unauthenticated`; a token whose role is too
  low `WriterRequired` or `AdminRequired` (PERMISSION_DENIED).
- Without tokens: admin RPCs raise `AdminDisabled` (PERMISSION_DENIED), unless the server was
  started with `open_admin` on a loopback address (`serving.server` refuses it elsewhere, and
  logs that it is on); every other call is let through, and the server warns at start-up that
  writes are open.

Health checks and reflection are always public. `serving.api.errors.ErrorInterceptor` answers the
errors; rejected calls never reach the servicer.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import grpc

from featurizer.errors import ConfigError, SemrankError
from serving.api.interceptors import wrap_handler
from serving.config import DEFAULT_ADMIN_METHODS, DEFAULT_PUBLIC_METHODS, DEFAULT_WRITE_METHODS, TokenAuth

log = logging.getLogger(__name__)


class Unauthenticated(SemrankError):
    grpc_code = "UNAUTHENTICATED"
    reason = "UNAUTHENTICATED"


class PermissionDenied(SemrankError):
    """The caller is known, and not allowed this method."""

    grpc_code = "PERMISSION_DENIED"
    reason = "PERMISSION_DENIED"


class AdminRequired(PermissionDenied):
    reason = "ADMIN_REQUIRED"


class WriterRequired(PermissionDenied):
    reason = "WRITER_REQUIRED"


class AdminDisabled(PermissionDenied):
    """No admin token is configured, so admin RPCs are off."""

    reason = "ADMIN_DISABLED"


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
    """The access rules of the module docstring. `token_auth` None: no authentication (admin RPCs
    only with `open_admin`). A rejected call raises in place of the servicer's behavior, so the
    error interceptor (placed before this one) answers it like any other error."""

    def __init__(
        self,
        token_auth: TokenAuth | None,
        open_admin: bool = False,
        admin_methods: Iterable[str] = DEFAULT_ADMIN_METHODS,
        write_methods: Iterable[str] = DEFAULT_WRITE_METHODS,
        public_methods: Iterable[str] = DEFAULT_PUBLIC_METHODS,
    ):
        self.token_auth = token_auth
        self.open_admin = open_admin
        self.admin_methods = frozenset(admin_methods)
        self.write_methods = frozenset(write_methods)
        self.public_methods = frozenset(public_methods)
        for a, b, what in ((self.admin_methods, self.public_methods, "public and admin"),
                           (self.write_methods, self.public_methods, "public and write"),
                           (self.admin_methods, self.write_methods, "admin and write")):
            if overlap := a & b:
                raise ConfigError(f"methods both {what}: {sorted(overlap)}; pick one")

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None or method in self.public_methods:
            return handler
        short = method.rsplit("/", 1)[-1]
        if self.token_auth is None:
            if method in self.admin_methods and not self.open_admin:
                return _rejecting(handler, AdminDisabled(
                    f"{short} is an admin RPC and admin RPCs are off: configure a token with role admin "
                    "(--tokens-file / --tokens-env), or start the server with --open-admin on a loopback address"))
            return handler
        token, why = bearer_token(handler_call_details.invocation_metadata)
        principal = self.token_auth.authenticate(token) if token is not None else None
        if principal is None:
            why = why or f"unknown or revoked bearer token: {HOW_TO}"
            return _rejecting(handler, Unauthenticated(why))
        if method in self.admin_methods:
            if not principal.may("admin"):
                msg = f"{short} needs an admin token; token {principal.name!r} has role {principal.role!r}"
                return _rejecting(handler, AdminRequired(msg))
            log.info("admin call %s by %s", short, principal.name)
        elif method in self.write_methods and not principal.may("writer"):
            msg = f"{short} needs a writer (or admin) token; token {principal.name!r} has role {principal.role!r}"
            return _rejecting(handler, WriterRequired(msg))
        return handler


def _rejecting(handler: grpc.RpcMethodHandler, error: SemrankError) -> grpc.RpcMethodHandler:
    """A handler of the same kind (so the server reads the request as usual) that raises `error` at once."""

    async def reject(_request_or_iterator, _context: grpc.aio.ServicerContext):
        raise error

    return wrap_handler(handler, lambda _behavior: reject)
