"""serving.aio.cancel_and_wait: a task that swallows a cancel (as asyncio.wait_for on Python 3.11
can: python/cpython#86296) still ends, where one cancel and a gather would wait for ever."""

from __future__ import annotations

import asyncio

from serving.aio import cancel_and_wait


def test_a_loop_that_swallows_one_cancel_still_ends():
    swallowed = []

    async def poll_loop() -> None:  # stands in for a poll whose cancel a wait_for lost
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                if not swallowed:
                    swallowed.append(True)
                    continue
                raise

    async def failing() -> None:
        raise RuntimeError("ended with an error")

    async def main() -> None:
        tasks = [asyncio.ensure_future(poll_loop()), asyncio.ensure_future(failing())]
        await asyncio.sleep(0.01)
        await asyncio.wait_for(cancel_and_wait(tasks, every_s=0.05), 5)
        assert tasks[0].cancelled() and swallowed == [True]
        assert isinstance(tasks[1].exception(), RuntimeError)

    asyncio.run(main())
