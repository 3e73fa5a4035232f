"""Process lifecycle: state, Triton, bundles, the asyncio gRPC server, and shutdown.

`RankingServer.start()`:
1. reads the data directory's items (plus items upserted earlier, from the state dir);
2. restores the online features: from the store's snapshot when it has one, else from the
   data directory's events; then replays the durable event log past the snapshot
   (steps 1-2: `serving.ingest.restore.build_engine`, which batch scoring uses too);
3. loads the default bundle and every experiment bundle (each text encoder served by its
   own Triton child process with dynamic batching; catalog embeddings cached on disk);
4. serves RankingService, grpc.health.v1 and reflection, with auth and metrics
   interceptors, optional TLS, bounded concurrency (RESOURCE_EXHAUSTED beyond it), and
   a watcher that hot-reloads the bundle directory.

`stop()` stops accepting, drains in-flight calls, flushes the exposure log and the
feature snapshot, closes the event log and stops Triton, leaving no process behind.
"""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import logging
import tempfile
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from threadpoolctl import threadpool_limits

from featurizer.contracts.experiments import Experiments, load_experiments
from featurizer.contracts.schema import read_dataset
from featurizer.definitions import FeatureParams
from featurizer.erasure import Erasures
from featurizer.errors import ConfigError
from featurizer.online.features import StateMismatchError
from featurizer.privacy import KEY_ENV as PSEUDONYM_KEY_ENV
from featurizer.privacy import check_state
from featurizer.store import snapshot_files
from featurizer.store.config import RedisConfig
from ranker.bundle import EncoderRef
from semrank.ranking.v1 import ranking_service_pb2 as pb
from semrank.ranking.v1 import ranking_service_pb2_grpc as pb_grpc
from serving.aio import cancel_and_wait
from serving.api.auth import AuthInterceptor
from serving.api.errors import ErrorInterceptor, too_large_backstop
from serving.api.interceptors import AdmissionInterceptor, MetricsInterceptor
from serving.api.service import RankingService, ServingState, null_reply
from serving.config import ServeConfig
from serving.encoding.factories import (
    TritonEncoderOptions,
    external_triton_factory,
    remote_triton_encoder,
    triton_encoder_factory,
)
from serving.encoding.pool import EncoderHandle, EncoderPool
from serving.experiments.exposure_log import ExposureLog
from serving.retention import Retention, RetentionConfig
from serving.ingest.apply import ApplySlices, EventIngest
from serving.ingest.control import list_fleet_erasures
from serving.ingest.dedup import EventDedup
from serving.ingest.items import apply_shared_items
from serving.ingest.jetstream import StreamIngest
from serving.ingest.live_erasure import FLEET_ERASURES_KEY, LiveErasure, StreamSide, fleet_through
from serving.ingest.snapshots import fetch_snapshot
from serving.ingest.restore import STATE_DATA, build_engine, close_all, default_store, snapshot_file
from serving.observability.metrics import Metrics
from serving.ranking.engine import RankingEngine, utc_now
from serving.ranking.registry import BundleRegistry
from serving.ranking.shared_bundle import SharedBundle
from serving.readiness import Readiness
from serving.snapshotting import FeatureSnapshots
from serving.triton.process import TritonProcess

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RankingService"].full_name
LOOP_LAG_PROBE_S = 0.1  # how often the event-loop lag is sampled (semrank_event_loop_lag_seconds)


REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def _enable_reflection(server: grpc.aio.Server) -> None:
    """Server reflection under both names: grpc.reflection.v1 (what grpcurl and current clients ask
    first) and v1alpha. grpcio-reflection implements only v1alpha; the two protocols' messages are
    the same, field for field, so v1 is served by the same servicer with v1alpha's codecs."""
    from grpc_reflection.v1alpha.reflection import aio as reflection_aio
    from grpc_reflection.v1alpha import reflection_pb2 as rpb

    names = [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME,
             REFLECTION_V1]
    servicer = reflection_aio.ReflectionServicer(names)
    handler = grpc.stream_stream_rpc_method_handler(servicer.ServerReflectionInfo,
                                                    request_deserializer=rpb.ServerReflectionRequest.FromString,
                                                    response_serializer=rpb.ServerReflectionResponse.SerializeToString)
    for service in (reflection.SERVICE_NAME, REFLECTION_V1):
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, {"ServerReflectionInfo": handler}),))


class RankingServer:
    def __init__(self, cfg: ServeConfig, clock: Callable[[], datetime] = utc_now,
                 encoder_factory: Callable | None = None):
        self.cfg = cfg
        self.clock = clock
        self._gc_thresholds: tuple[int, int, int] | None = None  # the process's own, restored at stop
        self._blas_limits = None  # numpy's BLAS threads held at 1 while serving (threadpoolctl), restored at stop
        self.metrics = Metrics()
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.state: ServingState | None = None
        self.tritons: dict[str, TritonProcess] = {}  # encoder key -> its Triton (for tests and ops)
        self._encoder_factory = encoder_factory or self._start_encoder
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._tasks: list[asyncio.Task] = []
        self._closers: list[Callable] = []
        self.readiness: Readiness | None = None  # the READINESS health status (serving.readiness; made at start)
        self._stream_ingest: StreamIngest | None = None
        self.snapshots: FeatureSnapshots | None = None  # the feature state's snapshots (made at start)
        self.retention: Retention | None = None  # the event and exposure logs' compaction (with a retention age)
        self._shared_bundle: SharedBundle | None = None  # the fleet's bundle (JetStream's KV)
        self.admission: AdmissionInterceptor | None = None  # (made with the gRPC server, after the ingest)

    @property
    def engine(self) -> RankingEngine:
        return self.state.engine

    # ------------------------------------------------------------ encoders

    async def _start_encoder(self, ref: EncoderRef, bundle_path: Path, key: str) -> EncoderHandle:
        """A Triton child process serving this encoder, behind a deadline/retry/breaker client; for a
        worker of `semrank serve --workers N`, the Triton the supervisor started for it; with
        `cfg.triton`, that external Triton (checked against the bundle; nothing started)."""
        cfg = self.cfg
        opts = TritonEncoderOptions(deadline_s=cfg.encoder_timeout_s, retries=cfg.encoder_retries,
                                    breaker_failures=cfg.breaker_failures, breaker_open_s=cfg.breaker_open_s,
                                    breaker_min_timeout_s=cfg.breaker_min_timeout_s,
                                    max_queue_delay_us=cfg.triton_max_queue_delay_us,
                                    supervise_s=cfg.triton_supervise_s)
        if cfg.triton is not None:
            return await external_triton_factory(cfg.triton, opts, observer=self.metrics.triton_observer())(
                ref, bundle_path, key)
        url = dict(cfg.triton_urls).get(key)
        if url is not None:
            return await remote_triton_encoder(url, key, opts, observer=self.metrics.triton_observer())
        factory = triton_encoder_factory(
            opts,
            observer=self.metrics.triton_observer(),
            started=self.tritons.__setitem__,
            stopped=lambda k: self.tritons.pop(k, None),
        )
        return await factory(ref, bundle_path, key)

    # ------------------------------------------------------------ state

    def _state_dir(self) -> Path:
        if self.cfg.state_dir is not None:
            self.cfg.state_dir.mkdir(parents=True, exist_ok=True)
            return self.cfg.state_dir
        self._tmp = tempfile.TemporaryDirectory(prefix="semrank-state-")
        log.warning("no state dir: events, exposures and embeddings go to %s and are lost at exit", self._tmp.name)
        return Path(self._tmp.name)

    def _check_access(self) -> None:
        """Refuse an open admin API off loopback; say at start-up what is open."""
        cfg = self.cfg
        if cfg.open_admin and not is_loopback(cfg.host):
            raise ConfigError(f"open_admin (--open-admin) needs a loopback host, not {cfg.host!r}: configure a token "
                              "with role admin to call admin RPCs from other machines")
        if cfg.tokens is None:
            log.warning("no tokens configured: Rank, LogEvents and UpsertItems accept any caller that reaches %s "
                        "(writes are open); configure tokens with roles client / writer / admin to restrict them",
                        cfg.host)
            if cfg.open_admin:
                log.warning("open_admin: admin RPCs (ReloadBundle, DeleteUser) accept any caller on %s", cfg.host)
            else:
                log.info("admin RPCs are off (no admin token configured)")

    async def start(self) -> int:
        """Open the feature state, load the bundle, fold the events, then serve; returns the port.
        Anything that fails on the way closes what was opened (`stop`)."""
        cfg = self.cfg
        self._check_access()
        try:
            state_dir = self._state_dir()
            experiments = load_experiments(cfg.experiments_file) if cfg.experiments_file else Experiments()
            built, fetched, fleet_erased, from_scratch = await self._open_state(state_dir)
            self._closers.extend(built.closers)  # the store worker, the event log, then the online store
            engine, event_log, items = built.engine, built.event_log, built.engine.items
            # Where a bundle may be loaded from after start-up (ReloadBundle, the fleet's KV key).
            bundle_roots = list(cfg.bundle_roots) or [Path(cfg.bundle_dir).resolve().parent]
            registry = BundleRegistry(engine, EncoderPool(self._encoder_factory),
                                      on_reload=lambda result, v: self._on_reload(result, v))
            self._registry = registry
            await registry.start(cfg.bundle_dir, sorted(experiments.bundles()))
            self._on_reload("ok", registry.default.runtime.version)
            exposures = ExposureLog(state_dir / "exposures",
                                    segment_max_age_s=RetentionConfig.segment_age(cfg.retention.exposures_s))
            self._closers.insert(0, exposures.close)
            if event_log is not None:
                event_log.segment_max_age_s = RetentionConfig.segment_age(cfg.retention.events_s)
            ingest = await self._open_ingest(built, registry, fetched, bundle_roots)
            self.metrics.watch_ingest(ingest)
            self.state = ServingState(
                engine=engine, registry=registry, exposures=exposures, ingest=ingest,
                metrics=self.metrics,
                limits=cfg.limits, experiments=experiments, encoder_timeout_s=cfg.encoder_timeout_s,
                bundle_roots=bundle_roots, pseudonyms=cfg.pseudonyms, erasures=built.erasures,
                null_reply=(null_reply(engine.items.item_ids, registry.default.runtime.version, cfg.null_service_top_k)
                            if cfg.null_service_top_k else None),
            )
            ingest.erasures = built.erasures
            await self._open_erasure(state_dir, built, ingest, exposures, fleet_erased, from_scratch)
            await self._start_grpc()
            self.metrics.watch_gc()
            if cfg.metrics_port is not None:
                self.metrics_port = self.metrics.start_http(cfg.metrics_host, cfg.metrics_port)
            self._start_background(registry, event_log, exposures)
        except BaseException:
            await self.stop()
            raise
        for name in ("", SERVICE_NAME):  # while Rank can answer at all; READINESS: every dependency up
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.readiness = Readiness(self.health, self.state, registry, self.metrics, self._refill_events)
        await self.readiness.publish()
        if cfg.readiness_interval_s > 0:
            self._tasks.append(asyncio.create_task(self.readiness.run(cfg.readiness_interval_s)))
        self._settle_process()
        log.info("serving %s on %s:%d (bundle %s, %d items, %d experiment(s), metrics port %s)", SERVICE_NAME,
                 cfg.host, self.port, registry.default.runtime.version, len(items), len(experiments.experiments),
                 self.metrics_port)
        return self.port

    async def _open_state(self, state_dir: Path):
        """The feature state and the engine over it (`build_engine`), under this process's privacy key:
        from its own snapshot, a fresh replica's copy of the fleet's, or built from the start (leaving the
        fleet's erased users out). Returns (built, the fetched snapshot's stream seq or None, the fleet's
        erasures, whether the state was built from the start)."""
        cfg = self.cfg
        # Stored ids under one key only (featurizer.privacy): refused before anything is read or written.
        check_state(state_dir, cfg.pseudonyms, holds_data=any((state_dir / name).exists() for name in STATE_DATA))
        if cfg.pseudonyms.enabled:
            log.info("pseudonymous user ids: %s", cfg.pseudonyms.describe())
        else:
            log.warning("pseudonymous user ids are off: user ids are stored, logged and exported as callers send "
                        "them; configure a key (--pseudonym-key-file or $%s; docs/privacy.md)", PSEUDONYM_KEY_ENV)
        snapshots = self.snapshots = FeatureSnapshots(snapshot_file(cfg, state_dir), cfg.events)
        fetched = None
        if cfg.events is not None and snapshots.path is not None and not snapshots.path.exists():
            fetched = await fetch_snapshot(cfg.events, snapshots.path)  # a fresh replica: the shared one
        fleet_erased = await list_fleet_erasures(cfg.events) if cfg.events is not None else []
        # an in-process state with no snapshot (none of its own, none shared) is built from the start here
        from_scratch = not isinstance(cfg.store, RedisConfig) and (snapshots.path is None
                                                                    or not snapshots.path.exists())
        if fleet_erased and from_scratch:  # the state built here leaves the fleet's erased users out
            known = Erasures.open(state_dir, cfg.pseudonyms)
            known.record_hashes([e for e in fleet_erased if e["user"] not in known.hashes],
                                {"features": True, "at_start": True})

        def build():
            return build_engine(cfg.data_dir, state_dir, cfg.store, self.clock, local_log=cfg.events is None,
                                embeddings_dir=cfg.embeddings_dir, rules=cfg.limits.event_rules,
                                on_cache=lambda c, hit: self.metrics.record_cache(c, int(hit), int(not hit)),
                                on_encode=self.metrics.record_rank_encode,
                                on_history_skipped=self.metrics.user_history_skipped_total.inc,
                                max_inline_encodes=cfg.limits.max_inline_encodes,
                                store_read_timeout_s=cfg.limits.store_read_timeout_s,
                                max_store_waiting=cfg.limits.max_store_waiting, pseudonyms=cfg.pseudonyms,
                                feature_params=FeatureParams(sequence_items=cfg.sequence_items))

        try:
            return build(), fetched, fleet_erased, from_scratch
        except StateMismatchError as e:
            if fetched is None:
                raise
            log.error("the shared snapshot cannot be used (%s): deleted; folding the stream from the start", e)
            snapshots.path.unlink()
            snapshot_files.delta_path(snapshots.path).unlink(missing_ok=True)
            return build(), None, fleet_erased, from_scratch

    async def _open_ingest(self, built, registry: BundleRegistry, fetched: int | None, bundle_roots: list[Path]):
        """The events' way in: the JetStream stream folded up to its end (with the fleet's bundle and a
        first shared snapshot), or the local event log."""
        cfg, engine, snapshots = self.cfg, built.engine, self.snapshots
        if cfg.events is None:
            ingest = EventIngest(built.event_log, engine.online, EventDedup(cfg.limits.dedup_window_s),
                                 worker=engine.store_worker, slices=self._apply_slices())
            snapshots.bind(ingest)
            return ingest
        ingest = self._stream_ingest = await StreamIngest.open(
            cfg.events, engine.online, engine.store_worker, cfg.limits.dedup_window_s,
            on_items=lambda shared: apply_shared_items(engine, registry.pool, shared),
            items_through=fetched or 0, rules=cfg.limits.event_rules, item_rules=cfg.limits.item_rules,
            item_known=engine.items.index.__contains__, slices=self._apply_slices(), pseudonyms=cfg.pseudonyms,
            erasures=built.erasures)
        snapshots.bind(ingest, ingest)
        self._shared_bundle = SharedBundle(ingest.js, cfg.events, registry, ingest.origin, bundle_roots)
        await self._shared_bundle.start()  # the fleet's bundle, if another replica reloaded
        try:  # the fleet's first snapshot, before serving: the only full upload most fleets make
            await snapshots.share(first=True)
        except Exception:  # noqa: BLE001 - the periodic share tries again
            log.exception("sharing the feature snapshot at start-up failed")
        return ingest

    async def _open_erasure(self, state_dir: Path, built, ingest, exposures: ExposureLog, fleet_erased: list[dict],
                            from_scratch: bool) -> None:
        """DeleteUser's machinery; on JetStream the fleet's erasures are applied before serving (no Rank
        reads an erased user) and followed from then on."""
        cfg, engine, snapshots, registry = self.cfg, built.engine, self.snapshots, self.state.registry
        stream = None
        if cfg.events is not None:
            stream = StreamSide(cfg.events, cfg.limits.dedup_window_s, cfg.limits.item_rules, snapshots.share_now)
        erasure = self.state.erasure = LiveErasure(
            state_dir=state_dir, data_dir=cfg.data_dir, store_cfg=cfg.store or default_store(state_dir),
            engine=engine, ingest=ingest, exposures=exposures, pseudonyms=cfg.pseudonyms,
            rules=cfg.limits.event_rules, erasures=built.erasures, persist=lambda: snapshots.persist(full=True),
            forget=lambda users: engine.forget_users(users, registry.runtimes()), stream=stream)
        snapshots.erasure = erasure
        if stream is not None and erasure.refusal() is None:
            await self._sync_fleet_erasures(fleet_erased, from_scratch)
            self._tasks.append(asyncio.create_task(self._follow_fleet_erasures(cfg.events.control_poll_s)))

    def _start_background(self, registry: BundleRegistry, event_log, exposures: ExposureLog) -> None:
        """The periodic tasks: bundle reloads, snapshots, retention, the loop-lag probe, the fleet's bundle."""
        cfg, snapshots = self.cfg, self.snapshots
        if cfg.reload_poll_s > 0:
            self._tasks.append(asyncio.create_task(registry.watch(cfg.reload_poll_s)))
        if cfg.snapshot_interval_s > 0:
            self._tasks.append(asyncio.create_task(snapshots.run(cfg.snapshot_interval_s)))
        if cfg.retention.events_s or cfg.retention.exposures_s:
            if cfg.retention.events_s and event_log is not None and not self.state.engine.online.store.remote \
                    and not cfg.snapshot_interval_s:
                log.warning("event retention is set, but with no feature snapshot (--snapshot-interval-s 0) the "
                            "event log is the only copy of the state: nothing will be deleted from it")
            self.retention = Retention(cfg.retention, event_log, exposures, snapshots.covered_seq)
            self._tasks.append(asyncio.create_task(self.retention.run()))
        self._tasks.append(asyncio.create_task(self._loop_lag(LOOP_LAG_PROBE_S)))
        if self._shared_bundle is not None:
            self._tasks.append(asyncio.create_task(self._shared_bundle.follow(cfg.events.control_poll_s)))

    def _settle_process(self) -> None:
        """The process's settings while serving (`stop` restores them)."""
        # What start-up loaded (the catalog, the feature state, the bundle) lives as long as the process:
        # out of the collector's way, a generation-2 collection walks only what serving allocates since
        # (one took 188 ms in the bench's mixed phase before; semrank_gc_pause_seconds shows them).
        gc.collect()
        gc.freeze()
        # numpy's BLAS on one thread while serving: a BLAS call on the request path (the sequence model's
        # forward pass, serving.ranking.sequence_scores) woke OpenBLAS's second thread, which then spun:
        # +0.9 of the 2 cores and a 138 ms Rank p99 in bench/serve.py's heavy mix (docs/serving.md).
        self._blas_limits = threadpool_limits(1, user_api="blas")
        self._gc_thresholds = gc.get_threshold()
        gc.set_threshold(*self.cfg.gc_thresholds)  # (ServeConfig.gc_thresholds: full collections stay rare)

    def _on_reload(self, result: str, version: str) -> None:
        self.metrics.bundle_reloads_total.labels(result).inc()
        if result == "ok":
            self.metrics.set_bundle(version)
            if self._shared_bundle is not None:
                self._shared_bundle.reloaded_here()

    def _apply_slices(self) -> ApplySlices:
        """The fold's commits: sized by `apply_slice_ms`, and at most `write_share` of the loop while Ranks are served."""
        limits = self.cfg.limits
        return ApplySlices(limits.apply_slice_ms, write_share=limits.write_share,
                           ranks_active=lambda: self.admission is not None and self.admission.busy("ranks"))

    async def _start_grpc(self) -> None:
        cfg = self.cfg
        # Metrics first (it sees every outcome, refusals included), then errors (every exception
        # below it becomes a status), admission, and auth last (see serving.api.interceptors).
        budgets = replace(cfg.budgets, ranks=cfg.max_concurrent_rpcs)
        self.admission = AdmissionInterceptor(budgets, by_token=bool(cfg.tokens),
                                              on_refuse=lambda kind: self.metrics.admission_refused_total.labels(kind).inc())
        interceptors = [MetricsInterceptor(self.metrics), ErrorInterceptor(max_message_bytes=cfg.limits.max_message_bytes,
                                                                      stream_idle_s=budgets.stream_idle_s),
                        self.admission, AuthInterceptor(cfg.tokens, open_admin=cfg.open_admin)]
        options = [
            # The error interceptor refuses messages over the limit with details; grpc's own check is a backstop.
            ("grpc.max_receive_message_length", too_large_backstop(cfg.limits.max_message_bytes)),
            ("grpc.max_send_message_length", cfg.limits.max_message_bytes),
            # grpc binds with SO_REUSEPORT by default on Linux: a second server on a port in use would
            # bind silently and take part of the connections. Only the workers of one supervisor share.
            ("grpc.so_reuseport", 1 if cfg.share_port else 0),
        ]
        # grpc's own cap is only a backstop for what the admission interceptor does not see.
        self.server = grpc.aio.server(interceptors=interceptors, options=options,
                                      maximum_concurrent_rpcs=budgets.total + 16)
        pb_grpc.add_RankingServiceServicer_to_server(RankingService(self.state), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        _enable_reflection(self.server)
        address = f"{cfg.host}:{cfg.port}"
        try:
            if cfg.tls is not None:
                self.port = self.server.add_secure_port(address, cfg.tls.server_credentials())
            else:
                self.port = self.server.add_insecure_port(address)
        except RuntimeError:  # grpc raises when the bind fails
            self.port = 0
        if not self.port:
            raise ConfigError(f"cannot listen on {address}: the port is in use (another semrank serve?) or the address "
                              "is not this host's; pick another --port or stop the other server")
        await self.server.start()

    async def _loop_lag(self, every_s: float) -> None:
        """Observe how late a sleep of `every_s` wakes: the time any call ready to run waits for the
        loop (and, for a new call, for gRPC's queue to be drained), which the RPC histogram cannot see."""
        loop = asyncio.get_running_loop()
        while True:
            t0 = loop.time()
            await asyncio.sleep(every_s)
            self.metrics.event_loop_lag_seconds.observe(max(0.0, loop.time() - t0 - every_s))

    async def _sync_fleet_erasures(self, listed: list[dict], from_scratch: bool) -> None:
        """At start-up (JetStream): the fleet's erasures this replica's state reflects (the shared or
        its own snapshot's watermark, or a state built here without them) are recorded; the rest
        are applied now, before serving (serving.ingest.live_erasure)."""
        erasure, online = self.state.erasure, self.state.online
        through = fleet_through(online)
        if listed and from_scratch:
            through = max(e["revision"] for e in listed)  # built from the start without them (start)
            await self.state.engine.store_worker.write(online.store.write, "meta",
                                                       {FLEET_ERASURES_KEY: {"through": through}})
        held = [e for e in listed if e["revision"] <= through]
        new = [e for e in held if e["user"] not in erasure.erasures.hashes]
        if new:
            erasure.erasures.record_hashes(new, {"features": True, "from_snapshot": True})
        erasure.applied = {e["user"] for e in held}  # what this state reflects; the rest is applied now
        if any(e["revision"] > through for e in listed):
            await erasure.sync_fleet()

    async def _follow_fleet_erasures(self, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            try:
                await self.state.erasure.sync_fleet()
            except Exception:  # noqa: BLE001 - the next poll tries again
                log.exception("applying the fleet's erasures failed")

    async def _refill_events(self):
        """The events a store that lost its state is refilled from: the data directory's (pseudonymised
        under the server's key), erased users left out (featurizer.erasure)."""
        events = self.cfg.pseudonyms.events((await asyncio.to_thread(read_dataset, self.cfg.data_dir)).events)
        return self.state.erasures.filter_events(events) if self.state.erasures is not None else events

    async def stop(self) -> None:
        """Stop accepting, drain in-flight calls, flush logs and the snapshot, stop Triton."""
        self.metrics.unwatch_gc()
        gc.unfreeze()  # (several servers in one process, as in tests: what start froze is collectable again)
        if self._blas_limits is not None:
            self._blas_limits.restore_original_limits()
            self._blas_limits = None
        if self._gc_thresholds is not None:
            gc.set_threshold(*self._gc_thresholds)
            self._gc_thresholds = None
        if self.server is not None:
            await self.health.enter_graceful_shutdown()
            await self.server.stop(self.cfg.grace_s)
            self.server = None
        await cancel_and_wait(self._tasks)
        self._tasks = []
        if getattr(self, "_registry", None) is not None:
            await self._registry.close()
            self._registry = None
        if self._shared_bundle is not None:
            await self._shared_bundle.close()
            self._shared_bundle = None
        if self._stream_ingest is not None:  # before the store worker and the store close
            await self._stream_ingest.close()
            self._stream_ingest = None
        self.metrics.stop_http()
        close_all(self._closers)
        self._closers = []
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    async def wait(self) -> None:
        if self.server is not None:
            await self.server.wait_for_termination()
