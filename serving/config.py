"""The serving process's configuration, loaded once at start-up and passed down explicitly.

- `ServeConfig`: everything `semrank serve` is told (paths, ports, store, timeouts, limits);
- `Limits`: the explicit, configurable request limits (validated in `serving.api.validation`);
- `TlsConfig` / `channel_credentials`: TLS and mutual TLS, server and client side;
- `TokenAuth`: bearer tokens -> `Principal` (role client or admin), kept as SHA-256 digests only
  and compared with hmac.compare_digest; `serving.api.auth.AuthInterceptor` enforces them.

Files are read when the config is built, so a bad path fails at start-up, not at the first call.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path

import grpc

from featurizer.contracts.event_rules import EventRules, ItemRules
from featurizer.errors import ConfigError
from featurizer.privacy import Pseudonyms
from featurizer.store.config import StoreConfig
from serving.retention import RetentionConfig
from serving.triton.client import ExternalTriton

log = logging.getLogger(__name__)

# Roles, each allowed what the ones before it are: client (Rank, GetModelInfo), writer (+ LogEvents,
# UpsertItems), admin (+ ReloadBundle, DeleteUser).
ROLES = ("client", "writer", "admin")
MIN_TOKEN_CHARS = 16  # shorter tokens load, with a warning
DEFAULT_ADMIN_METHODS = frozenset({"/semrank.ranking.v1.RankingService/ReloadBundle",
                                   "/semrank.ranking.v1.RankingService/DeleteUser"})
DEFAULT_WRITE_METHODS = frozenset({
    "/semrank.ranking.v1.RankingService/LogEvents",
    "/semrank.ranking.v1.RankingService/UpsertItems",
})
DEFAULT_PUBLIC_METHODS = frozenset(
    {
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    }
)


@dataclass(frozen=True)
class Budgets:
    """Calls in flight, by class (`serving.api.interceptors.AdmissionInterceptor`): no class can take
    the others' room. Beyond its budget a call gets RESOURCE_EXHAUSTED at once; budgets at their
    limit show in `semrank_admission_refused_total{budget}`, never in readiness (or anyone who can
    fill one could take the fleet out of rotation)."""

    ranks: int = 128  # Rank, GetModelInfo (`ServeConfig.max_concurrent_rpcs` sets it)
    # of those, per bearer token where tokens are configured (None: three quarters of `ranks`); without
    # tokens there is no per-caller share of Ranks, since one backend often sends every Rank from one address
    ranks_per_caller: int | None = None
    writes: int = 32  # LogEvents, UpsertItems
    writes_per_caller: int = 8  # of those, per bearer token (or per client address without tokens)
    admin: int = 4  # ReloadBundle and the other admin calls
    watches: int = 64  # Health/Watch and reflection streams (idle by design), in total
    watches_per_caller: int = 4  # of those, per client address
    health_checks: int = 16  # Health/Check: a room of its own that no other call can fill
    stream_idle_s: float = 30.0  # a client stream (LogEvents, UpsertItems) waits at most this for its next message

    def __post_init__(self) -> None:
        small = {k: v for k, v in self.__dict__.items() if v is not None and v < 1 and k != "stream_idle_s"}
        if small or self.stream_idle_s <= 0:
            raise ConfigError(f"admission budgets must be >= 1 and stream_idle_s > 0, got {small or self}")

    @property
    def total(self) -> int:
        return self.ranks + self.writes + self.admin + self.watches + self.health_checks

    @property
    def rank_share(self) -> int:
        """Ranks in flight one token may hold."""
        return self.ranks_per_caller if self.ranks_per_caller is not None else max(1, self.ranks * 3 // 4)

    @classmethod
    def parse(cls, specs: list[str]) -> Budgets:
        """Budgets from `NAME=VALUE` settings (`semrank serve --budget writes=64`); the rest keep their
        defaults. An unknown name or a bad value is a ConfigError naming it."""
        names = {f.name: f.type for f in fields(cls)}
        values: dict[str, float | int] = {}
        for spec in specs:
            name, sep, raw = spec.partition("=")
            name = name.strip().replace("-", "_")
            if not sep or name not in names or name == "ranks":
                allowed = ", ".join(n for n in names if n != "ranks")
                raise ConfigError(f"--budget {spec!r}: expected NAME=VALUE with NAME one of {allowed} "
                                  "(Ranks in flight: --max-concurrent-rpcs)")
            try:
                values[name] = float(raw) if name == "stream_idle_s" else int(raw)
            except ValueError:
                raise ConfigError(f"--budget {spec!r}: {raw!r} is not a number") from None
        return cls(**values)


@dataclass(frozen=True)
class Limits:
    """Explicit, configurable request limits."""

    max_candidates: int = 2000
    max_item_id_chars: int = 256
    max_user_id_chars: int = 256
    max_text_chars: int = 4096  # per inline title/description/category/brand field
    max_inline_encodes: int = 64  # item texts one Rank may send to the encoder; the rest rank without text
    max_top_k: int = 2000
    max_event_clock_skew_s: float = 300.0  # events stamped further in the future are rejected
    dedup_window_s: float = 86_400.0  # events with an event_id stored within this much event time are not stored again; 0: off
    max_rejections_listed: int = 100  # per LogEvents/UpsertItems response; the counts cover all
    max_message_bytes: int = 4 * 1024 * 1024  # per gRPC message, both directions
    store_read_timeout_s: float = 0.25  # a read of a remote online store (Redis) waits at most this; then: degraded
    max_store_waiting: int = 256  # calls queued for a remote online store at most; more: degraded at once
    max_sequence_wait_s: float = 1.0  # a Rank's min_sequence waits at most this (and half its deadline); then: degraded
    apply_slice_ms: float = 4.0  # events fold into the features in commits of about this long; Ranks run between them
    # While Ranks are served, folding events takes at most this share of a process's loop (1: no bound):
    # a write flood past the process's capacity then queues and refuses writes (RESOURCE_EXHAUSTED)
    # instead of Ranks. At 3,000 events/s on the embedded default, 0.3 kept every Rank (p50 4 ms)
    # where 1 lost 858 to their deadline (p50 1.1 s); docs/scaling.md "A share of the loop for writes".
    write_share: float = 0.3
    max_erase_users: int = 1000  # user ids per DeleteUser
    max_requested_by_chars: int = 256  # DeleteUser's requested_by (recorded with the erasure)

    def __post_init__(self):
        if not self.apply_slice_ms > 0:
            raise ConfigError(f"apply_slice_ms must be > 0, got {self.apply_slice_ms}")
        if not 0 < self.write_share <= 1:
            raise ConfigError(f"write_share must be in (0, 1], got {self.write_share}")

    @property
    def item_rules(self) -> ItemRules:
        """The item rules of these limits, shared by UpsertItems and the JetStream fold."""
        return ItemRules(self.max_item_id_chars, self.max_text_chars)

    @property
    def event_rules(self) -> EventRules:
        """The event rules of these limits, shared by LogEvents and the JetStream fold."""
        return EventRules(self.max_user_id_chars, self.max_item_id_chars, self.max_event_clock_skew_s)


def _read_pem(path: str | Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"TLS {what} file not found: {p} (check the path in the serving config)")
    data = p.read_bytes()
    if b"-----BEGIN " not in data:
        raise ConfigError(f"TLS {what} file {p} is not PEM (expected a '-----BEGIN ...' block)")
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
        raise ConfigError("mutual TLS needs both cert_file and key_file (or neither for server-only TLS)")
    return grpc.ssl_channel_credentials(
        root_certificates=_read_pem(ca_file, "CA"),
        private_key=_read_pem(key_file, "private key"),
        certificate_chain=_read_pem(cert_file, "certificate"),
    )


@dataclass(frozen=True)
class Principal:
    name: str
    role: str  # one of ROLES

    def may(self, role: str) -> bool:
        """True when this principal has `role` or a higher one (ROLES order)."""
        return ROLES.index(self.role) >= ROLES.index(role)


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
                raise ConfigError(f"{source}: {name} has an empty token or one with surrounding spaces")
            if role not in ROLES:
                raise ConfigError(f"{source}: {name} has role {role!r}; use one of {ROLES}")
            d = _digest(token)
            if d in seen:
                raise ConfigError(f"{source}: {name} repeats an earlier token; each token must be unique")
            seen.add(d)
            if len(token) < MIN_TOKEN_CHARS:
                log.warning("%s: token %s is shorter than %d characters; use a long random token", source, name, MIN_TOKEN_CHARS)
            self._entries.append((d, Principal(name=name, role=role)))
        if not self._entries:
            raise ConfigError(f"{source}: no tokens configured; every call would be rejected")

    @classmethod
    def from_file(cls, path: str | Path) -> TokenAuth:
        """JSON `{"tokens": [{"token": "...", "role": "client" | "writer" | "admin", "name": "..."}]}`."""
        p = Path(path)
        try:
            doc = json.loads(p.read_text())
            items = doc["tokens"]
            triples = [(t["token"], t["role"], t.get("name", "")) for t in items]
        except FileNotFoundError:
            raise FileNotFoundError(f"token file not found: {p}") from None
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(
                f'token file {p} is malformed ({type(e).__name__}: {e}); expected {{"tokens": [{{"token": "...", '
                f'"role": "client" | "writer" | "admin", "name": "..."}}]}}'
            ) from None
        return cls(triples, source=str(p))

    @classmethod
    def from_spec(cls, spec: str, source: str = "token spec") -> TokenAuth:
        """`"tok1:admin,tok2:writer,tok3:client"` (e.g. the value of $SEMRANK_TOKENS, read by the entry point)."""
        triples = []
        for i, part in enumerate(p.strip() for p in spec.split(",")):
            if not part:
                continue
            token, sep, role = part.rpartition(":")
            if not sep:
                raise ConfigError(f"{source}: entry {i} has no role; write it as <token>:client, <token>:writer or <token>:admin")
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


@dataclass(frozen=True)
class JetStreamConfig:
    """Events on a NATS JetStream stream instead of the local event log (docs/scaling.md)."""

    url: str = "nats://127.0.0.1:4222"  # one or more, comma-separated (a cluster's seeds)
    stream: str = "SEMRANK_EVENTS"
    subject_prefix: str = "semrank.events"  # events go to <prefix>.u.<user key> (docs/scaling.md)
    replicas: int = 1  # stream replicas in a NATS cluster (1, 3 or 5)
    max_age_s: float = 0.0  # retention by age; 0: keep everything (a rebuild needs the stream back to the oldest snapshot)
    max_bytes: int = -1  # retention by size; -1: no limit
    publish_timeout_s: float = 2.0  # per LogEvents batch: JetStream's acknowledgements within this
    apply_timeout_s: float = 5.0  # a LogEvents waits this long for its events to be folded, then EVENTS_STORED_NOT_APPLIED
    connect_timeout_s: float = 2.0
    share_snapshot_s: float = 300.0  # share the in-process feature snapshot this often (object store); 0: never
    control_poll_s: float = 1.0  # how often a replica checks the fleet's bundle (serving.ranking.shared_bundle)
    probe_timeout_s: float = 1.0  # readiness: JetStream must answer a request within this (a hung server keeps its socket)
    # ... in this many consecutive probes: one late answer while the CPU is full (the reply waits in the
    # event loop's queue behind Ranks) is not a hung NATS, and must not take a loaded fleet out of rotation
    probe_misses: int = 3
    # the client's own keep-alive: a connection that answers none of `max_outstanding_pings` pings sent every
    # `ping_interval_s` is dropped and dialled again (nats-py's default, 2 x 120 s, left a dead one for minutes)
    ping_interval_s: float = 10.0
    max_outstanding_pings: int = 3

    @property
    def servers(self) -> list[str]:
        """The NATS URLs of `url`."""
        return [u.strip() for u in self.url.split(",") if u.strip()]

    def __post_init__(self):
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", self.stream):
            raise ConfigError(f"stream {self.stream!r}: use 1-64 letters, digits, '_' or '-'")
        if not re.fullmatch(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*", self.subject_prefix):
            raise ConfigError(f"subject_prefix {self.subject_prefix!r}: dot-separated tokens of letters, digits, '_' or '-'")
        if self.replicas not in (1, 2, 3, 4, 5):
            raise ConfigError(f"replicas={self.replicas}: JetStream allows 1 to 5")
        for name in ("publish_timeout_s", "apply_timeout_s", "connect_timeout_s", "control_poll_s", "probe_timeout_s",
                     "ping_interval_s", "max_outstanding_pings", "probe_misses"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be > 0")
        if self.share_snapshot_s < 0:
            raise ConfigError(f"share_snapshot_s={self.share_snapshot_s} must be >= 0 (0: never)")
        if self.max_age_s < 0:
            raise ConfigError(f"max_age_s={self.max_age_s} must be >= 0 (0: no age limit)")


@dataclass(frozen=True)
class ServeConfig:
    bundle_dir: Path  # watched: replace its files (or repoint a symlink) to hot-reload
    data_dir: Path  # items + events the online state starts from
    state_dir: Path | None = None  # event log, exposures, embeddings, feature snapshot; None: a temp dir
    host: str = "127.0.0.1"
    port: int = 50051  # 0 picks a free port
    experiments_file: Path | None = None
    store: StoreConfig | None = None  # None: in-process, snapshotted to state_dir/online-store.bin
    events: JetStreamConfig | None = None  # None: the local event log in state_dir/events (one process)
    embeddings_dir: Path | None = None  # item embeddings; None: state_dir/embeddings (workers of one host share one)
    triton_urls: tuple[tuple[str, str], ...] = ()  # (encoder key, gRPC url) of Tritons started for this process (workers)
    triton: ExternalTriton | None = None  # a Triton somebody else runs (GPU); None: start one per encoder
    share_port: bool = False  # bind with SO_REUSEPORT (the workers of one supervisor); else a port in use is an error
    null_service_top_k: int = 0  # > 0: the bench's null service (Rank answers a reply of this many items built in advance)
    metrics_port: int | None = None  # None: no /metrics endpoint; 0: a free port
    metrics_host: str = "127.0.0.1"
    tls: TlsConfig | None = None
    tokens: TokenAuth | None = None  # None: no authentication; admin RPCs off unless open_admin
    open_admin: bool = False  # admin RPCs without a token: only with a loopback host (checked at start)
    # Pseudonymous user ids (featurizer.privacy): callers' user ids are stored, logged and assigned A/B
    # variants by their keyed hash; off (ids as given) without a key
    pseudonyms: Pseudonyms = field(default_factory=Pseudonyms)
    bundle_roots: tuple[Path, ...] = ()  # ReloadBundle paths must lie under one; (): bundle_dir's parent
    reload_poll_s: float = 2.0  # 0: no watcher (ReloadBundle still works)
    max_concurrent_rpcs: int = 128  # Ranks in flight; beyond it: RESOURCE_EXHAUSTED (Budgets.ranks)
    budgets: Budgets = field(default_factory=Budgets)  # the other classes of calls (writes, watches, ...)
    snapshot_interval_s: float = 30.0  # in-process features: persist a changed state this often; 0: never
    retention: RetentionConfig = field(default_factory=RetentionConfig)  # the event and exposure logs' maximum ages
    # Items of each user's sequence a new feature state keeps for sequence models (FeatureParams). 0, the
    # default: none, and no bundle with a sequence model can be served on it; the fold then saves the
    # sequence's cost (+11-14% per engagement, docs/serving.md). A stored state keeps the value it was made with.
    sequence_items: int = 0
    readiness_interval_s: float = 1.0  # how often the readiness health status checks the dependencies
    encoder_timeout_s: float = 0.25  # Triton deadline on the request path
    encoder_retries: int = 1
    breaker_failures: int = 5
    breaker_open_s: float = 2.0
    breaker_min_timeout_s: float = 0.05  # a timeout counts as Triton's failure only when the call had this budget
    triton_max_queue_delay_us: int = 2000
    triton_supervise_s: float = 2.0  # restart a dead or unresponsive Triton; 0: never (tests of outages)
    grace_s: float = 5.0
    limits: Limits = field(default_factory=Limits)
    # The collector's thresholds while serving (gc.set_threshold; Python's default is 700, 10, 10). The
    # decoded feature states and the fold's handed-over copies survive into the oldest generation, and
    # under bench/serve.py's write flood a full collection (66-83 ms) ran every 2 s at the default; a
    # tenth as often here. The young generations keep Python's sizes: 7000 objects made a gen-0 pass
    # take up to 14 ms and a gen-1 pass 45 ms (docs/scaling.md, "The write flood, again").
    gc_thresholds: tuple[int, int, int] = (700, 10, 100)

    def __post_init__(self) -> None:
        for name in ("port", "metrics_port"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 65535:
                raise ConfigError(f"{name}={value}: a TCP port is 0 to 65535 (0: a free one)")
        if len(self.gc_thresholds) != 3 or min(self.gc_thresholds) < 1:
            raise ConfigError(f"gc_thresholds={self.gc_thresholds}: three collector thresholds, each >= 1")
        if self.max_concurrent_rpcs < 1:
            raise ConfigError(f"max_concurrent_rpcs={self.max_concurrent_rpcs} must be >= 1")
        if self.snapshot_interval_s < 0:
            raise ConfigError(f"snapshot_interval_s={self.snapshot_interval_s} must be >= 0 (0: never)")
        self.retention.check(self.limits.dedup_window_s)
        if self.sequence_items < 0:
            raise ConfigError(f"sequence_items={self.sequence_items} must be >= 0 (0: no sequences kept)")
        if self.experiments_file is not None and not Path(self.experiments_file).is_file():
            raise ConfigError(f"experiments file {self.experiments_file} not found (--experiments)")
