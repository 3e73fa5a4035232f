"""EventIngest when the online store fails: the batch stays stored (EventsNotApplied, with the count),
and the backlog reaches the features once, by the next batch or by catch_up(); also when a commit
reported failed had landed after all (the fence)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from featurizer.online.features import OnlineFeatures
from featurizer.store.base import OnlineStoreError
from featurizer.store.in_process import InProcessStore
from serving.ingest.apply import ApplySlices, EventIngest, EventsNotApplied, applied_seq
from serving.ingest.event_log import EventLog
from serving.ingest.log_format import events_frame
from tests.serving.ingest.apply_crash_child import ITEMS, batch


class FlakyStore(InProcessStore):
    """Fault injection: an in-process store whose writes fail while `down` is set."""

    down = False

    def write_batch(self, rows, expect=None):
        if self.down:
            raise OnlineStoreError("fault injection: the store is down")
        super().write_batch(rows, expect)


def features(online: OnlineFeatures) -> np.ndarray:
    at = online.watermark
    return np.stack([online.features(f"u{k}", ITEMS["item_id"].to_list(), at) for k in range(5)])


def assert_counted_once(online: OnlineFeatures, batches: int) -> None:
    """The features equal those of batches 0..batches-1 applied once each, in one go."""
    want = OnlineFeatures(InProcessStore(), ITEMS)
    want.apply(events_frame([e for k in range(batches) for e in batch(k)]))
    np.testing.assert_array_equal(features(online), features(want))


@pytest.mark.parametrize("recover_by", ["next batch", "catch_up"])
def test_events_stored_while_the_store_is_down_are_applied_once_when_it_is_back(tmp_path, recover_by):
    store = FlakyStore()
    online = OnlineFeatures(store, ITEMS)

    async def scenario():
        with EventLog(tmp_path / "events") as log:
            ingest = EventIngest(log, online)
            await ingest.log_events(batch(0))
            store.down = True
            for k in (1, 2):
                with pytest.raises(EventsNotApplied) as e:
                    await ingest.log_events(batch(k), stored_before=4)
                assert e.value.error_metadata() == {"stored": str(4 + len(batch(k)))}
            assert ingest.behind == 2 * len(batch(1))
            assert await ingest.catch_up() == 0  # still down: nothing committed, nothing lost
            store.down = False
            if recover_by == "next batch":
                await ingest.log_events(batch(3))
            else:
                assert await ingest.catch_up() == 2 * len(batch(1))
                await ingest.log_events(batch(3))
            assert ingest.behind == 0 and applied_seq(online) == log.last_seq

    asyncio.run(scenario())
    assert_counted_once(online, 4)


class LandsThenFails(InProcessStore):
    """Fault injection: the next write commits, then reports a failure (as a Redis reply lost to a
    timeout after the transaction ran)."""

    lie_next = False

    def write_batch(self, rows, expect=None):
        super().write_batch(rows, expect)
        if self.lie_next:
            self.lie_next = False
            raise OnlineStoreError("fault injection: the reply was lost after the commit")


@pytest.mark.parametrize("recover_by", ["next batch", "catch_up"])
def test_a_commit_reported_failed_that_landed_is_not_applied_twice(tmp_path, recover_by):
    store = LandsThenFails()
    online = OnlineFeatures(store, ITEMS)

    async def scenario():
        with EventLog(tmp_path / "events") as log:
            ingest = EventIngest(log, online)
            await ingest.log_events(batch(0))
            store.lie_next = True
            with pytest.raises(EventsNotApplied):
                await ingest.log_events(batch(1))
            assert ingest.behind == len(batch(1)) and applied_seq(online) == log.last_seq  # it did land
            if recover_by == "next batch":
                await ingest.log_events(batch(2))
            else:
                assert await ingest.catch_up() == 0  # the fence found the store at the log's end
                await ingest.log_events(batch(2))
            assert ingest.behind == 0 and applied_seq(online) == log.last_seq

    asyncio.run(scenario())
    assert_counted_once(online, 3)


def test_nothing_is_written_on_top_of_a_store_that_lost_its_data(tmp_path):
    """A batch after a flush must not recreate the state rows (that would hide the loss from the
    readiness probe and leave the features without the earlier events): the fence finds the store's
    seq behind, the batch is stored but not applied, and the store stays visibly lost."""
    store = InProcessStore()
    online = OnlineFeatures(store, ITEMS)

    async def scenario():
        with EventLog(tmp_path / "events") as log:
            ingest = EventIngest(log, online)
            await ingest.log_events(batch(0))
            for entity in ("meta", "item", "user", "ui", "cooc"):  # fault injection: FLUSHALL
                store.delete(entity, store.keys(entity))
            with pytest.raises(EventsNotApplied) as e:
                await ingest.log_events(batch(1))
            assert "lost data" in str(e.value.__cause__)
            assert online.store_lost_state() and store.keys("item") == []
            assert await ingest.rebuild(events_frame([])) == len(batch(0)) + len(batch(1))
            assert ingest.behind == 0 and not online.store_lost_state()

    asyncio.run(scenario())
    assert_counted_once(online, 2)


class CommitCounter(FlakyStore):
    """The in-process store, counting its commits (and failing them while `down`, as FlakyStore)."""

    commits = 0

    def write_batch(self, rows, expect=None):
        super().write_batch(rows, expect)
        self.commits += 1


async def queue_calls(ingest: EventIngest, log: EventLog, n: int, while_held=lambda: None) -> list[asyncio.Future]:
    """Start `n` LogEvents batches while the apply lock is held (as a commit or a snapshot holds it),
    wait until all of them are stored and waiting to be applied, call `while_held()`, then release the
    lock and return the calls."""
    async with ingest.applied_lock:
        calls = [asyncio.ensure_future(ingest.log_events(batch(k), stored_before=k)) for k in range(n)]
        want = sum(len(batch(k)) for k in range(n))
        while log.last_seq < want or sum(len(b) for b in ingest._waiting.values()) < want:
            await asyncio.sleep(0.01)
        while_held()
    return calls


def test_batches_queued_behind_a_commit_are_applied_in_one_commit(tmp_path):
    """Under a flood of small LogEvents calls, one commit applies every stored batch waiting in memory
    that fits its slice (bench/serve.py's heavy mix: 50 calls/s of 20 events each applied one by one
    starved the Ranks of the embedded default); each call still answers its own sequence, and every
    event counts once."""
    store = CommitCounter()
    online = OnlineFeatures(store, ITEMS)

    async def scenario():
        with EventLog(tmp_path / "events") as log:
            ingest = EventIngest(log, online, slices=ApplySlices(min_events=64))  # the 8 calls' events fit one slice
            before = store.commits
            calls = await queue_calls(ingest, log, 8)
            assert store.commits == before  # (nothing applied while the lock was held)
            logged = await asyncio.gather(*calls)
            assert store.commits - before == 1
            assert sorted(r.last_seq for r in logged) == [sum(len(batch(j)) for j in range(k + 1)) for k in range(8)]
            assert ingest.behind == 0 and applied_seq(online) == log.last_seq and not ingest._waiting

    asyncio.run(scenario())
    assert_counted_once(online, 8)


def test_every_call_whose_events_a_failed_commit_held_is_told(tmp_path):
    """A commit that takes several calls' events and fails answers EventsNotApplied to each of them
    (stored, not applied: never a success for events the features do not hold); the next batch
    applies them all once."""
    store = CommitCounter()
    online = OnlineFeatures(store, ITEMS)

    async def scenario():
        with EventLog(tmp_path / "events") as log:
            ingest = EventIngest(log, online)
            calls = await queue_calls(ingest, log, 4, while_held=lambda: setattr(store, "down", True))
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
            assert all(isinstance(o, EventsNotApplied) for o in outcomes), outcomes
            assert sorted(o.error_metadata()["stored"] for o in outcomes) == sorted(
                str(k + len(batch(k))) for k in range(4))
            assert ingest.behind == sum(len(batch(k)) for k in range(4)) and not ingest._waiting
            store.down = False
            await ingest.log_events(batch(4))
            assert ingest.behind == 0 and applied_seq(online) == log.last_seq

    asyncio.run(scenario())
    assert_counted_once(online, 5)
