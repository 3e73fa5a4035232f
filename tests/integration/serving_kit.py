"""Helpers for end-to-end tests of the real service: the server on its own loop, `semrank serve`
as a subprocess, /metrics scraping, process-group checks, a throwaway PKI and tokens.

Nothing here fakes a component: servers run real Triton children and real gRPC ports.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from prometheus_client.parser import text_string_to_metric_families

from serving.config import ServeConfig
from serving.server import RankingServer

PROJECT_ROOT = Path(__file__).resolve().parents[2]
TRITON_WORKER_MODULE = "serving.triton.worker"


# -- the server in-process -------------------------------------------------------------------


class ServerThread:
    """Runs RankingServer on its own event loop in a thread, so tests can use a plain blocking channel."""

    def __init__(self, cfg: ServeConfig, **server_kw):
        self.server = RankingServer(cfg, **server_kw)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.port: int | None = None
        self._stopped = False

    def run(self, coro, timeout: float = 120):
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=timeout)

    def __enter__(self):
        self.thread.start()
        try:
            self.port = self.run(self.server.start(), timeout=600)
        except BaseException:
            self._close_loop()
            raise
        return self

    def stop(self, timeout: float = 120) -> None:
        """Stop the server (drain, flush, stop Triton). Idempotent; the loop keeps running until exit."""
        if not self._stopped:
            self._stopped = True
            self.run(self.server.stop(), timeout=timeout)

    def _close_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)

    def __exit__(self, *exc):
        try:
            self.stop()
        finally:
            self._close_loop()


class SharedTriton:
    """One Triton per encoder for every replica of a test module, on one event loop in a thread:
    the replicas of one host share one Triton (as `semrank serve --workers N` does), and the
    module starts it once. `urls` gives its gRPC address, for a `semrank serve` child
    (`--worker-triton KEY=URL`)."""

    def __init__(self, deadline_s: float = 5.0):
        from serving.encoding.factories import TritonEncoderOptions, triton_encoder_factory
        from serving.encoding.pool import EncoderPool

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.tritons: dict[str, object] = {}
        self.pool = EncoderPool(triton_encoder_factory(TritonEncoderOptions(deadline_s=deadline_s),
                                                       started=self.tritons.__setitem__))

    def run(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=timeout)

    async def factory(self, ref, bundle_path, key):
        from serving.encoding.pool import EncoderHandle

        handle = await self.pool.acquire(ref, bundle_path)  # held until close(): Triton outlives each test

        async def close() -> None:
            return None

        return EncoderHandle(key=key, encoder=handle.encoder, close=close, dim=handle.dim)

    @property
    def urls(self) -> dict[str, str]:
        return {key: t.grpc_url for key, t in self.tritons.items()}

    def close(self) -> None:
        try:
            self.run(self.pool.close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)


class ReplicaSet:
    """Several RankingServers (replicas, each with its own state, store and port) on the shared
    Triton's event loop, all using that Triton. Stopped in reverse order; the Triton stays."""

    def __init__(self, cfgs: list[ServeConfig], triton: SharedTriton):
        self.triton = triton
        self.servers = [RankingServer(c, encoder_factory=triton.factory) for c in cfgs]
        self.ports: list[int] = []

    def run(self, coro, timeout: float = 120):
        return self.triton.run(coro, timeout)

    def __enter__(self) -> ReplicaSet:
        try:
            for server in self.servers:
                self.ports.append(self.run(server.start(), timeout=600))
        except BaseException:
            self.__exit__()
            raise
        return self

    def add(self, cfg: ServeConfig) -> int:
        """Start one more replica; returns its port."""
        server = RankingServer(cfg, encoder_factory=self.triton.factory)
        self.servers.append(server)
        self.ports.append(self.run(server.start(), timeout=600))
        return self.ports[-1]

    def __exit__(self, *exc) -> None:
        for server in reversed(self.servers):
            self.run(server.stop())


def wait_until(predicate: Callable[[], object], timeout_s: float, what: str, poll_s: float = 0.05):
    """Poll until predicate() is truthy and return its value; after timeout_s (a liveness bound)
    raise AssertionError naming `what`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout_s:g}s waiting for {what}"
        time.sleep(poll_s)


# -- /metrics ----------------------------------------------------------------------------------


def scrape_metrics(port: int, host: str = "127.0.0.1") -> dict[tuple[str, frozenset], float]:
    """{(sample name, frozenset of label items): value} from http://host:port/metrics."""
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric(samples: dict, name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels` (0 when there are none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


# -- processes ---------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/pid/stat after the command name: state, ppid, pgrp, ...; None if gone."""
    try:
        stat = Path("/proc", str(pid), "stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2 :].split()


def _cmdline(pid: int) -> list[str]:
    try:
        return [a.decode(errors="replace") for a in Path("/proc", str(pid), "cmdline").read_bytes().split(b"\0") if a]
    except OSError:
        return []


def _pids() -> list[int]:
    return [int(e) for e in os.listdir("/proc") if e.isdigit()]


def live_group_members(pgid: int) -> list[int]:
    """Live (non-zombie) pids of process group `pgid`."""
    out = []
    for pid in _pids():
        f = _stat_fields(pid)
        if f and f[0] != "Z" and int(f[2]) == pgid:
            out.append(pid)
    return out


def tritonservers_in_group(pgid: int) -> list[int]:
    """Live `tritonserver` processes of process group `pgid` (a Triton worker leads its own group)."""
    return [p for p in live_group_members(pgid) if any(a.endswith("tritonserver") for a in _cmdline(p)[:1])]


def triton_worker_children(parent_pid: int) -> list[int]:
    """Pids of `python -m serving.triton.worker` processes started by `parent_pid` (each leads its own group)."""
    out = []
    for pid in _pids():
        f = _stat_fields(pid)
        if f and f[0] != "Z" and int(f[1]) == parent_pid and TRITON_WORKER_MODULE in _cmdline(pid):
            out.append(pid)
    return out


def kill_group(pgid: int) -> None:
    """SIGKILL a process group this test started (never anyone else's)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# -- `semrank serve` as a subprocess -----------------------------------------------------------

SERVING_LINE = re.compile(r"semrank serving on ([\w.\-]+):(\d+)(?:, metrics on :(\d+))?")


class ServeProcess:
    """`python -m semrank.cli serve ARGS` in its own session (so its process group is ours to kill).

    stdout is read by a thread (the "semrank serving on HOST:PORT" line gives the port); stderr,
    the logs, goes to `log_path`.
    """

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.args = args
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()

    def start(self, timeout_s: float = 300) -> ServeProcess:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in wait()/kill()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "semrank.cli", "serve", *self.args],
            cwd=PROJECT_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._log,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(self.env or {})}, start_new_session=True, text=True,
        )
        threading.Thread(target=self._read_stdout, daemon=True).start()
        deadline = time.monotonic() + timeout_s
        while self.port is None:
            left = deadline - time.monotonic()
            assert left > 0, f"`semrank serve` did not report its port within {timeout_s:g}s; log:\n{self.log_tail()}"
            try:
                line = self._lines.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            if line is None:
                rc = self.proc.wait()
                raise AssertionError(f"`semrank serve` exited with {rc} before serving; log:\n{self.log_tail()}")
            if m := SERVING_LINE.search(line):
                self.port = int(m[2])
                self.metrics_port = int(m[3]) if m[3] else None
        return self

    def _read_stdout(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def kill(self) -> None:
        """SIGKILL the whole process group (the server process and anything left in its group).
        A no-op once the server has been reaped: its pid (the group id) may then belong to someone else."""
        if self.proc is not None and self.proc.returncode is None:
            kill_group(self.proc.pid)
            self.proc.wait(timeout=30)
        if self.proc is not None:
            self._log.close()

    def terminate(self, timeout_s: float = 120) -> int:
        """SIGTERM (graceful stop) and wait; returns the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout_s)
        finally:
            self._log.close()


# -- TLS and tokens ----------------------------------------------------------------------------

CLIENT_TOKEN = "client-token-0123456789abcdef"
ADMIN_TOKEN = "admin-token-0123456789abcdef"
WRITER_TOKEN = "writer-token-0123456789abcdef"
TOKEN_SPEC = f"{CLIENT_TOKEN}:client,{WRITER_TOKEN}:writer,{ADMIN_TOKEN}:admin"


@dataclass(frozen=True)
class ServerPki:
    ca: Path
    server_cert: Path
    server_key: Path


def make_server_pki(directory: Path) -> ServerPki:
    """A throwaway CA and a server certificate for localhost / 127.0.0.1, as PEM files."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def builder(subject: str, issuer: x509.Name, key) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder().subject_name(name(subject)).issuer_name(issuer).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        builder("semrank test CA", name("semrank test CA"), ca_key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        builder("localhost", ca_cert.subject, key)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    paths = ServerPki(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    paths.ca.write_bytes(ca_cert.public_bytes(pem))
    paths.server_cert.write_bytes(cert.public_bytes(pem))
    paths.server_key.write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


def copy_bundle(src: Path, dst: Path, version: str | None = None) -> Path:
    """Copy a bundle directory; with `version`, give the copy that bundle_version (same model)."""
    import json

    shutil.copytree(src, dst)
    if version is not None:
        mf = dst / "manifest.json"
        manifest = json.loads(mf.read_text())
        manifest["bundle_version"] = version
        mf.write_text(json.dumps(manifest, indent=2) + "\n")
    return dst


def bad_request_fields(err: grpc.RpcError, reason: str = "INVALID_REQUEST") -> list[str]:
    """The fields of an INVALID_ARGUMENT error's google.rpc.BadRequest detail (after its ErrorInfo,
    as serving.api.errors.to_status sends them)."""
    status = rpc_status.from_call(err)
    assert status is not None, f"no rich status in {err}"
    info, br = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
    assert len(status.details) == 2 and status.details[0].Unpack(info) and status.details[1].Unpack(br), status
    assert (info.reason, info.domain) == (reason, "semrank"), info
    return [v.field for v in br.field_violations]


def error_info(err: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    """The google.rpc.ErrorInfo detail every semrank error carries first."""
    status = rpc_status.from_call(err)
    assert status is not None, f"no rich status in {err}"
    info = error_details_pb2.ErrorInfo()
    assert status.details and status.details[0].Unpack(info), status
    assert info.domain == "semrank", info
    return info


# -- a Redis of the test's own -------------------------------------------------------------------


class OwnServer:
    """A server process of the test's own on a free loopback port, with its data in `directory`,
    which the test may stop and start again on the same port (never the machine's own server)."""

    url_format = ""  # e.g. "redis://127.0.0.1:{port}/0"

    def __init__(self, directory: Path):
        from serving.triton.process import free_port

        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return self.url_format.format(port=self.port)


class RedisProcess(OwnServer):
    """A `redis-server` of the test's own, started and killed by the test. Append-only file with
    fsync always, so a restart on the same port keeps the data."""

    url_format = "redis://127.0.0.1:{port}/0"

    def start(self) -> RedisProcess:
        import redis

        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
             "--appendfsync", "always", "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url, socket_timeout=1)

        def up() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        wait_until(up, 30, f"redis-server on port {self.port}")
        client.close()
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.proc = None


# -- a NATS of the test's own ----------------------------------------------------------------------

MACHINE_NATS = "nats://127.0.0.1:4222"  # the machine's NATS with JetStream (.ci/run starts it if it is down)


class NatsProcess(OwnServer):
    """A `nats-server -js` of the test's own with its store directory, started, stopped and
    restarted by the test. A restart keeps the streams."""

    url_format = "nats://127.0.0.1:{port}"

    def start(self) -> NatsProcess:
        import socket

        self.proc = subprocess.Popen(
            ["nats-server", "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(self.directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

        def up() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    return s.recv(4).startswith(b"INFO")
            except OSError:
                return False

        wait_until(up, 30, f"nats-server on port {self.port}")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        self.proc = None
