"""`semrank serve`: the gRPC service with its Triton encoder, until SIGINT / SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from pathlib import Path

from featurizer.errors import ConfigError
from semrank.cli.common import add_triton_args, data_dir, external_triton

log = logging.getLogger("semrank")

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
DEFAULT_STREAM = "SEMRANK_EVENTS"


def cmd_serve(args) -> int:
    from featurizer.store.config import RedisConfig
    from featurizer.privacy import Pseudonyms
    from serving.config import Budgets, JetStreamConfig, Limits, ServeConfig, TlsConfig, TokenAuth
    from serving.observability.request_logging import configure_logging
    from serving.server import RankingServer
    from serving.retention import DAY_S, RetentionConfig

    for h in list(logging.getLogger().handlers):  # replace main()'s plain handler
        logging.getLogger().removeHandler(h)
    configure_logging(args.log_level, json=args.log_json)
    data = data_dir(args)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    tokens = None
    if args.tokens_file:
        tokens = TokenAuth.from_file(args.tokens_file)
    elif args.tokens_env:
        spec = os.environ.get(args.tokens_env)
        if not spec:
            raise ConfigError(f"--tokens-env {args.tokens_env}: the variable is not set")
        tokens = TokenAuth.from_spec(spec, source=f"${args.tokens_env}")
    store = RedisConfig(url=args.redis_url) if args.redis_url else None
    events = None
    if args.events == "jetstream":
        events = JetStreamConfig(url=args.nats_url, stream=args.stream, subject_prefix=args.subject_prefix,
                                 replicas=args.stream_replicas, max_age_s=args.stream_max_age_h * 3600,
                                 **({} if args.share_snapshot_s is None else {"share_snapshot_s": args.share_snapshot_s}))
    elif args.nats_url != DEFAULT_NATS_URL or args.stream != DEFAULT_STREAM or args.share_snapshot_s is not None:
        raise ConfigError("--nats-url, --stream and --share-snapshot-s need --events jetstream")
    cfg = ServeConfig(
        bundle_dir=Path(args.bundle),
        data_dir=Path(data),
        state_dir=args.state_dir,
        host=args.host,
        port=args.port,
        experiments_file=args.experiments,
        store=store,
        events=events,
        metrics_port=args.metrics_port,
        tls=TlsConfig(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None,
        tokens=tokens,
        pseudonyms=Pseudonyms.load(args.pseudonym_key_file),
        open_admin=args.open_admin,
        bundle_roots=tuple(args.bundle_root),
        reload_poll_s=args.reload_poll_s,
        snapshot_interval_s=args.snapshot_interval_s,
        sequence_items=args.sequence_items,
        retention=RetentionConfig(events_s=args.retain_events_days * DAY_S, exposures_s=args.retain_exposures_days * DAY_S),
        max_concurrent_rpcs=args.max_concurrent_rpcs,
        budgets=Budgets.parse(args.budget),
        encoder_timeout_s=args.encoder_timeout_ms / 1000,
        metrics_host=args.metrics_host,
        embeddings_dir=args.embeddings_dir,
        triton_urls=tuple(_key_url(spec) for spec in args.worker_triton),
        triton=external_triton(args),
        share_port=args.worker_of is not None,  # the workers of one supervisor share its port; nobody else
        null_service_top_k=args.null_service,
        **({"gc_thresholds": args.gc_thresholds} if args.gc_thresholds is not None else {}),
        limits=Limits(max_candidates=args.max_candidates, max_text_chars=args.max_text_chars,
                      max_message_bytes=args.max_message_bytes,
                      **({"apply_slice_ms": args.apply_slice_ms} if args.apply_slice_ms is not None else {}),
                      **({"write_share": args.write_share} if args.write_share is not None else {})),
    )
    if args.workers < 1:
        raise ConfigError(f"--workers {args.workers}: must be >= 1")
    if args.workers > 1:
        return _run_supervisor(cfg, args)
    if args.worker_of:
        from serving.workers import pin_worker, watch_supervisor

        if args.pin_workers:  # before any thread starts: threads take their creator's CPUs
            pin_worker(int(os.environ.get("SEMRANK_WORKER", "0")))
        watch_supervisor(args.worker_of)

    async def run() -> None:
        server = RankingServer(cfg)
        await server.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        print(f"semrank serving on {cfg.host}:{server.port}" + (f", metrics on :{server.metrics_port}" if server.metrics_port else ""), flush=True)
        await stop.wait()
        log.info("shutting down: draining calls, flushing logs, stopping Triton")
        await server.stop()

    asyncio.run(run())
    return 0


def _gc_thresholds(spec: str) -> tuple[int, int, int]:
    parts = spec.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() and int(p) >= 1 for p in parts):
        raise argparse.ArgumentTypeError(f"{spec!r}: expected three integers >= 1, as 700,10,100")
    return tuple(int(p) for p in parts)


def _key_url(spec: str) -> tuple[str, str]:
    key, sep, url = spec.partition("=")
    if not sep or not key or not url:
        raise ConfigError(f"--worker-triton {spec!r}: expected ENCODER_KEY=HOST:PORT")
    return key, url


def _child_args(argv: list[str]) -> list[str]:
    """`semrank serve`'s own arguments without --workers (the supervisor sets the rest per worker)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--workers":
            skip = True
            continue
        if a.startswith("--workers="):
            continue
        out.append(a)
    return out


def _run_supervisor(cfg, args) -> int:
    from serving.workers import WorkerSupervisor

    raw = getattr(args, "raw_argv", [])
    argv = raw[raw.index("serve") + 1:] if "serve" in raw else []
    supervisor = WorkerSupervisor(cfg, args.workers, _child_args(argv))

    async def run() -> None:
        port = await supervisor.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        metrics = f", metrics on :{supervisor.metrics_port}" if supervisor.metrics_port else ""
        print(f"semrank serving on {cfg.host}:{port}{metrics} ({args.workers} workers)", flush=True)
        await stop.wait()
        log.info("shutting down: stopping the workers, then Triton")
        await supervisor.stop()

    asyncio.run(run())
    return 0


def register(sub) -> None:
    s = sub.add_parser("serve", help="serve RankingService over gRPC with a Triton encoder")
    s.add_argument("--bundle", required=True, type=Path, help="bundle directory (watched: hot-reloads when its files change)")
    s.add_argument("--data", type=Path, default=None, help="items/events the online state starts from (default: the bundle's training data)")
    s.add_argument("--state-dir", type=Path, default=Path("semrank-state"),
                   help="event log, exposure log, item embeddings, feature snapshot (default: ./semrank-state)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=50051)
    s.add_argument("--experiments", type=Path, default=None, help="A/B experiments file (TOML or JSON)")
    s.add_argument("--redis-url", default=None, help="keep the online features in Redis (default: in-process, snapshotted)")
    s.add_argument("--events", choices=("local", "jetstream"), default="local",
                   help="where LogEvents stores events: the local event log in --state-dir (one process), or a NATS "
                        "JetStream stream that every replica folds (docs/scaling.md)")
    s.add_argument("--nats-url", default=DEFAULT_NATS_URL, help="NATS server(s), comma-separated (with --events jetstream)")
    s.add_argument("--stream", default=DEFAULT_STREAM, help="JetStream stream name (created if missing)")
    s.add_argument("--subject-prefix", default="semrank.events", help="events go to <prefix>.u.<user key>")
    s.add_argument("--share-snapshot-s", type=float, default=None,
                   help="with --events jetstream: share the feature snapshot (JetStream object store) when the "
                        "shared one is this old (default: JetStreamConfig's, 300), so a fresh replica folds only "
                        "what follows it; 0: never")
    s.add_argument("--stream-replicas", type=int, default=1, help="stream replicas in a NATS cluster (1-5)")
    s.add_argument("--stream-max-age-h", type=float, default=0.0,
                   help="stream retention in hours; 0: keep everything (a rebuild needs the stream back to the oldest snapshot)")
    s.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port (0: a free one)")
    s.add_argument("--metrics-host", default="127.0.0.1")
    s.add_argument("--workers", type=int, default=1,
                   help="serving processes on this host, on one port (SO_REUSEPORT), sharing one Triton; "
                        "> 1 needs --events jetstream (docs/scaling.md)")
    s.add_argument("--embeddings-dir", type=Path, default=None, help=argparse.SUPPRESS)  # a worker: the shared embeddings
    s.add_argument("--worker-triton", action="append", default=[], help=argparse.SUPPRESS)  # a worker: KEY=URL
    s.add_argument("--worker-of", type=int, default=None, help=argparse.SUPPRESS)  # a worker: the supervisor's pid
    s.add_argument("--pin-workers", action="store_true",
                   help="with --workers: pin worker i to CPU i (mod the CPUs this process may use); off by default, "
                        "docs/scaling.md has what it did to the tail")
    s.add_argument("--null-service", type=int, default=0, metavar="TOP_K",
                   help="bench only: Rank answers a reply of TOP_K items built in advance, doing no work (the floor "
                        "a gRPC service pays; bench/serve.py runs it beside the real one); the rest is as configured")
    s.add_argument("--tls-cert", type=Path, default=None)
    s.add_argument("--tls-key", type=Path, default=None)
    s.add_argument("--tls-client-ca", type=Path, default=None, help="require client certificates signed by this CA (mutual TLS)")
    s.add_argument("--pseudonym-key-file", type=Path, default=None,
                   help="the key of pseudonymous user ids (at least 32 bytes; default: $SEMRANK_PSEUDONYM_KEY, else "
                        "off): callers' user ids are stored, logged and assigned A/B variants by their keyed hash "
                        "(docs/privacy.md)")
    s.add_argument("--tokens-file", type=Path, default=None, help='bearer tokens: {"tokens": [{"token", "role": client|writer|admin, "name"}]}')
    s.add_argument("--tokens-env", default=None, help="name of an environment variable holding tok:role,tok:role")
    s.add_argument("--open-admin", action="store_true",
                   help="without tokens, allow admin RPCs (ReloadBundle) from any caller; loopback hosts only")
    s.add_argument("--bundle-root", type=Path, action="append", default=[],
                   help="ReloadBundle may load bundles under this directory (repeatable; default: the bundle's parent)")
    s.add_argument("--reload-poll-s", type=float, default=2.0, help="bundle watcher period; 0 turns it off")
    s.add_argument("--snapshot-interval-s", type=float, default=30.0,
                   help="in-process features: persist the feature state this often when it changed; 0 turns it off "
                        "(a restart then folds the whole event log)")
    s.add_argument("--sequence-items", type=int, default=0,
                   help="items of each user's sequence a new feature state keeps, for bundles with a sequence model "
                        "(e.g. 50; about 30 bytes per item; default 0: none, and such bundles are refused); a stored "
                        "state keeps the value it was made with")
    s.add_argument("--retain-events-days", type=float, default=0.0,
                   help="delete events from the durable event log this many days after they were written, once the "
                        "feature snapshot holds them (0: keep for ever; at least the 1-day exactly-once window; "
                        "docs/privacy.md)")
    s.add_argument("--retain-exposures-days", type=float, default=0.0,
                   help="delete exposure-log files this many days after their last write (0: keep for ever)")
    s.add_argument("--max-concurrent-rpcs", type=int, default=128, help="beyond it calls get RESOURCE_EXHAUSTED")
    s.add_argument("--budget", action="append", default=[], metavar="NAME=VALUE",
                   help="an admission budget (repeatable; docs/serving.md \"Limits\"): writes, writes_per_caller, "
                        "ranks_per_caller, admin, watches, watches_per_caller, health_checks, stream_idle_s")
    s.add_argument("--encoder-timeout-ms", type=float, default=250.0, help="Triton deadline on the request path")
    add_triton_args(s)
    s.add_argument("--max-candidates", type=int, default=2000)
    s.add_argument("--max-text-chars", type=int, default=4096)
    s.add_argument("--max-message-bytes", type=int, default=4 * 1024 * 1024)
    s.add_argument("--gc-thresholds", type=_gc_thresholds, default=None, metavar="G0,G1,G2",
                   help="the garbage collector's thresholds while serving (default: ServeConfig.gc_thresholds, "
                        "700,10,100; Python's own: 700,10,10)")
    s.add_argument("--apply-slice-ms", type=float, default=None,
                   help="events are folded into the features in commits of about this many ms, Ranks run between "
                        "them (default: Limits.apply_slice_ms, 4)")
    s.add_argument("--write-share", type=float, default=None,
                   help="while Ranks are served, folding events takes at most this share of a process's loop; a "
                        "write flood then queues its writes, not the Ranks (default: Limits.write_share, 0.3; 1: no bound)")
    s.add_argument("--log-level", default="INFO")
    s.add_argument("--log-json", action="store_true", help="JSON log lines (with request_id)")
    s.set_defaults(func=cmd_serve)
