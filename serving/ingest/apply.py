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
- `applied_lock` is held while applying; the server takes it to snapshot the store between batches.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

from featurizer.errors import SemrankError
from featurizer.online.features import OnlineFeatures
from serving.ingest.dedup import EventDedup
from serving.ingest.event_log import EventLog
from serving.ingest.log_format import LoggedEvent, events_frame

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


def apply_logged(online: OnlineFeatures, events: Sequence[LoggedEvent], last_seq: int) -> None:
    """Fold logged events into the online features and record `last_seq` as applied, in one atomic commit."""
    online.apply(events_frame(events), meta={LOG_SEQ_KEY: {"seq": last_seq}})


def applied_seq(online: OnlineFeatures) -> int:
    """The last event-log seq the store's features hold (0: none)."""
    meta = online.store.read("meta", [LOG_SEQ_KEY])[0]
    return int(meta["seq"]) if meta else 0


@dataclass(frozen=True)
class Logged:
    """What `EventIngest.log_events` did with a batch."""

    stored: int  # events appended and applied now
    duplicates: int  # events whose id was already stored (not stored again)
    last_seq: int  # the event log's seq of the last stored event (0: none stored by this batch)


def _now_us() -> int:
    return int(datetime.now(timezone.utc).timestamp() * 1e6)


class EventIngest:
    """Deduplicate, durably append, then apply in order, atomically; see the module docstring."""

    def __init__(self, event_log: EventLog, online: OnlineFeatures, dedup: EventDedup | None = None,
                 clock_us=_now_us):
        self.event_log = event_log
        self.online = online
        self.dedup = dedup if dedup is not None else EventDedup(0)  # (an empty one is falsy: it has a len)
        self._clock_us = clock_us
        if self.dedup.enabled:  # the ids of the window, from the log (the only record of them)
            now = clock_us()
            n = self.dedup.rebuild(event_log.events_since(now - self.dedup.window_us), now)
            log.info("deduplication window: %d event id(s) from the event log", n)
        self.applied_seq = event_log.last_seq  # the last seq whose apply has been attempted, in order
        self.committed_seq = event_log.last_seq  # the last seq the store's features hold (restore applied the log)
        self.applied_lock = asyncio.Condition()  # held while applying (and while snapshotting)

    @property
    def behind(self) -> int:
        """Stored events whose features are not committed yet (the store failed; see the module docstring)."""
        return self.applied_seq - self.committed_seq

    def _backlog(self, before: int) -> list[LoggedEvent]:
        """The stored events after `committed_seq` and before seq `before`, read back from the log."""
        return [e for s, e in self.event_log.replay(self.committed_seq) if s < before]

    async def rebuild(self, data_events) -> int:
        """Refill a store that lost its state: the data directory's events, then the whole event log,
        committed with the log's last seq; off the event loop, under the apply lock (batches wait).
        Returns how many events it applied."""
        async with self.applied_lock:
            logged = [e for _, e in self.event_log.replay(0)]

            def refill() -> None:
                self.online.apply(data_events)
                apply_logged(self.online, logged, self.applied_seq)

            await asyncio.to_thread(refill)
            self.committed_seq = self.applied_seq
            return data_events.height + len(logged)

    async def catch_up(self) -> int:
        """Apply the backlog, if any; returns how many events it committed (0 when none, or when the
        store still fails: the next call or batch tries again)."""
        async with self.applied_lock:
            if self.committed_seq >= self.applied_seq:
                return 0
            backlog = self._backlog(self.applied_seq + 1)
            try:
                apply_logged(self.online, backlog, self.applied_seq)
            except Exception as e:  # noqa: BLE001 - still down; logged, retried later
                log.warning("online store still failing; %d stored event(s) wait to be applied (%s)", len(backlog),
                            type(e).__name__)
                return 0
            self.committed_seq = self.applied_seq
            log.info("applied %d stored event(s) the online store had missed", len(backlog))
            return len(backlog)

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
        async with self.applied_lock:
            await self.applied_lock.wait_for(lambda: self.applied_seq == first - 1)
            try:
                backlog = self._backlog(first) if self.committed_seq < first - 1 else []
                apply_logged(self.online, backlog + batch, seq)
                self.committed_seq = seq
            except Exception as e:
                log.warning("applying events %d-%d to the online features failed (%s: %s)", first, seq,
                            type(e).__name__, e)
                raise EventsNotApplied(
                    f"{len(batch)} event(s) were stored in the event log (do not resend them), but applying them "
                    f"to the online features failed ({type(e).__name__}); they are applied when the online store "
                    "is back, and rankings do not reflect them until then", stored_before + len(batch)) from e
            finally:
                # Even if applying failed, the events are in the log; don't block every later batch behind this one.
                self.applied_seq = seq
                self.applied_lock.notify_all()
        return seq
