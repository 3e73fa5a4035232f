"""Events on NATS JetStream: LogEvents publishes, every serving process folds the stream.

    ingest = await StreamIngest.open(cfg, online, worker, dedup_window_s=86_400)   # folded up to the stream's end
    logged = await ingest.log_events(batch)    # Logged(stored, duplicates, last_seq) once acknowledged *and* folded here
    await ingest.wait_folded(seq, timeout_s)   # read-your-writes: a Rank carrying a token waits for it
    await ingest.close()

The stream (docs/scaling.md has the subjects, the message format and the topology; the messages
themselves are serving/ingest/stream_format.py; the connection, the stream's set-up, the publishing
and the readiness probe are serving/ingest/nats_link.py):
- one message per event, on `<prefix>.u.<user key>` (the user key: 32 hex digits of a BLAKE2b hash
  of the user id, so that one user's events can be purged by subject), with a JSON body;
- file storage, `replicas` copies in a NATS cluster, retention by age and size;
- `Nats-Msg-Id: <event_id>` on events that carry one, and a duplicate window of
  `Limits.dedup_window_s`: JetStream stores an id once within the window, whichever replica it
  came through, and acknowledges the retry as a duplicate with the first one's sequence. This is
  the exactly-once contract (docs/serving.md) on JetStream; the window is by arrival time at
  JetStream, not event time, so it also holds for late events. Events without an id are never
  deduplicated.

LogEvents acknowledges a batch only when JetStream has acknowledged every event of it, and this
process has folded them into its online features (so the next Rank here sees them). The last
sequence is the read-your-writes token: a Rank on any replica that carries it waits until that
replica has folded it (`wait_folded`).

Folding: one pull consumer per process (ephemeral, no acks, from the sequence after the one the
store holds, under the meta key `jetstream-<stream>`), fetched in batches and applied with the
same fenced, atomic commit as the local log (`serving.ingest.apply.apply_logged`). A fence that
finds the store further on (another process sharing a Redis store applied them) skips what the
store holds; one that finds it behind means the store lost data, and the server refills it
(`rebuild`). When the store fails, the fetched batch is kept and retried; when NATS goes away the
consumer is made again from the folded sequence once NATS is back. A message that does not decode,
or that the API's rules refuse (another producer's bug), is logged, counted and skipped: one bad
message never stops the fold (serving/ingest/stream_checks.py: the checks, and the dead letters
that keep a copy of each skipped message for operators).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import nats.errors
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from featurizer.contracts.event_rules import EventRules, ItemRules
from featurizer.erasure import Erasures
from featurizer.online.features import OnlineFeatures
from featurizer.privacy import Pseudonyms
from featurizer.store.base import OnlineStoreError, WriteConflict
from serving.aio import cancel_and_wait
from serving.config import JetStreamConfig
from serving.ingest.apply import ApplySlices, EventsNotApplied, Logged, apply_logged, applied_seq, wait_on
from serving.ingest.control import agree_pseudonyms
from serving.ingest.log_format import LoggedEvent
from serving.ingest.nats_link import NatsLink
from serving.ingest.stream_checks import DeadLetters, ErasedUser, MessageChecks
from serving.ingest.stream_format import KIND_HEADER, BadStreamMessage, SharedItem
from serving.ranking.store_worker import StoreWorker

log = logging.getLogger(__name__)

FOLD_BATCH = 4096  # messages per fetch at most (a fetch returns as soon as one has come)
FOLD_WAIT_S = 1.0  # a fetch waits this long for a message; then the fold checks the stream and the connection
RETRY_S = (0.05, 0.2, 0.5, 1.0, 2.0)  # backoff when the store or NATS fails


def seq_key(stream: str) -> str:
    """The online store's meta row holding the last stream sequence folded into the features."""
    return f"jetstream-{stream}"


@dataclass
class FoldStats:
    folded: int = 0  # events applied by this process
    bad_messages: int = 0  # skipped: not a semrank event, or one the event rules refuse
    refused: dict[str, int] = field(default_factory=dict)  # of those, by the field the rules named
    consumers: int = 0  # consumers made (1 at start; more after NATS came back)
    store_failures: int = 0  # apply attempts that failed


class StreamIngest:
    """LogEvents on JetStream and the fold of the stream into this process's features; see the module docstring."""

    def __init__(self, cfg: JetStreamConfig, online: OnlineFeatures, worker: StoreWorker, dedup_window_s: float,
                 rules: EventRules = EventRules(), item_rules: ItemRules = ItemRules(), slices: ApplySlices | None = None):
        self.cfg, self.online, self.worker = cfg, online, worker
        self.slices = slices if slices is not None else ApplySlices()  # events per commit
        self.dedup_window_s = dedup_window_s
        self.key = seq_key(cfg.stream)
        self.committed_seq = 0  # the last stream seq the store's features hold
        self.known_seq = 0  # the highest stream seq this process knows of (acks, stream info)
        self.stats = FoldStats()
        # What the fold applies of a message (the API's rules), and the copies of what it skips.
        self.checks = MessageChecks(rules, item_rules, self.stats.refused)
        self.dead = DeadLetters(cfg, lambda: self.link.js)
        self.applied_lock = asyncio.Lock()  # held while a batch is applied (and by the snapshot)
        self._folded = asyncio.Condition()  # notified on every commit and every failure
        self._failure: BaseException | None = None  # why the last apply failed (None: it did not)
        self.link = NatsLink(cfg, dedup_window_s, quiet=lambda: self._task is None)  # the connection and the stream
        self._sub = None
        self._task: asyncio.Task | None = None
        self._restart = asyncio.Event()  # set by rebuild: fold again from the store's seq
        self._stopping = False  # stop_fold: the fold loop ends
        self.origin = uuid.uuid4().hex  # this process, on the item messages it publishes
        # The server's hook for item messages from other replicas (serving.ingest.items.apply_shared_items).
        self.on_items: Callable[[list[SharedItem]], Awaitable[None]] | None = None

    @property
    def erasures(self) -> Erasures | None:
        """Users erased on request, whose messages the fold skips (the local ingest's twin attribute)."""
        return self.checks.erasures

    @erasures.setter
    def erasures(self, erasures: Erasures | None) -> None:
        self.checks.erasures = erasures

    # ------------------------------------------------------------ lifecycle

    @classmethod
    async def open(cls, cfg: JetStreamConfig, online: OnlineFeatures, worker: StoreWorker,
                   dedup_window_s: float, ready_timeout_s: float | None = None,
                   on_items: Callable[[list[SharedItem]], Awaitable[None]] | None = None,
                   items_through: int = 0, rules: EventRules = EventRules(), item_rules: ItemRules = ItemRules(),
                   item_known: Callable[[str], bool] | None = None, slices: ApplySlices | None = None,
                   pseudonyms: Pseudonyms | None = None, erasures: Erasures | None = None,
                   dead_letters: bool = True) -> StreamIngest:
        """Connect, create (or update) the stream, and fold it up to its end as of now.
        `items_through`: the store came from another replica's snapshot (serving.ingest.snapshots)
        holding seqs up to it, and this process has none of the items upserted before: they are
        folded first (item messages only), then everything after the snapshot. `pseudonyms`: this
        replica's key, checked against the fleet's (serving.ingest.control) before anything is
        folded; with a key, an event whose user id is not a pseudonym is refused (`user_id`)."""
        self = cls(cfg, online, worker, dedup_window_s, rules, item_rules, slices)
        self.on_items, self.checks.item_known, self.checks.erasures = on_items, item_known, erasures
        self.dead.enabled = dead_letters  # False: a second fold of the stream (an erasure's rebuild) copies nothing
        try:
            await self.link.connect()
            if pseudonyms is not None:
                await agree_pseudonyms(self.link.js, cfg, pseudonyms.fingerprint)
                self.checks.pseudonymous = pseudonyms.enabled
            self.committed_seq = await worker.read(applied_seq, online, self.key)
            if items_through and on_items is not None:
                await self._fold_items(min(items_through, self.committed_seq))
            end = await self.stream_last_seq()
            self._task = asyncio.create_task(self._fold(), name="jetstream-fold")
            await self._wait_start(end, ready_timeout_s)
        except BaseException:
            await self.close()
            raise
        return self

    async def _fold_items(self, through: int) -> None:
        """Apply the item messages with seq <= `through`, in order (a consumer filtered to them)."""
        config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE, inactive_threshold=60.0,
                                description="semrank items before a snapshot")
        sub = await self.link.js.pull_subscribe(f"{self.cfg.subject_prefix}.items.>", stream=self.cfg.stream, config=config)
        n = 0
        try:
            while True:
                info = await sub.consumer_info()
                if info.num_pending == 0 or info.delivered.stream_seq >= through:
                    break
                items = []
                for m in await sub.fetch(FOLD_BATCH, timeout=5.0):
                    if m.metadata.sequence.stream <= through:
                        try:
                            items.append(self.checks.item(m, m.headers or {}))
                        except BadStreamMessage as e:
                            self.stats.bad_messages += 1
                            log.error("stream %s seq %d: a bad item message is skipped: %s", self.cfg.stream,
                                      m.metadata.sequence.stream, e)
                if items:
                    await self.on_items(items)
                    n += len(items)
        finally:
            await sub.unsubscribe()
        log.info("applied %d item upsert(s) from stream %s that came before the snapshot", n, self.cfg.stream)

    async def _wait_start(self, end: int, timeout_s: float | None) -> None:
        """Wait until the fold reached `end` (the stream's last seq at start), logging progress."""
        t0, start = time.monotonic(), self.committed_seq
        while self.committed_seq < end:
            if self._task.done():
                self._task.result()  # raises what stopped it
            if timeout_s is not None and time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"folding the stream did not reach seq {end} within {timeout_s} s "
                                   f"(at {self.committed_seq})")
            if not await self.wait_folded(end, 5.0):
                await asyncio.sleep(0.2)  # (the fold may be failing: wait_folded then returns at once)
                log.info("folding stream %s: seq %d of %d (%.0f events/s)", self.cfg.stream, self.committed_seq, end,
                         (self.committed_seq - start) / max(1e-9, time.monotonic() - t0))
        if end:
            log.info("folded stream %s up to seq %d in %.1f s", self.cfg.stream, end, time.monotonic() - t0)

    async def stop_fold(self) -> None:
        """Stop folding (the connection stays open until `close`): the loop ends at its next turn,
        and the cancel is repeated until it lands (`serving.aio.cancel_and_wait`)."""
        if self._task is None:
            return
        task, self._task = self._task, None
        self._stopping = True
        await cancel_and_wait([task])

    async def close(self) -> None:
        await self.stop_fold()
        await self.dead.drain()
        await self.link.close()

    # ------------------------------------------------------------ state

    @property
    def js(self):
        """The JetStream context (for the shared snapshots: serving.ingest.snapshots)."""
        return self.link.js

    @property
    def connected(self) -> bool:
        return self.link.connected

    @property
    def behind(self) -> int:
        """Stream events this process knows of but has not folded yet."""
        return max(0, self.known_seq - self.committed_seq)

    def problem(self) -> str | None:
        """Why this process cannot take events now (None: it can); for readiness."""
        if not self.connected:
            return "NATS disconnected"
        if self._failure is not None:
            return f"folding the stream fails ({type(self._failure).__name__})"
        return None

    async def probe(self) -> str | None:
        """Why this process cannot take events now (None: it can), NATS asked too (`NatsLink.probe`:
        a hung server keeps the connection up); for readiness."""
        return self.problem() or await self.link.probe()

    async def stream_last_seq(self) -> int:
        return (await self._stream_state()).last_seq

    async def _stream_state(self):
        """The stream's state (first and last sequence); `known_seq` moves up to its last."""
        state = (await self.link.js.stream_info(self.cfg.stream)).state
        self.known_seq = max(self.known_seq, state.last_seq)
        return state

    async def wait_folded(self, seq: int, timeout_s: float) -> bool:
        """Wait until this process folded `seq` (True), the fold failed, or `timeout_s` passed (False)."""
        if self.committed_seq >= seq:
            return True
        await wait_on(self._folded, lambda: self.committed_seq >= seq or self._failure is not None, timeout_s)
        return self.committed_seq >= seq

    async def catch_up(self) -> int:
        """The fold retries by itself; kept for the server's readiness probe (same as the local log's)."""
        return 0

    # ------------------------------------------------------------ LogEvents

    async def log_events(self, batch: Sequence[LoggedEvent], stored_before: int = 0) -> Logged:
        """Publish every event, wait for JetStream's acknowledgements, then for this process's fold."""
        acks = await self.link.publish_events(batch, stored_before)
        stored = sum(1 for a in acks if not a.duplicate)
        last = max(a.seq for a in acks)
        self.known_seq = max(self.known_seq, last)
        if not await self.wait_folded(last, self.cfg.apply_timeout_s):
            why = type(self._failure).__name__ if self._failure is not None else f"not within {self.cfg.apply_timeout_s} s"
            raise EventsNotApplied(
                f"{stored} event(s) were stored in JetStream (do not resend them), but folding them into this "
                f"process's online features failed ({why}); they are folded when the store is back, and rankings "
                "do not reflect them until then", stored_before + stored)
        return Logged(stored, len(acks) - stored, last)

    # ------------------------------------------------------------ the fold

    async def _subscribe(self) -> None:
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception:  # noqa: BLE001 - the old consumer may be gone with the server
                pass
        config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=self.committed_seq + 1,
                                ack_policy=AckPolicy.NONE, inactive_threshold=60.0, max_waiting=4,
                                description="semrank fold")
        self._sub = await self.link.js.pull_subscribe(f"{self.cfg.subject_prefix}.>", stream=self.cfg.stream, config=config)
        self.stats.consumers += 1

    async def _fold(self) -> None:
        failures = 0
        while not self._stopping:
            try:
                if self._restart.is_set():
                    self._restart.clear()
                    self._sub = None
                if self._sub is None:
                    await self._subscribe()
                try:
                    msgs = await self._sub.fetch(FOLD_BATCH, timeout=FOLD_WAIT_S)
                except (nats.errors.TimeoutError, asyncio.TimeoutError):
                    await self._idle()
                    continue
                await self._apply_messages(msgs)
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - NATS or the store failed: back off, make the consumer again
                failures += 1
                self._sub = None
                log.warning("folding stream %s: %s: %s (retrying)", self.cfg.stream, type(e).__name__, e)
                await asyncio.sleep(RETRY_S[min(failures, len(RETRY_S)) - 1])

    async def _idle(self) -> None:
        """No message within FOLD_WAIT_S. If the stream ends past what was folded, either the
        messages in between were deleted (a purge, retention: nothing is pending, so they are
        recorded as folded) or the consumer is gone (NATS restarted: it is made again)."""
        if not self.connected:
            return
        last = await self.stream_last_seq()
        if last <= self.committed_seq:
            return
        try:
            info = await self._sub.consumer_info()
        except Exception:  # noqa: BLE001 - gone with the server
            info = None
        if info is not None and info.num_pending == 0 and info.num_ack_pending == 0:
            await self._apply_pairs([], last)
            return
        log.info("stream %s is at seq %d, this process at %d: making its consumer again", self.cfg.stream, last,
                 self.committed_seq)
        self._sub = None

    async def _apply_messages(self, msgs) -> None:
        """Fold fetched messages in stream order: runs of events in one commit each; an item message
        first commits the events before it, then goes to `on_items` (its seq is committed with
        the next events: a crash in between applies it again, which an upsert allows)."""
        pairs: list[tuple[int, LoggedEvent]] = []
        last = self.committed_seq
        for m in msgs:
            seq = m.metadata.sequence.stream
            self.known_seq = max(self.known_seq, seq + (m.metadata.num_pending or 0))  # (for the lag metric)
            if seq <= self.committed_seq:
                continue
            if self.dead.is_dead(m.subject):  # a dead letter (below): for operators, never folded
                last = max(last, seq)
                continue
            headers = m.headers or {}
            try:
                if headers.get(KIND_HEADER) == "item":
                    item = self.checks.item(m, headers)
                    await self._apply_pairs(pairs, seq - 1)
                    pairs = []
                    if item.origin != self.origin and self.on_items is not None:
                        await self.on_items([item])
                else:
                    pairs.append((seq, self.checks.event(m)))
            except ErasedUser:
                self.dead.purge_later(m.subject)
            except BadStreamMessage as e:
                self.stats.bad_messages += 1
                log.error("stream %s seq %d (%s) is not a semrank event or item and is skipped: %s", self.cfg.stream,
                          seq, m.subject, e)
                self.dead.copy(m, seq, str(e))
            last = max(last, seq)
        await self._apply_pairs(pairs, last)

    async def purge_subjects(self, subjects: Sequence[str]) -> int:
        """Delete every message on `subjects` (an erased user's: `subject_for`) from the stream;
        returns how many there were."""
        return await self.link.purge_subjects(subjects)

    # ------------------------------------------------------------ UpsertItems

    async def publish_items(self, shared: list[tuple[dict, dict]]) -> int:
        """Publish item rows (with their embeddings) for the other replicas; returns the last seq.
        Raises ItemsNotShared when JetStream does not acknowledge them all."""
        last = await self.link.publish_items(shared, self.origin)
        self.known_seq = max(self.known_seq, last)
        return last

    async def _apply_pairs(self, pairs: list[tuple[int, LoggedEvent]], last: int) -> None:
        """Commit `pairs` up to stream seq `last`, in slices (`ApplySlices`: the events that fit a few
        ms) with the event loop free between them (a fetch holds up to FOLD_BATCH events: Ranks must
        not wait for all of it)."""
        start = 0
        while True:
            await self.slices.gate()  # the writes' share of the loop (`ApplySlices.delay`): the fold lags, not Ranks
            size = self.slices.size()
            part = pairs[start : start + size]
            done = start + size >= len(pairs)
            await self._apply_slice(part, last if done else part[-1][0])
            if done:
                return
            start += size
            await asyncio.sleep(0)  # let Ranks run between slices

    async def _apply_slice(self, pairs: list[tuple[int, LoggedEvent]], last: int) -> None:
        """Commit `pairs` up to stream seq `last`, retrying while the store fails."""
        if last <= self.committed_seq:
            return
        failures = 0
        while True:
            try:
                async with self.applied_lock:
                    if self._restart.is_set():  # the store was refilled: fold again from its seq
                        return
                    began = time.perf_counter()  # the commit alone: not the lock's wait, nor the retries
                    n = await self.worker.write(self._commit, pairs, last)
                    self.slices.record(n, time.perf_counter() - began)
                break
            except Exception as e:  # noqa: BLE001 - the store failed: keep the batch and retry; LogEvents waiting are told
                self._fail(e)
            failures += 1
            self.stats.store_failures += 1
            await asyncio.sleep(RETRY_S[min(failures, len(RETRY_S)) - 1])
        self.stats.folded += n
        async with self._folded:
            self._failure = None
            self._folded.notify_all()

    def _fail(self, e: BaseException) -> None:
        if self._failure is None:
            log.warning("folding stream %s into the online store failed (%s: %s); retrying", self.cfg.stream,
                        type(e).__name__, e)
        self._failure = e

        async def tell():
            async with self._folded:
                self._folded.notify_all()

        asyncio.ensure_future(tell())

    def _commit(self, pairs: list[tuple[int, LoggedEvent]], last: int) -> int:
        """Fold `pairs` (seq, event) up to `last` in one fenced commit; on the store thread. A fence
        that finds the store further on takes its seq and folds only what follows."""
        for _ in (1, 2):
            after = self.committed_seq
            if last <= after:  # (the state moved on under this batch: an erasure's swap)
                return 0
            events = [e for s, e in pairs if s > after]
            try:
                apply_logged(self.online, events, last, after, key=self.key)
            except WriteConflict:
                store_seq = applied_seq(self.online, self.key)
                if store_seq < after:
                    raise OnlineStoreError(f"the online store holds stream seq {store_seq}, not {after}: it lost data "
                                           "and is refilled") from None
                log.info("the online store already holds stream seq %d (another process folded it)", store_seq)
                self.committed_seq = store_seq
                if store_seq >= last:
                    return 0
                continue
            self.committed_seq = last
            return len(events)
        raise OnlineStoreError("the online store's stream seq kept moving under this process's commits")

    async def moved_to(self, online: OnlineFeatures, seq: int) -> None:
        """Fold into `online` from now on, which holds the stream up to `seq` (an erasure swapped it in,
        under `applied_lock`); tells the calls waiting for a seq."""
        self.online, self.committed_seq = online, max(self.committed_seq, seq)
        async with self._folded:
            self._folded.notify_all()

    async def rebuild(self, data_events) -> int:
        """Refill a store that lost its state: the data directory's events, then the whole stream
        again (folded as usual). Returns when the fold is back at the stream's end."""
        async with self.applied_lock:  # no commit between the refill and the restart
            await self.worker.write(self.online.apply, data_events)
            # Both after the refill: the fold, restarting while the seq still read the old value, would
            # subscribe past the stream's end and record the events in between as folded, unapplied.
            self.committed_seq = 0
            self._restart.set()  # a batch fetched before the loss is dropped at its commit (`_apply_slice`)
        state = await self._stream_state()
        end = state.last_seq
        if state.first_seq > 1:
            log.error("stream %s starts at seq %d: events before it were dropped by retention and are missing from "
                      "the refilled store (keep the stream back to the oldest snapshot)", self.cfg.stream,
                      state.first_seq)
        while not await self.wait_folded(end, 5.0):
            log.info("refilling from stream %s: seq %d of %d", self.cfg.stream, self.committed_seq, end)
            await asyncio.sleep(0.2)  # (the fold may be failing: wait_folded then returns at once)
        return data_events.height + end

