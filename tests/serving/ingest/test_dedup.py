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
from tests.serving.ingest.commit_spans import gap_ratios, timed_commits

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


@pytest.mark.parametrize("slices", ["fixed", "timed"])
def test_a_large_batch_is_applied_in_slices_with_the_loop_free_between_them(tmp_path, monkeypatch, slices):
    """Issue 30 (writes never stall reads): a LogEvents message of 1,200 events is committed in slices
    (fixed: 500 events each; timed: the events that fit a few ms at the measured cost), and other
    tasks (a Rank) run between the slices; the features equal those of one apply, and the store
    holds the batch's last seq."""
    import serving.ingest.apply as apply_mod
    from serving.ingest.log_format import LoggedEvent

    events = [LoggedEvent(T0_US + k * 1_000_000, f"u{k % 5}", f"i{k % 11}", "click", event_id=f"big-{k}")
              for k in range(1200)]
    commits, ticks = [], []
    real = apply_mod.apply_logged
    monkeypatch.setattr(apply_mod, "apply_logged", lambda online, evs, last, after, **kw: (
        commits.append((len(evs), last, len(ticks))), real(online, evs, last, after, **kw))[1])
    online = OnlineFeatures(InProcessStore(), ITEMS)

    async def scenario():
        with EventLog(tmp_path / "events") as log:
            ingest = EventIngest(log, online, EventDedup(0), clock_us=lambda: T0_US,
                                 slices=apply_mod.ApplySlices(max_events=500, min_events=500) if slices == "fixed"
                                 else apply_mod.ApplySlices(budget_ms=2.0))

            async def other_work():  # stands in for Ranks on the same loop
                while True:
                    ticks.append(1)
                    await asyncio.sleep(0)

            task = asyncio.create_task(other_work())
            await asyncio.sleep(0)
            logged = await ingest.log_events(events)
            task.cancel()
            return logged

    logged = asyncio.run(scenario())
    if slices == "fixed":
        assert [(n, last) for n, last, _ in commits] == [(500, 500), (500, 1000), (200, 1200)]
    else:  # the first slice is the smallest (no cost measured yet), then sized by the measured cost
        assert commits[0][0] == 8 and len(commits) > 3 and all(n <= 500 for n, _, _ in commits), commits
    assert [last for _, last, _ in commits] == list(np.cumsum([n for n, _, _ in commits])) and logged.last_seq == 1200
    assert all(b[2] > a[2] for a, b in zip(commits, commits[1:]))  # the other task ran between slices
    want = OnlineFeatures(InProcessStore(), ITEMS)
    want.apply(events_frame(events))
    np.testing.assert_array_equal(features(online), features(want))


def test_apply_slices_fit_the_budget_at_the_measured_cost():
    from serving.ingest.apply import ApplySlices

    slices = ApplySlices(budget_ms=4.0, max_events=500, min_events=8)
    assert slices.size() == 8  # nothing measured yet
    slices.record(8, 8 * 100e-6)  # 100 µs per event: 40 fit in 4 ms
    assert slices.size() == 40
    for _ in range(50):
        slices.record(40, 40 * 1e-6)  # cheaper events: larger slices, up to the cap
    assert slices.size() == 500
    for _ in range(50):
        slices.record(10, 10 * 2e-3)  # dear events: never below the floor
    assert slices.size() == 8
    slices.record(0, 1.0)  # a commit of nothing measures nothing
    assert slices.size() == 8
    with pytest.raises(ValueError, match="budget_ms"):
        ApplySlices(budget_ms=0)
    from featurizer.errors import ConfigError
    from serving.config import Limits

    with pytest.raises(ConfigError, match="apply_slice_ms"):
        Limits(apply_slice_ms=0)


def test_the_write_share_spaces_commits_only_while_ranks_are_served():
    """Issue 30 item 4: with `write_share` s, a commit that took t is followed by t * (1/s - 1) in which
    no commit starts, but only while Ranks are being served; s = 1 never waits."""
    from featurizer.errors import ConfigError
    from serving.config import Limits
    from serving.ingest.apply import ApplySlices

    serving_ranks = {"now": True}
    slices = ApplySlices(write_share=0.25, ranks_active=lambda: serving_ranks["now"])
    assert slices.delay() == 0  # nothing committed yet
    slices.record(10, 0.02)
    assert 0.05 < slices.delay() <= 0.06  # 20 ms of commit: 60 ms for the Ranks
    serving_ranks["now"] = False
    assert slices.delay() == 0  # no Rank in flight: the fold runs at full speed
    unbounded = ApplySlices(write_share=1.0, ranks_active=lambda: True)
    unbounded.record(10, 0.02)
    assert unbounded.delay() == 0
    for bad in (0, 1.5, -0.1):
        with pytest.raises(ValueError, match="write_share"):
            ApplySlices(write_share=bad)
        with pytest.raises(ConfigError, match="write_share"):
            Limits(write_share=bad)


@pytest.mark.parametrize("ranks_served", [True, False])
def test_a_flood_of_calls_commits_within_the_write_share(tmp_path, monkeypatch, ranks_served):
    """Issue 30 item 4 (a write flood queues its writes, not the Ranks): 12 LogEvents calls of 50
    events at once, committed in slices of 100 with `write_share` 0.25. While Ranks are served, each
    commit starts at least 3x the previous commit's time after it ended, whichever call's loop made it
    (the calls queued behind the lock wait for the share too); with no Rank, nothing waits. Every
    event is applied either way, with the features of one apply of them all."""
    import serving.ingest.apply as apply_mod
    from serving.ingest.log_format import LoggedEvent

    calls = [[LoggedEvent(T0_US + (50 * c + k) * 1_000_000, f"u{k % 5}", f"i{(c + k) % 11}", "click",
                          event_id=f"flood-{c}-{k}") for k in range(50)] for c in range(12)]
    spans = timed_commits(monkeypatch, apply_mod)
    online = OnlineFeatures(InProcessStore(), ITEMS)
    slices = apply_mod.ApplySlices(max_events=100, min_events=100, write_share=0.25, ranks_active=lambda: ranks_served)

    async def scenario():
        with EventLog(tmp_path / "events") as log:
            ingest = EventIngest(log, online, EventDedup(0), clock_us=lambda: T0_US, slices=slices)
            return await asyncio.gather(*(ingest.log_events(c) for c in calls))

    logged = asyncio.run(scenario())
    assert sum(x.stored for x in logged) == 600 and max(x.last_seq for x in logged) == 600
    sizes = [n for _, _, n in spans]
    # Slices of 100: the queued calls' events merge into full commits. How many commits is timing (a
    # call whose append finished first may commit its 50 alone before the rest are stored), not a rule.
    assert sum(sizes) == 600 and max(sizes) == 100, sizes
    gaps = gap_ratios(spans)
    if ranks_served:
        assert min(gaps) >= 3.0 * 0.999 and slices.paused_s > 0, gaps
    else:
        assert slices.paused_s == 0
    want = OnlineFeatures(InProcessStore(), ITEMS)
    want.apply(events_frame([e for c in calls for e in c]))
    np.testing.assert_array_equal(features(online), features(want))
