"""Calls into the online features that never block the event loop.

    worker = StoreWorker(online.store.remote, read_timeout_s=0.25)
    rows = await worker.read(online.features, user_id, item_ids, t, timeout_s=0.1)  # bounded
    await worker.write(apply_batch)                                                # waits for the outcome

The Redis client is synchronous: called on the event loop, a hung Redis (SIGSTOPped, or a network
that drops packets) would freeze the whole server, health checks included, for the socket
timeout of every call, while calls queue up. So when the store is `remote`, every call into
`OnlineFeatures` (which is not thread-safe: one caller at a time) runs on one thread of its own;
with the in-process store (memory, microseconds) calls run inline, as before.

- `read` is bounded. It waits at most `read_timeout_s` (or the caller's shorter `timeout_s`), and
  fails at once while the thread is stuck in a call older than that, or when `max_waiting` calls
  are queued already; the error is an `OnlineStoreError`, which a Rank turns into a degraded
  answer. A read that timed out before it started is dropped from the queue.
- `write` waits for the outcome however long the store takes (its socket timeout bounds that) and
  is never abandoned, even if its caller is cancelled: answering "not applied" for a write that
  may still land is the double-count this module exists to prevent (`serving.ingest.apply` fences
  its writes as well).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from featurizer.store.base import OnlineStoreError

T = TypeVar("T")


class StoreWorker:
    def __init__(self, remote: bool, read_timeout_s: float = 0.25, max_waiting: int = 256):
        if read_timeout_s <= 0 or max_waiting < 1:
            raise ValueError(f"StoreWorker needs read_timeout_s > 0 and max_waiting >= 1, got {read_timeout_s}, {max_waiting}")
        self.read_timeout_s, self.max_waiting = read_timeout_s, max_waiting
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="online-store") if remote else None
        self._lock = threading.Lock()
        self._waiting = 0  # submitted and not finished
        self._running_since: float | None = None  # monotonic start of the call on the thread

    @property
    def waiting(self) -> int:
        return self._waiting

    def stuck_s(self) -> float:
        """How long the call now on the thread has run (0: none is running)."""
        since = self._running_since
        return 0.0 if since is None else time.monotonic() - since

    def _submit(self, fn: Callable[..., T], args: tuple) -> Future:
        def run() -> T:
            self._running_since = time.monotonic()
            try:
                return fn(*args)
            finally:
                self._running_since = None

        def done(_: Future) -> None:
            with self._lock:
                self._waiting -= 1

        with self._lock:
            self._waiting += 1
        future = self._pool.submit(run)
        future.add_done_callback(done)  # also runs when a queued read is cancelled
        return future

    async def read(self, fn: Callable[..., T], *args, timeout_s: float | None = None) -> T:
        """fn(*args) within the read timeout, else OnlineStoreError (see the module docstring)."""
        if self._pool is None:
            return fn(*args)
        limit = self.read_timeout_s if timeout_s is None else max(0.0, min(timeout_s, self.read_timeout_s))
        stuck = self.stuck_s()
        if stuck > self.read_timeout_s:
            raise OnlineStoreError(f"the online store is not answering (its current call has waited {stuck:.1f} s)")
        if self._waiting >= self.max_waiting:
            raise OnlineStoreError(f"{self._waiting} calls already wait for the online store (max_store_waiting)")
        try:
            return await asyncio.wait_for(asyncio.wrap_future(self._submit(fn, args)), limit)
        except asyncio.TimeoutError:
            raise OnlineStoreError(f"the online store did not answer within {limit * 1000:.0f} ms") from None

    async def write(self, fn: Callable[..., T], *args) -> T:
        """fn(*args), however long it takes; it runs to the end even if the caller is cancelled."""
        if self._pool is None:
            return fn(*args)
        return await asyncio.shield(asyncio.wrap_future(self._submit(fn, args)))

    def close(self) -> None:
        """Drop queued calls and wait for the running one (a write must finish before the store closes)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
