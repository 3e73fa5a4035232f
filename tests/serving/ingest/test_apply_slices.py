"""The fold's commits and the loop (serving/ingest/apply.py, `ApplySlices`; issue 30 item 4: writes
never stall reads): commits in slices sized by their measured cost, and the writes' share of the loop
while Ranks are served."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from featurizer.online.features import OnlineFeatures
from featurizer.store.in_process import InProcessStore
from serving.ingest.apply import EventIngest
from serving.ingest.dedup import EventDedup
from serving.ingest.event_log import EventLog
from serving.ingest.log_format import events_frame
from tests.serving.ingest.apply_crash_child import ITEMS, T0_US
from tests.serving.ingest.commit_spans import gap_ratios, timed_commits
from tests.serving.ingest.test_dedup import features


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

