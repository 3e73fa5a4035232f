"""Transport security (TLS / mutual TLS) and bearer-token auth for the gRPC server.

Wiring:

    auth = TokenAuth.from_file(cfg.tokens_file)            # or TokenAuth.from_spec(os.environ["SEMRANK_TOKENS"])
    server = grpc.aio.server(interceptors=[MetricsInterceptor(metrics), AuthInterceptor(auth)])
    server.add_secure_port(f"{host}:{port}", TlsConfig(cert, key, client_ca).server_credentials())

Clients send `authorization: Bearer <token>` metadata, e.g. with
`grpc.composite_channel_credentials(channel_credentials(ca), grpc.access_token_call_credentials(token))`.
Tokens are kept only as SHA-256 digests and compared with hmac.compare_digest.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc

from serving.api.handler_wrap import wrap_handler

log = logging.getLogger(__name__)

ROLES = ("client", "admin")
MIN_TOKEN_CHARS = 16  # shorter tokens load, with a warning
DEFAULT_ADMIN_METHODS = frozenset({"/semrank.ranking.v1.RankingService/ReloadBundle"})
DEFAULT_PUBLIC_METHODS = frozenset(
    {
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    }
)


# -- TLS -----------------------------------------------------------------------------------------


def _read_pem(path: str | Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"TLS {what} file not found: {p} (check the path in the serving config)")
    data = p.read_bytes()
    if b"-----BEGIN " not in data:
        raise ValueError(f"TLS {what} file {p} is not PEM (expected a '-----BEGIN ...' block)")
    return data


@dataclass(frozen=True)
class TlsConfig:
    cert_file: str | Path
    key_file: str | Path
    client_ca_file: str | Path | None = None  # set: mutual TLS, clients must present a cert signed by this CA

    def server_credentials(self) -> grpc.ServerCredentials:
        """Read the files now (fail at startup, not at the first handshake)."""
        key = _read_pem(self.key_file, "private key")
        cert = _read_pem(self.cert_file, "certificate")
        client_ca = _read_pem(self.client_ca_file, "client CA")
        return grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
        )


def channel_credentials(
    ca_file: str | Path | None, cert_file: str | Path | None = None, key_file: str | Path | None = None
) -> grpc.ChannelCredentials:
    """Client TLS credentials: trust `ca_file` (None: the system roots); cert + key for mutual TLS."""
    if (cert_file is None) != (key_file is None):
        raise ValueError("mutual TLS needs both cert_file and key_file (or neither for server-only TLS)")
    return grpc.ssl_channel_credentials(
        root_certificates=_read_pem(ca_file, "CA"),
        private_key=_read_pem(key_file, "private key"),
        certificate_chain=_read_pem(cert_file, "certificate"),
    )


# -- tokens --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Principal:
    name: str
    role: str  # "client" | "admin"


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class TokenAuth:
    """Bearer tokens -> Principal. Holds SHA-256 digests only, never the tokens."""

    def __init__(self, tokens: Iterable[tuple[str, str, str]], source: str = "tokens"):
        """`tokens`: (token, role, name) triples; `source` names where they came from, for error messages."""
        self._entries: list[tuple[bytes, Principal]] = []
        seen: set[bytes] = set()
        for i, (token, role, name) in enumerate(tokens):
            name = name or f"token[{i}]"
            if not isinstance(token, str) or not token or token != token.strip():
                raise ValueError(f"{source}: {name} has an empty token or one with surrounding spaces")
            if role not in ROLES:
                raise ValueError(f"{source}: {name} has role {role!r}; use one of {ROLES}")
            d = _digest(token)
            if d in seen:
                raise ValueError(f"{source}: {name} repeats an earlier token; each token must be unique")
            seen.add(d)
            if len(token) < MIN_TOKEN_CHARS:
                log.warning("%s: token %s is shorter than %d characters; use a long random token", source, name, MIN_TOKEN_CHARS)
            self._entries.append((d, Principal(name=name, role=role)))
        if not self._entries:
            raise ValueError(f"{source}: no tokens configured; every call would be rejected")

    @classmethod
    def from_file(cls, path: str | Path) -> TokenAuth:
        """JSON `{"tokens": [{"token": "...", "role": "client" | "admin", "name": "..."}]}`."""
        p = Path(path)
        try:
            doc = json.loads(p.read_text())
            items = doc["tokens"]
            triples = [(t["token"], t["role"], t.get("name", "")) for t in items]
        except FileNotFoundError:
            raise FileNotFoundError(f"token file not found: {p}") from None
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f'token file {p} is malformed ({type(e).__name__}: {e}); expected {{"tokens": [{{"token": "...", '
                f'"role": "client" | "admin", "name": "..."}}]}}'
            ) from None
        return cls(triples, source=str(p))

    @classmethod
    def from_spec(cls, spec: str, source: str = "token spec") -> TokenAuth:
        """`"tok1:admin,tok2:client"` (e.g. the value of $SEMRANK_TOKENS, read by the entry point)."""
        triples = []
        for i, part in enumerate(p.strip() for p in spec.split(",")):
            if not part:
                continue
            token, sep, role = part.rpartition(":")
            if not sep:
                raise ValueError(f"{source}: entry {i} has no role; write it as <token>:client or <token>:admin")
            triples.append((token, role, f"{source}[{i}]"))
        return cls(triples, source=source)

    def authenticate(self, token: str) -> Principal | None:
        d = _digest(token)
        found = None
        for digest, principal in self._entries:  # no early exit: the time does not depend on which matched
            if hmac.compare_digest(digest, d):
                found = principal
        return found

    def __repr__(self) -> str:
        return f"TokenAuth({len(self._entries)} tokens)"


# -- the interceptor -----------------------------------------------------------------------------

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

    Rejects with UNAUTHENTICATED (missing/malformed/unknown token) or PERMISSION_DENIED
    (client token on an admin method). Rejected calls never reach the servicer.
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
            raise ValueError(f"methods both public and admin: {sorted(overlap)}; pick one")

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None or method in self.public_methods:
            return handler
        token, why = bearer_token(handler_call_details.invocation_metadata)
        principal = self.token_auth.authenticate(token) if token is not None else None
        if principal is None:
            why = why or f"unknown or revoked bearer token: {HOW_TO}"
            return _rejecting(handler, grpc.StatusCode.UNAUTHENTICATED, why)
        if method in self.admin_methods:
            short = method.rsplit("/", 1)[-1]
            if principal.role != "admin":
                msg = f"{short} needs an admin token; token {principal.name!r} has role {principal.role!r}"
                return _rejecting(handler, grpc.StatusCode.PERMISSION_DENIED, msg)
            log.info("admin call %s by %s", short, principal.name)
        return handler


def _rejecting(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind (so the server reads the request as usual) that aborts at once."""

    async def abort(_request_or_iterator, context: grpc.aio.ServicerContext):
        await context.abort(code, message)

    return wrap_handler(handler, lambda _behavior: abort)
