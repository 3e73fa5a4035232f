"""Events in: append to the durable event log, then apply to the online features in log order, atomically.

    ingest = EventIngest(event_log, online)
    logged = await ingest.log_events(batch)   # Logged(stored, duplicates, last_seq), once durable and applied

- Appends run concurrently; the event log group-commits them (one fsync for all waiting batches).
- Applying goes strictly in sequence order, so the sequence the store records never runs ahead
  of what it holds: `apply_logged` commits the batch's features and the applied sequence
  (`LOG_SEQ_KEY` in the store's "meta" entity) in one atomic `write_batch` (one MULTI/EXEC on
  Redis, one critical section on the in-process store, whose snapshot is taken under the same
  lock). A crash before the commit leaves neither, and the restart replays the batch; after it,
  both, and the restart skips it. Nothing is counted twice (tests/serving/ingest/test_atomic_apply.py
  kills a process at both points).
- When applying fails (the online store is down), the batch stays stored and the call says so
  (`EventsNotApplied`: do not resend). The store's features then lag the log: `committed_seq` <
  `applied_seq`. The next batch first applies that backlog, read back from the event log, in the
  same commit; `catch_up()` (the server calls it periodically) does it without new events. A
  restart replays it too. So stored events always reach the features, once.
- Events with an `event_id` already stored within the window are dropped before the append
  (`serving.ingest.dedup.EventDedup`; the set is rebuilt from the event log at start-up), and
  counted as duplicates: stored once, whatever the client retries.
- Every apply is fenced: its commit expects the store's `LOG_SEQ_KEY` to hold the seq it applies
  after (`OnlineStore.write_batch(expect=...)`). A commit reported failed (a Redis timeout) may
  still land later; then the fence of the next apply fails, the true seq is read back from the
  store, and only the events after it are applied. So a stalled store never double-counts either.
  A store whose seq is *behind* lost data (a flush, an empty replica): nothing is written on top of
  it (which would also hide the loss from the readiness probe); the batch waits for the refill.
- Calls into the online features go through the engine's `StoreWorker` (off the event loop for
  Redis); applies are writes there: they wait for the store's answer, never a shorter timeout.
- `applied_lock` is held while applying; the server takes it to snapshot the store between batches.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

from featurizer.definitions import EVENT_CODE
from featurizer.erasure import Erasures
from featurizer.errors import SemrankError
from featurizer.online.features import OnlineFeatures
from featurizer.store.base import OnlineStoreError, WriteConflict
from serving.config import Limits
from serving.ingest.dedup import EventDedup
from serving.ingest.event_log import EventLog
from serving.ingest.log_format import LoggedEvent
from serving.ranking.store_worker import StoreWorker

log = logging.getLogger(__name__)

LOG_SEQ_KEY = "event_log"  # online-store meta row: the last event-log seq folded into the features


class EventsNotStored(SemrankError):
    """The event log could not store a batch: none of its events were stored; the caller may resend them."""

    grpc_code = "UNAVAILABLE"
    reason = "EVENTS_NOT_STORED"

    def __init__(self, message: str, stored_before: int):
        super().__init__(message)
        self.stored_before = stored_before

    def error_metadata(self) -> dict[str, str]:
        return {"stored_before": str(self.stored_before)}


class EventsNotApplied(SemrankError):
    """A batch is stored durably in the event log, but applying it to the online features failed."""

    grpc_code = "UNAVAILABLE"
    reason = "EVENTS_STORED_NOT_APPLIED"

    def __init__(self, message: str, stored: int):
        super().__init__(message)
        self.stored = stored

    def error_metadata(self) -> dict[str, str]:
        return {"stored": str(self.stored)}


def apply_logged(online: OnlineFeatures, events: Sequence[LoggedEvent], last_seq: int, after_seq: int | None,
                 key: str = LOG_SEQ_KEY) -> None:
    """Fold logged events (the seqs after `after_seq`, up to `last_seq`) into the online features and
    record `last_seq` as applied (meta row `key`), in one atomic commit, fenced: only if the store
    holds `after_seq` (else WriteConflict, nothing written). `after_seq` None: unfenced (a refill of
    a lost store). The JetStream fold uses its own `key` (serving.ingest.jetstream.seq_key)."""
    if last_seq == 0:
        return  # nothing logged: seq 0 is "no row" (see applied_seq), never written
    expect = None
    if after_seq:
        expect = ("meta", key, {"seq": after_seq})
    elif after_seq == 0:  # no row yet (or the {"seq": 0} that earlier versions wrote for an empty log)
        held = online.store.read("meta", [key])[0]
        expect = ("meta", key, held if held is not None and int(held["seq"]) == 0 else None)
    online.apply_columns([e.ts_us for e in events], [e.user_id for e in events], [e.item_id for e in events],
                         [EVENT_CODE[e.event] for e in events], meta={key: {"seq": last_seq}}, expect=expect)


def applied_seq(online: OnlineFeatures, key: str = LOG_SEQ_KEY) -> int:
    """The last event-log (or stream) seq the store's features hold (0: none)."""
    meta = online.store.read("meta", [key])[0]
    return int(meta["seq"]) if meta else 0


@dataclass(frozen=True)
class Logged:
    """What `EventIngest.log_events` did with a batch."""

    stored: int  # events appended and applied now
    duplicates: int  # events whose id was already stored (not stored again)
    last_seq: int  # the event log's seq of the last stored event (0: none stored by this batch)


def _now_us() -> int:
    return int(datetime.now(timezone.utc).timestamp() * 1e6)


APPLY_SLICE = 500  # events applied in one commit at most: the event loop is free between commits


class ApplySlices:
    """How many events the next commit takes: as many as fit `budget_ms` at the recent cost of an
    event (an exponential average over the commits measured), at least `min_events`, at most
    `max_events`. The event loop is free between commits, so however long a backlog or a fetch is,
    a Rank waits for at most about one slice (issue 30: writes never stall reads). The cost is
    measured, not assumed: it grows with the states an event touches (a flood's co-occurrence
    states grow as its users click): a fixed 500 would hold the loop 60-100 ms at the 120-200 µs an event
    cost under the serve bench's flood (bench/fold_profile.py)."""

    def __init__(self, budget_ms: float = Limits.apply_slice_ms, max_events: int = APPLY_SLICE, min_events: int = 8,
                 write_share: float = Limits.write_share, ranks_active: Callable[[], bool] = lambda: False):
        if budget_ms <= 0 or not 1 <= min_events <= max_events or not 0 < write_share <= 1:
            raise ValueError(f"ApplySlices needs budget_ms > 0, 1 <= min_events <= max_events and 0 < write_share <= 1, "
                             f"got {budget_ms}, {min_events}, {max_events}, {write_share}")
        self.budget_s, self.max_events, self.min_events = budget_ms / 1000, max_events, min_events
        self._per_event_s: float | None = None  # None: nothing measured yet (the first commit takes min_events)
        # The writes' share of the loop while Ranks are served (see `delay`).
        self.write_share, self.ranks_active = write_share, ranks_active
        self._next_at = 0.0  # perf_counter before which no commit starts while Ranks are served
        self.paused_s = 0.0  # time commits waited for the share, in all (a metric)

    def size(self) -> int:
        if self._per_event_s is None:
            return self.min_events
        return max(self.min_events, min(self.max_events, int(self.budget_s / self._per_event_s)))

    def record(self, events: int, seconds: float) -> None:
        """A commit of `events` took `seconds` (its fixed cost counts too: small commits look dear,
        which only keeps slices small)."""
        if events > 0:
            per = seconds / events
            self._per_event_s = per if self._per_event_s is None else 0.8 * self._per_event_s + 0.2 * per
        if self.write_share < 1:
            self._next_at = time.perf_counter() + seconds * (1 / self.write_share - 1)

    def delay(self) -> float:
        """Seconds the next commit must wait: while Ranks are being served (`ranks_active`), a commit
        that took t is followed by t * (1/write_share - 1) of the loop for everything else, so the
        fold takes at most `write_share` of the loop's time and a write flood queues its writes
        (LogEvents wait, then are refused past their caller's budget; a stream's fold lags)
        instead of the Ranks. With no Rank in flight, nothing waits."""
        if self.write_share >= 1:
            return 0.0
        left = self._next_at - time.perf_counter()
        return left if left > 0 and self.ranks_active() else 0.0

    async def gate(self) -> None:
        """Wait for `delay`, checked again after each wait (a Rank may come or go meanwhile)."""
        while (wait := self.delay()) > 0:
            self.paused_s += wait
            await asyncio.sleep(wait)

    async def pace(self, seconds: float) -> None:
        """After `seconds` of other write work on the loop (a snapshot's encoding slice,
        `SnapshotWrite.encode_slices`): the same share's pause, then the loop once more (the fold's
        commits and this work take `write_share` of the loop together)."""
        self.record(0, seconds)
        await self.gate()
        await asyncio.sleep(0)


async def wait_on(cond: asyncio.Condition, predicate: Callable[[], bool], timeout_s: float) -> None:
    """Wait until `predicate()` holds under `cond`, at most `timeout_s` in all: acquiring the
    condition's lock (which an apply may hold for a while) is inside the bound."""

    async def wait() -> None:
        async with cond:
            await cond.wait_for(predicate)

    try:
        await asyncio.wait_for(wait(), timeout_s)
    except asyncio.TimeoutError:
        pass


class EventIngest:
    """Deduplicate, durably append, then apply in order, atomically; see the module docstring."""

    def __init__(self, event_log: EventLog, online: OnlineFeatures, dedup: EventDedup | None = None,
                 clock_us=_now_us, worker: StoreWorker | None = None, slices: ApplySlices | None = None):
        self.event_log = event_log
        self.slices = slices if slices is not None else ApplySlices()
        self.online = online
        self.dedup = dedup if dedup is not None else EventDedup(0)  # (an empty one is falsy: it has a len)
        self.worker = worker if worker is not None else StoreWorker(online.store.remote)
        self._clock_us = clock_us
        if self.dedup.enabled:  # the ids of the window, from the log (the only record of them)
            now = clock_us()
            n = self.dedup.rebuild(event_log.events_since(now - self.dedup.window_us), now)
            log.info("deduplication window: %d event id(s) from the event log", n)
        self.applied_seq = event_log.last_seq  # the last seq whose apply has been attempted, in order
        self.committed_seq = event_log.last_seq  # the last seq the store's features hold (restore applied the log)
        self.applied_lock = asyncio.Condition()  # held while applying (and while snapshotting)
        self._waiting: dict[int, list[LoggedEvent]] = {}  # stored, not applied yet: first seq -> its events
        # Users erased on request (featurizer.erasure): their events are never applied, also those
        # accepted in the instant before the erasure began (serving.ingest.live_erasure).
        self.erasures: Erasures | None = None

    @property
    def behind(self) -> int:
        """Stored events whose features are not committed yet (the store failed; see the module docstring)."""
        return self.applied_seq - self.committed_seq

    def problem(self) -> str | None:
        """Why events cannot be taken now (for readiness): the local log has none of its own to report."""
        return None

    async def probe(self) -> str | None:
        """`problem`, after asking what events depend on (for the local log: nothing remote)."""
        return self.problem()

    async def wait_folded(self, seq: int, timeout_s: float) -> bool:
        """Wait until the store's features hold log seq `seq` (a LogEvents token), at most `timeout_s`:
        taking the lock counts too (an apply holds it), so the wait never outlasts the caller's deadline."""
        if self.committed_seq >= seq:
            return True
        await wait_on(self.applied_lock, lambda: self.committed_seq >= seq, timeout_s)
        return self.committed_seq >= seq

    def _commit_through(self, last_seq: int, batch: Sequence[LoggedEvent] = ()) -> int:
        """Apply every stored event after `committed_seq` up to `last_seq` (`batch`: the last of them,
        in memory; the rest is read back from the log) in one fenced commit. When the fence finds the
        store further on (a commit reported failed landed after all), the store's seq is taken and
        only what follows it is applied. On the store thread; returns the events committed."""
        for attempt in (1, 2):
            after = self.committed_seq
            first = last_seq - len(batch) + 1
            backlog = [e for s, e in self.event_log.replay(after) if s < first] if after < first - 1 else []
            events = backlog + list(batch[max(0, after + 1 - first):])
            if self.erasures:
                events = [e for e in events if e.user_id not in self.erasures]
            try:
                apply_logged(self.online, events, last_seq, after)
            except WriteConflict:
                store_seq = applied_seq(self.online)
                if store_seq < after:  # a flush, an empty replica: the refill (serving.readiness) applies it all
                    raise OnlineStoreError(f"the online store holds events up to seq {store_seq}, not {after}: it lost "
                                           "data and is refilled from the event log") from None
                if attempt == 2:
                    raise
                self.committed_seq = store_seq
                log.warning("the online store holds events up to seq %d, not %d (a commit reported failed landed "
                            "later): applying from there", self.committed_seq, after)
                if self.committed_seq >= last_seq:
                    return 0
                continue
            self.committed_seq = last_seq
            return len(events)
        raise AssertionError("unreachable")

    async def rebuild(self, data_events) -> int:
        """Refill a store that lost its state: the data directory's events, then the whole event log,
        committed with the log's last seq; on the store thread, under the apply lock (batches wait).
        Returns how many events it applied."""
        async with self.applied_lock:
            def refill() -> int:
                logged = [e for _, e in self.event_log.replay(0) if not self.erasures or e.user_id not in self.erasures]
                self.online.apply(data_events)
                apply_logged(self.online, logged, self.applied_seq, None)  # unfenced: the store was empty
                self.committed_seq = self.applied_seq
                return data_events.height + len(logged)

            n = await self.worker.write(refill)
            self.applied_lock.notify_all()
            return n

    async def catch_up(self) -> int:
        """Apply the backlog, if any; returns how many events it committed (0 when none, or when the
        store still fails: the next call or batch tries again)."""
        async with self.applied_lock:
            if self.committed_seq >= self.applied_seq:
                return 0
            try:
                n = await self.worker.write(self._commit_through, self.applied_seq)
            except Exception as e:  # noqa: BLE001 - still down; logged, retried later
                log.warning("online store still failing; %d stored event(s) wait to be applied (%s)", self.behind,
                            type(e).__name__)
                return 0
            self.applied_lock.notify_all()  # Ranks waiting for a token
            log.info("applied %d stored event(s) the online store had missed", n)
            return n

    async def log_events(self, batch: Sequence[LoggedEvent], stored_before: int = 0) -> Logged:
        """Drop the duplicates, durably append the rest, then apply in log order. Shielded: once
        appended, a batch is applied even if its caller goes away (later batches wait for it).
        `stored_before` (events of the same call stored earlier) goes into the error's details."""
        fresh, duplicates = self.dedup.reserve(batch, self._clock_us())  # claimed at once: no await before
        if not fresh:
            return Logged(0, duplicates, 0)
        seq = await asyncio.shield(asyncio.ensure_future(self._log_events(fresh, stored_before)))
        return Logged(len(fresh), duplicates, seq)

    async def _log_events(self, batch: list[LoggedEvent], stored_before: int) -> int:
        try:
            seq = await self.event_log.append_async(batch)
        except Exception as e:
            self.dedup.release(batch)  # not stored: a resend must be accepted
            log.exception("event log append failed")
            raise EventsNotStored(
                f"the event log could not store {len(batch)} event(s) ({type(e).__name__}); none of them were "
                f"stored ({stored_before} earlier event(s) of this call were); resend them", stored_before) from e
        first = seq - len(batch) + 1
        # Applied in order, in commits of the events that fit a slice (`ApplySlices`: a few ms), the
        # lock released and the event loop free between them. A commit takes every stored event
        # waiting in memory from the next seq on,
        # this call's and the calls' queued behind it: under a flood of small LogEvents calls one commit
        # applies many calls' events, so the fixed cost of a commit and the reads and writes of the keys
        # they share are paid once (bench/serve.py's heavy mix), and the queued calls find theirs applied.
        self._waiting[first] = list(batch)
        await asyncio.sleep(0)  # the calls whose appends finished with this one register theirs first
        failure: BaseException | None = None
        while self.applied_seq < seq:
            await self.slices.gate()  # the writes' share of the loop (`ApplySlices.delay`)
            async with self.applied_lock:
                await self.applied_lock.wait_for(lambda: self.applied_seq >= first - 1)
                if self.applied_seq >= seq:
                    break  # a commit of an earlier call took this call's events too
                if self.slices.delay() > 0:
                    continue  # another call's commit went first: wait for the share again, lock released
                start = self.applied_seq + 1
                events = self._take_waiting(start)
                through = start + len(events) - 1 if events else seq  # (none in memory: read back from the log)
                try:
                    began = time.perf_counter()
                    n = await self.worker.write(self._commit_through, through, events)
                    self.slices.record(n, time.perf_counter() - began)
                except Exception as e:  # noqa: BLE001 - told to every call whose events it held, below
                    log.warning("applying events %d-%d to the online features failed (%s: %s)", start, through,
                                type(e).__name__, e)
                    failure = e
                    through = max(through, seq)  # the rest of this batch is stored too: the backlog applies it later
                finally:
                    # Even if applying failed, the events are in the log; don't block every later batch behind this one.
                    self.applied_seq = max(self.applied_seq, through)
                    if failure is not None or not events:  # what the commit covered without taking it from memory
                        for k in [k for k in self._waiting if k <= through]:
                            del self._waiting[k]
                    self.applied_lock.notify_all()
            if self.applied_seq < seq:
                await asyncio.sleep(0)  # let Ranks run between commits
        if self.committed_seq < seq:  # this call's commit, or the one that took its events, failed
            raise EventsNotApplied(
                f"{len(batch)} event(s) were stored in the event log (do not resend them), but applying them "
                f"to the online features failed ({type(failure).__name__ if failure else 'OnlineStoreError'}); "
                "they are applied when the online store is back, and rankings do not reflect them until then",
                stored_before + len(batch)) from failure
        return seq

    def _take_waiting(self, start: int) -> list[LoggedEvent]:
        """Stored events waiting in memory from seq `start` on, in order and without a gap, at most a
        slice's (`ApplySlices.size`; a batch cut short is put back from its first event not taken)."""
        events: list[LoggedEvent] = []
        nxt, size = start, self.slices.size()
        while nxt in self._waiting and len(events) < size:
            part = self._waiting.pop(nxt)
            room = size - len(events)
            if len(part) > room:
                self._waiting[nxt + room] = part[room:]
                part = part[:room]
            events.extend(part)
            nxt += len(part)
        return events
