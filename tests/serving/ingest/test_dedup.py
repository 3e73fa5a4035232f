"""Exactly once for events with an event_id (serving/ingest/dedup.py, EventIngest): duplicates are
not stored or applied again, within a call, across calls, concurrently and across a restart."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np
import pytest

from featurizer.online.features import OnlineFeatures
from featurizer.store.in_process import InProcessStore
from serving.ingest.apply import EventIngest, EventsNotStored
from serving.ingest.dedup import BUCKET_US, EventDedup
from serving.ingest.event_log import EventLog
from serving.ingest.log_format import events_frame
from tests.serving.ingest.apply_crash_child import ITEMS, T0_US, batch

HOUR_US = 3_600_000_000


def test_known_ids_are_duplicates_and_events_without_an_id_never_are():
    dedup = EventDedup(window_s=86_400)
    events = batch(0)
    fresh, dupes = dedup.reserve(events, T0_US)
    assert fresh == events and dupes == 0
    no_id = [replace(e, event_id="") for e in events]
    again = [*events, events[0], *no_id]
    fresh, dupes = dedup.reserve(again, T0_US)
    assert fresh == no_id and dupes == len(events) + 1
    twice_in_one = [replace(events[0], event_id="x"), replace(events[1], event_id="x")]
    fresh, dupes = dedup.reserve(twice_in_one, T0_US)
    assert fresh == twice_in_one[:1] and dupes == 1


def test_released_claims_can_be_stored_again():
    dedup = EventDedup(window_s=86_400)
    fresh, _ = dedup.reserve(batch(0), T0_US)
    dedup.release(fresh)
    assert dedup.reserve(batch(0), T0_US) == (batch(0), 0)


def test_ids_leave_the_window_by_event_time():
    dedup = EventDedup(window_s=2 * 3600)
    old = [replace(e, ts_us=T0_US) for e in batch(0)]
    dedup.reserve(old, T0_US)
    assert dedup.reserve(old, T0_US + HOUR_US)[1] == len(old)  # within the window: duplicates
    assert len(dedup) == len(old)
    dedup.reserve([], T0_US + 4 * HOUR_US + BUCKET_US)  # time moves on: the old bucket is dropped
    assert len(dedup) == 0 and dedup.reserve(old, T0_US + 4 * HOUR_US)[1] == 0


def test_a_zero_window_turns_it_off():
    dedup = EventDedup(window_s=0)
    assert not dedup.enabled and dedup.reserve(batch(0), T0_US) == (batch(0), 0) and dedup.reserve(batch(0), T0_US)[1] == 0
    with pytest.raises(ValueError):
        EventDedup(window_s=-1)


def features(online: OnlineFeatures) -> np.ndarray:
    return np.stack([online.features(f"u{k}", ITEMS["item_id"].to_list(), online.watermark) for k in range(5)])


def reference(k_batches: int) -> np.ndarray:
    want = OnlineFeatures(InProcessStore(), ITEMS)
    want.apply(events_frame([e for k in range(k_batches) for e in batch(k)]))
    return features(want)


def test_concurrent_calls_with_the_same_ids_store_them_once_and_a_restart_remembers(tmp_path):
    clock = lambda: T0_US + 10 * HOUR_US  # noqa: E731 - the events are 10 h old: inside a 24 h window
    online = OnlineFeatures(InProcessStore(), ITEMS)

    async def first_run():
        with EventLog(tmp_path / "events") as log:
            ingest = EventIngest(log, online, EventDedup(86_400), clock_us=clock)
            results = await asyncio.gather(*(ingest.log_events(batch(k % 3)) for k in range(9)))
            return results, log.last_seq

    results, last = asyncio.run(first_run())
    assert sum(r.stored for r in results) == 3 * len(batch(0)) == last
    assert sum(r.duplicates for r in results) == 6 * len(batch(0))
    np.testing.assert_array_equal(features(online), reference(3))

    async def after_restart():
        with EventLog(tmp_path / "events") as log:
            ingest = EventIngest(log, online, EventDedup(86_400), clock_us=clock)  # rebuilt from the log
            return await ingest.log_events(batch(1) + batch(3)), log.last_seq

    logged, last = asyncio.run(after_restart())
    assert (logged.stored, logged.duplicates) == (len(batch(3)), len(batch(1))) and last == 4 * len(batch(0))
    np.testing.assert_array_equal(features(online), reference(4))


class FailingFirstAppend(EventLog):
    """Fault injection: the first append fails as a full disk would."""

    failed = False

    async def append_async(self, events):
        if not self.failed:
            self.failed = True
            raise OSError(28, "No space left on device")
        return await super().append_async(events)


def test_events_whose_append_failed_are_accepted_when_resent(tmp_path):
    online = OnlineFeatures(InProcessStore(), ITEMS)

    async def scenario():
        with FailingFirstAppend(tmp_path / "events") as log:
            ingest = EventIngest(log, online, EventDedup(86_400), clock_us=lambda: T0_US)
            with pytest.raises(EventsNotStored):
                await ingest.log_events(batch(0))
            return await ingest.log_events(batch(0))

    logged = asyncio.run(scenario())
    assert (logged.stored, logged.duplicates) == (len(batch(0)), 0)


def test_events_since_reads_back_only_the_recent_segments(tmp_path):
    with EventLog(tmp_path / "events", segment_bytes=2_000) as log:
        for k in range(30):
            log.append(batch(k))
        assert len(list((tmp_path / "events").glob("events-*.log"))) > 3
        cutoff = batch(25)[0].ts_us
        got = log.events_since(cutoff)
    assert sorted(e.event_id for e in got) == sorted(e.event_id for k in range(25, 30) for e in batch(k))


def test_a_token_wait_honours_its_timeout_while_an_apply_holds_the_lock(tmp_path):
    """Issue 30: a Rank's min_sequence wait took the apply lock before its timeout started, so a long
    apply (or a snapshot copy) made it miss the caller's deadline. Taking the lock is inside it now."""
    online = OnlineFeatures(InProcessStore(), ITEMS)

    async def scenario():
        with EventLog(tmp_path / "events") as log:
            ingest = EventIngest(log, online, EventDedup(0), clock_us=lambda: T0_US)
            async with ingest.applied_lock:  # a write that holds the lock until the wait has given up
                # (the outer bound only turns a regression, which waits for the lock forever, into a failure)
                return await asyncio.wait_for(ingest.wait_folded(ingest.committed_seq + 1, 0.2), 30)

    assert asyncio.run(scenario()) is False  # not applied, and answered within its own bound
