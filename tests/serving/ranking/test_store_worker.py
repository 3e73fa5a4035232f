"""StoreWorker: calls into a remote online store never block the event loop; reads are bounded,
writes are waited for and never abandoned."""

from __future__ import annotations

import asyncio
import threading

import pytest

from featurizer.store.base import OnlineStoreError
from serving.ranking.store_worker import StoreWorker


def test_a_memory_store_runs_calls_inline():
    worker = StoreWorker(remote=False)
    caller = threading.get_ident()

    async def scenario():
        assert await worker.read(threading.get_ident) == caller
        assert await worker.write(threading.get_ident) == caller

    asyncio.run(scenario())


def test_a_remote_store_runs_calls_on_one_thread_of_its_own():
    worker = StoreWorker(remote=True)

    async def scenario():
        ids = {await worker.read(threading.get_ident) for _ in range(3)} | {await worker.write(threading.get_ident)}
        assert len(ids) == 1 and threading.get_ident() not in ids

    asyncio.run(scenario())
    worker.close()


def test_reads_are_bounded_while_the_store_hangs_and_the_loop_stays_free():
    worker = StoreWorker(remote=True, read_timeout_s=0.05, max_waiting=4)
    release = threading.Event()

    async def scenario():
        ticks = 0

        async def ticker():  # runs only if the loop is free
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)

        tick = asyncio.create_task(ticker())
        with pytest.raises(OnlineStoreError, match="did not answer within 50 ms"):
            await worker.read(release.wait)  # the store hangs
        assert ticks > 0
        with pytest.raises(OnlineStoreError, match="not answering"):
            await worker.read(int)  # the thread is stuck in an older call: fail at once, queue nothing
        assert worker.waiting == 1
        release.set()
        while worker.waiting:  # the hung call returns
            await asyncio.sleep(0.001)
        assert await worker.read(int, "7") == 7  # answers again
        tick.cancel()

    asyncio.run(scenario())
    worker.close()


def test_reads_past_max_waiting_fail_at_once():
    worker = StoreWorker(remote=True, read_timeout_s=5.0, max_waiting=2)
    release = threading.Event()

    async def scenario():
        first = asyncio.ensure_future(worker.read(release.wait))
        second = asyncio.ensure_future(worker.read(int))
        await asyncio.sleep(0.05)
        with pytest.raises(OnlineStoreError, match="2 calls already wait"):
            await worker.read(int)
        release.set()
        assert await first is True and await second == 0

    asyncio.run(scenario())
    worker.close()


def test_a_write_runs_to_the_end_even_when_its_caller_is_cancelled():
    worker = StoreWorker(remote=True, read_timeout_s=0.01)
    release, done = threading.Event(), threading.Event()

    def write():
        release.wait()
        done.set()

    async def scenario():
        task = asyncio.ensure_future(worker.write(write))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()

    asyncio.run(scenario())
    worker.close()  # waits for the running call
    assert done.is_set()


def test_bad_limits_are_refused():
    with pytest.raises(ValueError, match="read_timeout_s > 0"):
        StoreWorker(remote=True, read_timeout_s=0)
