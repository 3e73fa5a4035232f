"""TLS, mutual TLS and bearer-token auth against a real grpc.aio server and real channels."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from semrank.ranking.v1 import ranking_service_pb2 as pb
from semrank.ranking.v1 import ranking_service_pb2_grpc as pb_grpc
from serving.api.auth import AuthInterceptor
from serving.config import TlsConfig, TokenAuth, channel_credentials
from serving.api.errors import ErrorInterceptor
from serving.api.interceptors import MetricsInterceptor
from serving.observability.metrics import Metrics
from tests.serving.api.grpc_testkit import call_code, events_stream, rank_request, serve

OK, UNAUTH, DENIED = grpc.StatusCode.OK, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED
CLIENT_TOKEN = "client-token-0123456789abcdef"
ADMIN_TOKEN = "admin-token-0123456789abcdef"


# -- a throwaway PKI ----------------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> tuple[Path, Path]:
    key_path, cert_path = path.with_suffix(".key"), path.with_suffix(".pem")
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def _issue(subject: str, issuer_key, issuer_name, *, ca: bool, server: bool = False, key=None):
    key = key or ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name or _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        b = b.add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        b = b.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return key, b.sign(issuer_key or key, hashes.SHA256())


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_client_cert: Path  # signed by a CA the server does not trust
    rogue_client_key: Path
    rogue_ca: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca_key, ca_cert = _issue("semrank test CA", None, None, ca=True)
    ca_path, _ = _write(d / "ca", ca_key, ca_cert)
    server = _write(d / "server", *_issue("localhost", ca_key, ca_cert.subject, ca=False, server=True))
    client = _write(d / "client", *_issue("ranker-client", ca_key, ca_cert.subject, ca=False))
    rogue_ca_key, rogue_ca = _issue("rogue CA", None, None, ca=True)
    rogue_ca_path, _ = _write(d / "rogue_ca", rogue_ca_key, rogue_ca)
    rogue = _write(d / "rogue", *_issue("ranker-client", rogue_ca_key, rogue_ca.subject, ca=False))
    return Pki(ca_path, *server, *client, *rogue, rogue_ca_path)


async def _health(channel: grpc.aio.Channel) -> grpc.StatusCode:
    return await call_code(health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5))


# -- TLS -----------------------------------------------------------------------------------------


def test_tls_channel_works_and_plaintext_to_tls_port_fails(pki):
    creds = TlsConfig(pki.server_cert, pki.server_key).server_credentials()

    async def run():
        async with serve(credentials=creds) as (port, _):
            async with grpc.aio.secure_channel(f"127.0.0.1:{port}", channel_credentials(pki.ca)) as ch:
                tls_ip = await _health(ch)
            async with grpc.aio.secure_channel(f"localhost:{port}", channel_credentials(pki.ca)) as ch:
                tls_name = await _health(ch)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                plain = await _health(ch)
            async with grpc.aio.secure_channel(f"127.0.0.1:{port}", channel_credentials(pki.rogue_ca)) as ch:
                untrusted_server = await _health(ch)  # the client does not trust the server's CA
            return tls_ip, tls_name, plain, untrusted_server

    assert asyncio.run(run()) == (OK, OK, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE)


def test_mutual_tls_requires_a_client_cert_from_the_configured_ca(pki):
    creds = TlsConfig(pki.server_cert, pki.server_key, client_ca_file=pki.ca).server_credentials()

    async def run():
        async with serve(credentials=creds) as (port, _):
            target = f"127.0.0.1:{port}"
            results = {}
            for case, cc in {
                "no client cert": channel_credentials(pki.ca),
                "client cert": channel_credentials(pki.ca, pki.client_cert, pki.client_key),
                "untrusted client cert": channel_credentials(pki.ca, pki.rogue_client_cert, pki.rogue_client_key),
            }.items():
                async with grpc.aio.secure_channel(target, cc) as ch:
                    results[case] = await _health(ch)
            return results

    assert asyncio.run(run()) == {
        "no client cert": grpc.StatusCode.UNAVAILABLE,
        "client cert": OK,
        "untrusted client cert": grpc.StatusCode.UNAVAILABLE,
    }


def test_tls_config_errors_say_what_to_fix(tmp_path, pki):
    with pytest.raises(FileNotFoundError, match="private key file not found"):
        TlsConfig(pki.server_cert, tmp_path / "missing.key").server_credentials()
    (tmp_path / "cert.der").write_bytes(b"\x30\x82not pem")
    with pytest.raises(ValueError, match="not PEM"):
        TlsConfig(tmp_path / "cert.der", pki.server_key).server_credentials()
    with pytest.raises(ValueError, match="both cert_file and key_file"):
        channel_credentials(pki.ca, cert_file=pki.client_cert)


# -- tokens --------------------------------------------------------------------------------------


WRITER_TOKEN = "writer-token-0123456789abcdef"


@pytest.fixture
def auth() -> TokenAuth:
    return TokenAuth.from_spec(f"{CLIENT_TOKEN}:client,{WRITER_TOKEN}:writer,{ADMIN_TOKEN}:admin")


def _md(token: str | None, scheme: str = "Bearer"):
    return () if token is None else (("authorization", f"{scheme} {token}"),)


def _sync_client_stream(port: int, metadata) -> grpc.RpcError | None:
    """LogEvents from grpc's sync client. The asyncio client has a known bug here (grpc/grpc#36066,
    fix pending in grpc/grpc#43486): when the server answers a client stream before the client has
    written all of it, as a rejection does, a write that then fails overwrites the server's status
    with INTERNAL. The sync client (and the Node and Go ones) report the server's status."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        try:
            pb_grpc.RankingServiceStub(ch).LogEvents(iter(list(events_stream(3))), metadata=metadata, timeout=30)
        except grpc.RpcError as e:
            return e
    return None


async def _call(ch: grpc.aio.Channel, method: str, metadata, port: int) -> grpc.aio.AioRpcError | None:
    stub = pb_grpc.RankingServiceStub(ch)
    if method == "client_stream":
        return await asyncio.to_thread(_sync_client_stream, port, metadata)
    calls = {
        "health": lambda: health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), metadata=metadata),
        "unary": lambda: stub.Rank(rank_request(), metadata=metadata),
        "admin": lambda: stub.ReloadBundle(pb.ReloadBundleRequest(), metadata=metadata),
    }
    try:
        await calls[method]()
    except grpc.aio.AioRpcError as e:
        return e
    return None


def test_token_matrix_over_public_unary_streaming_and_admin_methods(auth):
    tokens = {
        "none": _md(None),
        "wrong": _md("not-a-real-token-0123456789"),
        "basic scheme": _md(CLIENT_TOKEN, scheme="Basic"),
        "client": _md(CLIENT_TOKEN),
        "writer": _md(WRITER_TOKEN),
        "admin": _md(ADMIN_TOKEN),
        "admin, lower-case scheme": _md(ADMIN_TOKEN, scheme="bearer"),
    }
    methods = ("health", "unary", "client_stream", "admin")  # Rank, LogEvents (a write), ReloadBundle

    async def run():
        async with serve([ErrorInterceptor(), AuthInterceptor(auth)]) as (port, _):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                errors = {(t, m): await _call(ch, m, md, port) for t, md in tokens.items() for m in methods}
        return errors

    errors = asyncio.run(run())
    got = {k: OK if e is None else e.code() for k, e in errors.items()}
    want = {}
    for t in tokens:
        for m in methods:
            if m == "health":
                want[t, m] = OK
            elif t in ("none", "wrong", "basic scheme"):
                want[t, m] = UNAUTH
            elif (m == "admin" and t in ("client", "writer")) or (m == "client_stream" and t == "client"):
                want[t, m] = DENIED
            else:
                want[t, m] = OK
    assert got == want
    for (t, m), e in errors.items():
        if e is not None:  # every rejection says how to fix it and never echoes a token
            assert CLIENT_TOKEN not in e.details() and "not-a-real-token" not in e.details()
            assert any(hint in e.details() for hint in ("authorization: Bearer <token>", "needs an admin token",
                                                        "needs a writer (or admin) token"))
    assert "missing credentials" in errors["none", "unary"].details()
    assert "malformed" in errors["basic scheme", "client_stream"].details()
    assert "ReloadBundle needs an admin token" in errors["writer", "admin"].details()
    assert "LogEvents needs a writer (or admin) token" in errors["client", "client_stream"].details()


def _reason(e: grpc.aio.AioRpcError) -> str:
    info = error_details_pb2.ErrorInfo()
    assert rpc_status.from_call(e).details[0].Unpack(info)
    return info.reason


@pytest.mark.parametrize("open_admin", [False, True])
def test_without_tokens_writes_are_open_and_admin_only_with_open_admin(open_admin):
    async def run():
        async with serve([ErrorInterceptor(), AuthInterceptor(None, open_admin=open_admin)]) as (port, servicer):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                errors = {m: await _call(ch, m, (), port) for m in ("health", "unary", "client_stream", "admin")}
            return errors, servicer.entered

    errors, entered = asyncio.run(run())
    assert errors["health"] is None and errors["unary"] is None and errors["client_stream"] is None
    assert entered == 1  # Rank reached the servicer
    if open_admin:
        assert errors["admin"] is None
    else:
        e = errors["admin"]
        assert e.code() == DENIED and _reason(e) == "ADMIN_DISABLED"
        assert "admin RPCs are off" in e.details() and "--open-admin" in e.details()


def test_rejected_calls_never_reach_the_servicer_and_are_counted_by_metrics(auth):
    m = Metrics()

    async def run():
        async with serve([MetricsInterceptor(m), ErrorInterceptor(), AuthInterceptor(auth)]) as (port, servicer):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                await _call(ch, "unary", _md(None), port)
                await _call(ch, "client_stream", _md("wrong-token"), port)
                await _call(ch, "admin", _md(CLIENT_TOKEN), port)
                assert await _call(ch, "unary", _md(CLIENT_TOKEN), port) is None
            return servicer.entered

    assert asyncio.run(run()) == 1
    assert m.registry.get_sample_value("semrank_rejected_total", {"reason": "unauthenticated"}) == 2
    assert m.registry.get_sample_value("semrank_rejected_total", {"reason": "permission_denied"}) == 1
    count = "semrank_rpc_latency_seconds_count"
    labels = {"method": "LogEvents", "variant": "none", "code": "UNAUTHENTICATED"}
    assert m.registry.get_sample_value(count, labels) == 1


def test_standard_access_token_credentials_over_tls(pki, auth):
    """What a real client does: TLS channel + grpc.access_token_call_credentials (sends 'Bearer <token>')."""
    server_creds = TlsConfig(pki.server_cert, pki.server_key).server_credentials()

    async def run():
        async with serve([ErrorInterceptor(), AuthInterceptor(auth)], credentials=server_creds) as (port, _):
            results = []
            for token in (ADMIN_TOKEN, CLIENT_TOKEN):
                creds = grpc.composite_channel_credentials(
                    channel_credentials(pki.ca), grpc.access_token_call_credentials(token)
                )
                async with grpc.aio.secure_channel(f"localhost:{port}", creds) as ch:
                    e = await _call(ch, "admin", (), port)
                    results.append(OK if e is None else e.code())
            return results

    assert asyncio.run(run()) == [OK, DENIED]


def test_token_sources_keep_only_digests(tmp_path, caplog):
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"tokens": [{"token": ADMIN_TOKEN, "role": "admin", "name": "ops"}, {"token": "short", "role": "client"}]}))
    with caplog.at_level(logging.WARNING, logger="serving.api.auth"):
        auth = TokenAuth.from_file(path)
    assert "shorter than" in caplog.text and "short" not in caplog.text.replace("shorter", "")
    assert auth.authenticate(ADMIN_TOKEN).name == "ops"
    assert auth.authenticate("short").role == "client"
    assert auth.authenticate("nope") is None
    assert ADMIN_TOKEN not in repr(auth) and ADMIN_TOKEN not in repr(vars(auth))
    colon = TokenAuth.from_spec(" a:b:c-0123456789abcdef:admin , ")  # a token may contain ':'
    assert colon.authenticate("a:b:c-0123456789abcdef").role == "admin"


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("tok-0123456789abcdef", "no role"),
        ("tok-0123456789abcdef:root", "role 'root'"),
        ("tok-0123456789abcdef:admin,tok-0123456789abcdef:client", "repeats"),
        ("", "no tokens"),
        (":admin", "empty token"),
    ],
)
def test_bad_token_specs_fail_at_load(spec, match):
    with pytest.raises(ValueError, match=match) as info:
        TokenAuth.from_spec(spec, source="$SEMRANK_TOKENS")
    assert "$SEMRANK_TOKENS" in str(info.value) and "0123456789abcdef" not in str(info.value)


def test_bad_token_file_fails_at_load(tmp_path):
    with pytest.raises(FileNotFoundError, match="token file not found"):
        TokenAuth.from_file(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"tokens": [{"role": "admin"}]}))
    with pytest.raises(ValueError, match='expected {"tokens"'):
        TokenAuth.from_file(bad)


def test_method_sets_must_not_overlap(auth):
    with pytest.raises(ValueError, match="both public and admin"):
        AuthInterceptor(auth, admin_methods={"/grpc.health.v1.Health/Check"})
    with pytest.raises(ValueError, match="both admin and write"):
        AuthInterceptor(auth, write_methods={"/semrank.ranking.v1.RankingService/ReloadBundle"})


def test_roles_are_ordered():
    from serving.config import Principal

    assert Principal("w", "writer").may("client") and Principal("w", "writer").may("writer")
    assert not Principal("w", "writer").may("admin") and not Principal("c", "client").may("writer")
    assert Principal("a", "admin").may("writer")
