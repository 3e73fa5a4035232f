"""asyncio helpers the serving process shares."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable


async def cancel_and_wait(tasks: Iterable[asyncio.Task], every_s: float = 1.0) -> None:
    """Cancel `tasks` and return once every one is done, cancelling again every `every_s` those
    that are not. On Python 3.11 `asyncio.wait_for` can swallow a cancel that lands as its wait
    ends (python/cpython#86296), and nats-py's requests and fetches wait through it: a polling loop
    whose cancel was swallowed would poll on, and a single cancel-and-gather would wait for ever
    (a server's stop did, under the suite's load)."""
    tasks = list(tasks)
    pending = {t for t in tasks if not t.done()}
    while pending:
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=every_s)
    for t in tasks:
        if not t.cancelled():
            t.exception()  # (retrieved: no "exception was never retrieved" at exit)
