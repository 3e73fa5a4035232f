"""The NATS side of a JetStream ingest (serving/ingest/jetstream.py, which folds the stream): the
connection, the stream, the probe, and what is published to it.

    link = NatsLink(cfg, dedup_window_s=86_400, quiet=lambda: fold_stopped)
    await link.connect()                       # bounded at start-up; then reconnects forever; makes or updates the stream
    acks = await link.publish_events(batch)    # every event acknowledged, or EventsNotStored / EventsNotAcknowledged
    last = await link.publish_items(rows, origin)
    problem = await link.probe()               # None, or why NATS cannot take events now (readiness)
    await link.close()

The stream is made from the configuration (`stream_config`) and kept in line with it: a stream of
that name on other subjects is refused (another application's), its limits and duplicate window are
updated in place and logged.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Sequence

import nats
import nats.js.errors
from nats.js.api import DiscardPolicy, StorageType, StreamConfig

from featurizer.errors import ConfigError
from serving.config import JetStreamConfig
from serving.ingest.apply import EventsNotStored
from serving.ingest.log_format import LoggedEvent
from serving.ingest.stream_format import KIND_HEADER, ORIGIN_HEADER, encode_event, encode_item, item_subject, subject_for

log = logging.getLogger(__name__)


class EventsNotAcknowledged(EventsNotStored):
    """JetStream did not acknowledge some events in time (NATS went away mid-call): they may or may
    not be stored. Resending the call with the same event ids is safe (duplicates are dropped)."""

    reason = "EVENTS_NOT_ACKNOWLEDGED"


class NatsLink:
    """One NATS connection and its JetStream context; `quiet()` true: a disconnect is this process's own (closing)."""

    def __init__(self, cfg: JetStreamConfig, dedup_window_s: float, quiet: Callable[[], bool] = lambda: False):
        self.cfg, self.dedup_window_s, self.quiet = cfg, dedup_window_s, quiet
        self.nc: nats.NATS | None = None
        self.js = None
        self._probe_misses = 0  # consecutive probes NATS did not answer in time

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    async def connect(self) -> None:
        """Connect within 3 connect timeouts (ConfigError naming the URL if not), then make or update the stream."""
        cfg = self.cfg

        async def on_disconnect():
            if not self.quiet():
                log.warning("NATS disconnected: LogEvents answers UNAVAILABLE until it is back")

        async def on_reconnect():
            log.info("NATS reconnected")

        async def on_error(e):
            log.warning("NATS: %s", e)

        try:  # (nats-py retries a first connection forever with these settings: the start-up bound is ours)
            self.nc = await asyncio.wait_for(nats.connect(
                servers=cfg.servers, connect_timeout=cfg.connect_timeout_s, name="semrank-serve", allow_reconnect=True,
                max_reconnect_attempts=-1, reconnect_time_wait=0.5, pending_size=0, ping_interval=cfg.ping_interval_s,
                max_outstanding_pings=cfg.max_outstanding_pings, disconnected_cb=on_disconnect,
                reconnected_cb=on_reconnect, error_cb=on_error), 3 * cfg.connect_timeout_s)
        except Exception as e:  # noqa: BLE001 - nats raises many kinds; one clear start-up error
            raise ConfigError(f"cannot connect to NATS at {cfg.url} ({type(e).__name__}: {e}); start it "
                              "(nats-server -js) or fix --nats-url") from None
        self.js = self.nc.jetstream(timeout=cfg.publish_timeout_s)
        await self.ensure_stream()

    def stream_config(self) -> StreamConfig:
        cfg = self.cfg
        window = self.dedup_window_s or 0.001  # 0: deduplication off (JetStream wants a positive window)
        if cfg.max_age_s:
            window = min(window, cfg.max_age_s)
        return StreamConfig(name=cfg.stream, subjects=[f"{cfg.subject_prefix}.>"], storage=StorageType.FILE,
                            num_replicas=cfg.replicas, max_age=cfg.max_age_s or None, max_bytes=cfg.max_bytes,
                            discard=DiscardPolicy.OLD, duplicate_window=window,
                            description="semrank behavioural events (docs/scaling.md)")

    async def ensure_stream(self) -> None:
        want = self.stream_config()
        try:
            info = await self.js.stream_info(want.name)
        except nats.js.errors.NotFoundError:
            await self.js.add_stream(want)
            log.info("created JetStream stream %s (subjects %s, %d replica(s), duplicate window %.0f s)", want.name,
                     want.subjects, want.num_replicas, want.duplicate_window)
            return
        have = info.config
        if have.subjects != want.subjects:
            raise ConfigError(f"JetStream stream {want.name} exists with subjects {have.subjects}, not {want.subjects}: "
                              "use another --stream or --subject-prefix")
        changed = [k for k in ("num_replicas", "max_age", "max_bytes", "duplicate_window")
                   if (getattr(have, k) or 0) != (getattr(want, k) or 0)]
        if changed:
            await self.js.update_stream(want)
            log.warning("updated JetStream stream %s: %s", want.name,
                        ", ".join(f"{k} {getattr(have, k)} -> {getattr(want, k)}" for k in changed))

    async def probe(self) -> str | None:
        """A round trip to JetStream (`$JS.API.INFO`, request and reply) within
        `JetStreamConfig.probe_timeout_s`: a hung server keeps the TCP connection up, so `connected` alone
        does not see it. Why events cannot be taken (None: they can); for readiness. Unanswered only
        counts after `probe_misses` probes in a row: one reply read late behind a full event loop took
        a loaded replica out of rotation (bench/serve.py's saturation phase).

        Not nats-py's `flush(timeout)`: each of its timeouts leaves a cancelled PONG waiter behind, and the
        late PONG kills the client's read loop (InvalidStateError in `_process_pong`), after which every
        publish and fetch times out while `flush` itself, which skips the round trip once the read loop
        is gone, reports success (tests/integration/test_scale_out.py::test_a_hung_nats_takes_readiness_down_and_back).
        A request's reply waiter is dropped on timeout and a late reply is ignored."""
        if not self.connected:
            return "NATS disconnected"
        try:
            reply = await self.nc.request("$JS.API.INFO", b"", timeout=self.cfg.probe_timeout_s)
        except Exception as e:  # noqa: BLE001 - a timeout, no responders, or the connection went away meanwhile
            self._probe_misses += 1
            if self._probe_misses < self.cfg.probe_misses:  # a late reply under a full CPU, until it repeats
                log.info("NATS did not answer readiness probe %d of %d in a row (%s)", self._probe_misses,
                         self.cfg.probe_misses, type(e).__name__)
                return None
            return f"NATS does not answer ({type(e).__name__}, {self._probe_misses} probes in a row)"
        self._probe_misses = 0
        try:
            error = json.loads(reply.data).get("error")
        except ValueError:
            error = None
        if error:
            return f"JetStream refuses: {error.get('description', error)}"
        return None

    async def publish_events(self, batch: Sequence[LoggedEvent], stored_before: int = 0) -> list:
        """Publish every event (`Nats-Msg-Id`: its event id, when it has one) and return JetStream's
        acknowledgements, one per event, duplicates included. EventsNotStored when NATS is not
        connected; EventsNotAcknowledged (with how many were stored) when some answers did not come
        within `publish_timeout_s`. `stored_before`: events of the same call stored earlier."""
        if not self.connected:
            raise EventsNotStored(f"NATS is not connected: none of the {len(batch)} event(s) were stored "
                                  f"({stored_before} earlier event(s) of this call were); resend them", stored_before)
        futures = []
        try:
            for e in batch:
                headers = {"Nats-Msg-Id": e.event_id} if e.event_id else None
                futures.append(await self.js.publish_async(subject_for(self.cfg.subject_prefix, e.user_id),
                                                           encode_event(e), headers=headers))
        except Exception as e:  # noqa: BLE001 - the connection dropped while publishing
            log.warning("publishing to JetStream failed after %d of %d event(s): %s", len(futures), len(batch), e)
        done, pending = await asyncio.wait(futures, timeout=self.cfg.publish_timeout_s) if futures else (set(), set())
        for f in pending:
            f.cancel()
        acks = [f.result() for f in futures if f in done and not f.cancelled() and f.exception() is None]
        if len(acks) < len(batch):
            stored = sum(1 for a in acks if not a.duplicate)
            errors = {type(f.exception()).__name__ for f in futures
                      if f in done and not f.cancelled() and f.exception() is not None}
            raise EventsNotAcknowledged(
                f"JetStream acknowledged {len(acks)} of {len(batch)} event(s) ({stored} new, {len(acks) - stored} "
                f"duplicate); the rest may or may not be stored ({', '.join(sorted(errors)) or 'no answer in time'}): "
                "resend the call with the same event ids (stored ones come back as duplicates)", stored_before + stored)
        return acks

    async def publish_items(self, shared: list[tuple[dict, dict]], origin: str) -> int:
        """Publish item rows (with their embeddings) for the other replicas, marked with this process's
        `origin`; returns the last seq. ItemsNotShared when JetStream does not acknowledge them all."""
        from serving.ingest.items import ItemsNotShared

        if not self.connected:
            raise ItemsNotShared("NATS is not connected")
        headers = {KIND_HEADER: "item", ORIGIN_HEADER: origin}
        futures = []
        try:
            for row, embeddings in shared:
                futures.append(await self.js.publish_async(item_subject(self.cfg.subject_prefix, row["item_id"]),
                                                           encode_item(row, embeddings), headers=dict(headers)))
            acks = await asyncio.wait_for(asyncio.gather(*futures), self.cfg.publish_timeout_s)
        except Exception as e:  # noqa: BLE001 - NATS went away, or an answer did not come in time
            for f in futures:
                f.cancel()
            raise ItemsNotShared(f"JetStream did not acknowledge them ({type(e).__name__})") from None
        return max(a.seq for a in acks)

    async def purge_subjects(self, subjects: Sequence[str]) -> int:
        """Delete every message on `subjects` from the stream; returns how many there were."""
        purged = 0
        for subject in subjects:
            info = await self.js.stream_info(self.cfg.stream, subjects_filter=subject)
            purged += (info.state.subjects or {}).get(subject, 0)
            await self.js.purge_stream(self.cfg.stream, subject=subject)
        return purged

    async def close(self) -> None:
        if self.nc is not None:
            try:
                await self.nc.close()
            except Exception:  # noqa: BLE001 - closing anyway
                log.debug("closing the NATS connection", exc_info=True)
            self.nc = None
