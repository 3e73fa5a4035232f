"""Keep answering when Triton misbehaves: a circuit breaker and a deadline/retry wrapper for the encoder.

* `CircuitBreaker` counts failures and, once Triton looks down, makes callers fail fast
  (no network) for `open_s`, then lets one probe call through to see if it is back.
* `ResilientEncoder` wraps an `EncoderClient`: one overall deadline per call, a retry of
  transient errors when time remains, and the breaker's bookkeeping. It raises
  `EncoderUnavailable` quickly, so the request path can answer degraded instead of waiting.

Both accept an optional observer so metrics can be attached without touching this code.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import Protocol

import numpy as np

from serving.triton.client import EncoderClient, EncoderUnavailable

log = logging.getLogger(__name__)

CIRCUIT_OPEN = "CIRCUIT_OPEN"  # the `code` of CircuitOpenError and the `error` reported to observers
CALLER_DEADLINE = "CALLER_DEADLINE"  # reported for a timeout the breaker does not count (budget below the floor)
# The attempt's own gRPC deadline normally fires first; this local timeout only guards
# against a call that would otherwise hang (it cancels the attempt).
_LOCAL_TIMEOUT_SLACK_S = 0.01
# A retry with less time left than this cannot succeed; don't send it.
MIN_ATTEMPT_S = 0.002


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitOpenError(EncoderUnavailable):
    """The circuit breaker is open: Triton failed recently, so the call was not sent."""

    def __init__(self, message: str):
        super().__init__(message, code=CIRCUIT_OPEN, transient=True)


class CircuitBreaker:
    """closed -> open after `failure_threshold` consecutive failures within `window_s`;
    open -> half_open after `open_s`; half_open lets ONE probe call through: success
    closes, failure re-opens with `open_s` doubled (up to `max_open_s`).

    Consecutive, not "N failures in the window": at thousands of calls per second a
    healthy server with a 0.1% error rate would pass any small count-in-window threshold,
    whereas N failures in a row with no success between them means nothing gets through.
    The window makes old failures expire: 5 failures spread over an hour do not open it.
    (A server failing every other call never opens the breaker; the deadline bounds those calls.)

    Outcomes that arrive while open (calls that started before it opened) are ignored.
    `allow()` must be followed by `record_success()`, `record_failure()` or, when the call
    ended with neither (cancelled, bad input), `release()`, or a half-open breaker keeps
    waiting for its probe. Thread-safe; callbacks run outside the lock and must not raise
    (exceptions are logged and dropped).
    """

    def __init__(
        self,
        failure_threshold: int = 5,
        window_s: float = 10.0,
        open_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        max_open_s: float = 30.0,
        on_state_change: Callable[[BreakerState, BreakerState], None] | None = None,
    ):
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold={failure_threshold} must be >= 1")
        if window_s <= 0 or open_s <= 0:
            raise ValueError(f"window_s={window_s} and open_s={open_s} must be > 0")
        if max_open_s < open_s:
            raise ValueError(f"max_open_s={max_open_s} must be >= open_s={open_s}")
        self.failure_threshold = failure_threshold
        self.window_s = window_s
        self.open_s = open_s
        self.max_open_s = max_open_s
        self.clock = clock
        self.opened_count = 0  # how many times it went to open (from closed or from a failed probe)
        self._state = BreakerState.CLOSED
        self._failures: deque[float] = deque()  # times of the current run of consecutive failures
        self._opened_at = 0.0
        self._current_open_s = open_s
        self._probe_in_flight = False
        self._listeners: list[Callable[[BreakerState, BreakerState], None]] = []
        self._lock = threading.Lock()
        if on_state_change is not None:
            self.subscribe(on_state_change)

    def subscribe(self, fn: Callable[[BreakerState, BreakerState], None]) -> None:
        """Call fn(old_state, new_state) on every transition."""
        self._listeners.append(fn)

    @property
    def state(self) -> BreakerState:
        with self._lock:
            change = self._tick()
            state = self._state
        self._notify(change)
        return state

    @property
    def current_open_s(self) -> float:
        """How long the breaker stays open this time (open_s, doubled per failed probe)."""
        return self._current_open_s

    def allow(self) -> bool:
        """May a call go out now? In half_open, True exactly once (the probe) until its outcome is recorded."""
        with self._lock:
            change = self._tick()
            if self._state is BreakerState.CLOSED:
                ok = True
            elif self._state is BreakerState.HALF_OPEN and not self._probe_in_flight:
                self._probe_in_flight = ok = True
            else:
                ok = False
        self._notify(change)
        return ok

    def record_success(self) -> None:
        with self._lock:
            change = None
            self._failures.clear()
            if self._state is BreakerState.HALF_OPEN:
                self._current_open_s = self.open_s
                change = self._set(BreakerState.CLOSED)
        self._notify(change)

    def record_failure(self) -> None:
        with self._lock:
            now = self.clock()
            change = None
            if self._state is BreakerState.HALF_OPEN:
                self._current_open_s = min(2 * self._current_open_s, self.max_open_s)
                change = self._open(now)
            elif self._state is BreakerState.CLOSED:
                self._failures.append(now)
                while self._failures and self._failures[0] <= now - self.window_s:
                    self._failures.popleft()
                if len(self._failures) >= self.failure_threshold:
                    change = self._open(now)
        self._notify(change)

    def release(self) -> None:
        """The probe ended without telling anything about Triton: let the next caller probe."""
        with self._lock:
            self._probe_in_flight = False

    # -- internals (called with the lock held; they return the transition to notify)
    def _tick(self) -> tuple[BreakerState, BreakerState] | None:
        if self._state is BreakerState.OPEN and self.clock() - self._opened_at >= self._current_open_s:
            return self._set(BreakerState.HALF_OPEN)
        return None

    def _open(self, now: float) -> tuple[BreakerState, BreakerState]:
        self._opened_at = now
        self._failures.clear()
        self.opened_count += 1
        return self._set(BreakerState.OPEN)

    def _set(self, new: BreakerState) -> tuple[BreakerState, BreakerState]:
        old, self._state = self._state, new
        self._probe_in_flight = False
        log.log(logging.WARNING if new is BreakerState.OPEN else logging.INFO, "encoder circuit breaker %s -> %s", old, new)
        return old, new

    def _notify(self, change: tuple[BreakerState, BreakerState] | None) -> None:
        if change is None:
            return
        for fn in list(self._listeners):
            try:
                fn(*change)
            except Exception:
                log.exception("circuit breaker listener %r failed on %s -> %s", fn, *change)

    def __repr__(self) -> str:
        return f"CircuitBreaker({self._state}, opened {self.opened_count}x, failures {len(self._failures)}/{self.failure_threshold})"


class EncoderObserver(Protocol):
    """What ResilientEncoder reports; e.g. Prometheus counters/histograms. Must not raise."""

    def on_call(self, ok: bool, seconds: float, error: str | None) -> None: ...

    def on_breaker(self, state: str) -> None: ...


class ResilientEncoder:
    """`await ResilientEncoder(client, breaker).encode(texts)`: embeddings, or `EncoderUnavailable` fast.

    `deadline_s` is the budget of one `encode()` call, retries and back-off included. Each
    attempt gets min(`attempt_timeout_s`, time left) as its gRPC deadline (`attempt_timeout_s`
    defaults to `deadline_s`). A failed attempt is retried, at most `retries` times, only when
    its error is transient (`EncoderUnavailable.transient`: UNAVAILABLE, which covers a refused
    or reset connection, and DEADLINE_EXCEEDED) and at least MIN_ATTEMPT_S remains after the
    back-off. So a DEADLINE_EXCEEDED is retried only if `attempt_timeout_s` < `deadline_s`
    left time for another try; with the defaults it is not. Permanent errors (model not found,
    a reply of the wrong shape) are not retried.

    The breaker sees one outcome per call (not per attempt), and counts only Triton's own
    failures: an error status from Triton, or a timeout of a call whose budget was at least
    `min_counted_timeout_s`. A timeout of a call with less (the caller's own short deadline,
    e.g. little left of its gRPC deadline) says nothing about Triton and is not counted, nor
    is a caller's mistake (TypeError) or a cancellation. So no caller can open the breaker for
    the others by sending short deadlines. While the breaker is open, calls raise `CircuitOpenError` without touching the
    client. An empty list returns (0, dim) without a call, whatever the breaker says.
    """

    def __init__(
        self,
        client: EncoderClient,
        breaker: CircuitBreaker,
        deadline_s: float = 0.05,
        retries: int = 1,
        backoff_s: float = 0.005,
        observer: EncoderObserver | None = None,
        attempt_timeout_s: float | None = None,
        bulk_timeout_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        min_counted_timeout_s: float = 0.05,
    ):
        if deadline_s <= 0 or bulk_timeout_s <= 0:
            raise ValueError(f"deadline_s={deadline_s} and bulk_timeout_s={bulk_timeout_s} must be > 0")
        if retries < 0 or backoff_s < 0:
            raise ValueError(f"retries={retries} and backoff_s={backoff_s} must be >= 0")
        if attempt_timeout_s is not None and not 0 < attempt_timeout_s <= deadline_s:
            raise ValueError(f"attempt_timeout_s={attempt_timeout_s} must be in (0, deadline_s={deadline_s}]")
        self.client = client
        self.breaker = breaker
        self.deadline_s = deadline_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.attempt_timeout_s = attempt_timeout_s or deadline_s
        self.bulk_timeout_s = bulk_timeout_s
        self.min_counted_timeout_s = min_counted_timeout_s
        self.observer = observer
        self.clock = clock
        # The bulk lane (encode_bulk): its chunks wait while calls of the request path are in flight,
        # so those never queue behind more than the chunks already sent; and a request-path timeout
        # while bulk chunks were in flight is queueing behind this process's own volume, not Triton
        # failing: the breaker does not count it.
        self._interactive = 0
        self._no_interactive = asyncio.Event()
        self._no_interactive.set()
        self._bulk_in_flight = 0
        self._bulk_active_until = float("-inf")  # clock() when the last bulk chunk finished
        if observer is not None:
            breaker.subscribe(self._on_breaker)

    async def encode(self, texts: list[str], timeout_s: float | None = None) -> np.ndarray:
        """float32 (len(texts), dim) within `deadline_s` (or the caller's smaller `timeout_s`, e.g.
        what is left of its gRPC deadline), or EncoderUnavailable (CircuitOpenError when open)."""
        self._interactive += 1
        self._no_interactive.clear()
        try:
            return await self._encode(texts, timeout_s)
        finally:
            self._interactive -= 1
            if not self._interactive:
                self._no_interactive.set()

    async def _encode(self, texts: list[str], timeout_s: float | None) -> np.ndarray:
        budget = self.deadline_s if timeout_s is None else min(self.deadline_s, timeout_s)
        started = self.clock()

        async def attempts() -> np.ndarray:
            deadline = self.clock() + budget
            attempt = 0
            while True:
                timeout = min(self.attempt_timeout_s, deadline - self.clock())
                try:
                    return await self._attempt(texts, timeout)
                except EncoderUnavailable as e:
                    attempt += 1
                    left = deadline - self.clock() - self.backoff_s
                    if not e.transient or attempt > self.retries or left < MIN_ATTEMPT_S:
                        raise
                    log.debug("encoder attempt %d failed (%s); retrying, %.0f ms left", attempt, e.code, 1e3 * left)
                    last = e
                await asyncio.sleep(self.backoff_s)
                if deadline - self.clock() < MIN_ATTEMPT_S:  # the back-off overran (busy event loop)
                    raise last

        def counts() -> bool:  # judged when the call failed: did it wait behind this process's bulk work?
            behind_bulk = self._bulk_in_flight > 0 or self._bulk_active_until >= started
            return budget >= self.min_counted_timeout_s and not behind_bulk

        return await self._guarded(texts, attempts, timeouts_count=counts)

    async def encode_bulk(self, texts: list[str], max_in_flight: int = 2, max_yield_s: float = 0.5) -> np.ndarray:
        """Start-up, UpsertItems and batch jobs: chunks of the client's batch size, `max_in_flight` at
        once, each with `bulk_timeout_s` and no retries, through the breaker (fails fast when open; its
        outcome is counted). The bulk lane: each chunk first waits (at most `max_yield_s`) until no
        request-path call is in flight, so Ranks' texts go first. A bulk call can be the half-open
        probe; the breaker then waits for it (up to bulk_timeout_s)."""
        size = max(1, getattr(self.client, "max_batch_size", 64))
        chunks = [texts[i : i + size] for i in range(0, len(texts), size)]
        gate = asyncio.Semaphore(max_in_flight)

        async def one(chunk: list[str]) -> np.ndarray:
            async with gate:
                try:
                    await asyncio.wait_for(self._no_interactive.wait(), max_yield_s)
                except asyncio.TimeoutError:
                    pass  # (a steady request-path load: bulk work still moves, one chunk at a time)
                self._bulk_in_flight += 1
                try:
                    return await self.client.encode_bulk(chunk, timeout_s=self.bulk_timeout_s, max_in_flight=1)
                finally:
                    self._bulk_in_flight -= 1
                    self._bulk_active_until = self.clock()

        async def all_chunks() -> np.ndarray:
            tasks = [asyncio.ensure_future(one(c)) for c in chunks]
            try:
                parts = await asyncio.gather(*tasks)
            except BaseException:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
            return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)

        return await self._guarded(texts, all_chunks)

    async def _attempt(self, texts: list[str], timeout: float) -> np.ndarray:
        try:
            async with asyncio.timeout(timeout + _LOCAL_TIMEOUT_SLACK_S):
                return await self.client.encode(texts, timeout_s=timeout)
        except TimeoutError as e:
            raise EncoderUnavailable(
                f"encoder call of {len(texts)} texts to {self.client.url} did not finish within {timeout * 1e3:.0f} ms; "
                f"Triton is overloaded or unreachable (raise deadline_s if this is the normal latency)",
                code="DEADLINE_EXCEEDED",
            ) from e

    async def _guarded(self, texts: list[str], call: Callable[[], Awaitable[np.ndarray]],
                       timeouts_count: Callable[[], bool] = lambda: True) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.client.dim), dtype=np.float32)
        if not self.breaker.allow():
            self._report(False, 0.0, CIRCUIT_OPEN)
            raise CircuitOpenError(
                f"encoder at {self.client.url} is failing; the circuit breaker is open, so the call was not sent "
                f"(it retries in <= {self.breaker.current_open_s:.1f}s). Answer without embeddings meanwhile."
            )
        probe = self.breaker.state is BreakerState.HALF_OPEN  # allow() let exactly this call through
        t0 = self.clock()
        try:
            out = await call()
        except EncoderUnavailable as e:
            if e.code == "DEADLINE_EXCEEDED" and not timeouts_count():  # a short budget, or queued behind our bulk work
                if probe:
                    self.breaker.release()
                self._report(False, self.clock() - t0, CALLER_DEADLINE)
                raise
            self.breaker.record_failure()
            self._report(False, self.clock() - t0, e.code or type(e).__name__)
            raise
        except BaseException:  # cancelled, or the caller's mistake: says nothing about Triton
            if probe:
                self.breaker.release()
            raise
        self.breaker.record_success()
        self._report(True, self.clock() - t0, None)
        return out

    def _report(self, ok: bool, seconds: float, error: str | None) -> None:
        if self.observer is None:
            return
        try:
            self.observer.on_call(ok, seconds, error)
        except Exception:
            log.exception("encoder observer %r failed in on_call", self.observer)

    def _on_breaker(self, old: BreakerState, new: BreakerState) -> None:  # noqa: ARG002
        self.observer.on_breaker(str(new))
