"""CircuitBreaker and ResilientEncoder with a fault-injecting fake client (the real Triton run is in
tests/integration/test_resilience_triton.py)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from serving.triton.client import EncoderClient, EncoderUnavailable, grpc_code_name
from serving.triton.process import free_port
from serving.triton.resilience import (
    CIRCUIT_OPEN,
    BreakerState,
    CircuitBreaker,
    CircuitOpenError,
    ResilientEncoder,
)

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN
DIM = 4


class FakeClock:
    def __init__(self, now: float = 100.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def unavailable(code: str = "UNAVAILABLE") -> EncoderUnavailable:
    return EncoderUnavailable(f"injected {code}", code=code)


class FaultInjectingEncoderFake:
    """Stands in for EncoderClient; each call takes the next scripted fault (then succeeds):

    * an EncoderUnavailable: raised;
    * ("slow", s): takes s seconds, but like gRPC gives up at its timeout_s with DEADLINE_EXCEEDED;
    * "hang": never returns and ignores timeout_s (only cancellation stops it);
    * ("advance", s, then): moves `clock` by s (time passing without sleeping), then does `then`.
    """

    url = "fake:0"

    def __init__(self, *faults, clock: FakeClock | None = None):
        self.faults = list(faults)
        self.clock = clock
        self.dim = DIM
        self.calls: list[dict] = []
        self.cancelled = 0

    async def encode(self, texts, timeout_s=None, max_in_flight=None):
        self.calls.append({"n": len(texts), "timeout_s": timeout_s, "max_in_flight": max_in_flight})
        return await self._do(self.faults.pop(0) if self.faults else None, texts, timeout_s)

    async def encode_bulk(self, texts, timeout_s=300.0, max_in_flight=2):
        return await self.encode(texts, timeout_s=timeout_s, max_in_flight=max_in_flight)

    async def _do(self, fault, texts, timeout_s):
        if isinstance(fault, tuple) and fault[0] == "advance":
            self.clock.advance(fault[1])
            fault = fault[2]
        if isinstance(fault, BaseException):
            raise fault
        if isinstance(fault, tuple) and fault[0] == "slow":
            await asyncio.sleep(min(fault[1], timeout_s))
            if fault[1] > timeout_s:
                raise unavailable("DEADLINE_EXCEEDED")
        if fault == "hang":
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        return np.full((len(texts), DIM), 0.5, dtype=np.float32)


class RecordingObserver:
    def __init__(self):
        self.calls: list[tuple[bool, float, str | None]] = []
        self.states: list[str] = []

    def on_call(self, ok, seconds, error):
        self.calls.append((ok, seconds, error))

    def on_breaker(self, state):
        self.states.append(state)


def run(coro):
    return asyncio.run(coro)


def fail_n(breaker: CircuitBreaker, n: int) -> None:
    for _ in range(n):
        assert breaker.allow()
        breaker.record_failure()


# ---------------------------------------------------------------- CircuitBreaker


def test_opens_after_threshold_consecutive_failures_and_reports_transitions():
    changes = []
    b = CircuitBreaker(failure_threshold=3, clock=FakeClock(), on_state_change=lambda old, new: changes.append((old, new)))
    fail_n(b, 2)
    assert b.state == "closed" and b.opened_count == 0
    fail_n(b, 1)
    assert b.state == "open" and b.opened_count == 1
    assert not b.allow()
    assert changes == [(CLOSED, OPEN)]


def test_a_success_resets_the_run_of_failures():
    b = CircuitBreaker(failure_threshold=3, clock=FakeClock())
    for _ in range(3):
        fail_n(b, 2)
        b.record_success()
    assert b.state is CLOSED


def test_failures_older_than_the_window_expire():
    clock = FakeClock()
    b = CircuitBreaker(failure_threshold=3, window_s=10.0, clock=clock)
    for t in (0, 6, 6):  # at t=12 the failure at t=0 is out of the window
        clock.advance(t)
        fail_n(b, 1)
    assert b.state is CLOSED
    clock.advance(1)
    fail_n(b, 1)  # t=13: failures at 6, 12, 13
    assert b.state is OPEN


def test_open_then_half_open_lets_one_probe_and_success_closes():
    clock = FakeClock()
    changes = []
    b = CircuitBreaker(failure_threshold=1, open_s=2.0, clock=clock, on_state_change=lambda o, n: changes.append(n))
    fail_n(b, 1)
    clock.advance(1.99)
    assert not b.allow() and b.state is OPEN
    clock.advance(0.01)
    assert b.state is HALF_OPEN
    assert b.allow()  # the probe
    assert not b.allow() and not b.allow()  # everyone else still fails fast
    b.record_success()
    assert b.state is CLOSED and b.allow() and b.allow()
    assert changes == [OPEN, HALF_OPEN, CLOSED]


def test_failed_probe_reopens_with_doubled_open_time_up_to_the_cap():
    clock = FakeClock()
    b = CircuitBreaker(failure_threshold=1, open_s=2.0, max_open_s=5.0, clock=clock)
    fail_n(b, 1)
    waits = []
    for _ in range(4):
        waits.append(b.current_open_s)
        clock.advance(b.current_open_s)
        assert b.allow()  # probe
        b.record_failure()
        assert b.state is OPEN
    assert waits == [2.0, 4.0, 5.0, 5.0]
    assert b.opened_count == 5
    clock.advance(5.0)
    assert b.allow()
    b.record_success()
    assert b.state is CLOSED and b.current_open_s == 2.0  # back to open_s for the next outage


def test_release_lets_another_caller_probe():
    clock = FakeClock()
    b = CircuitBreaker(failure_threshold=1, open_s=1.0, clock=clock)
    fail_n(b, 1)
    clock.advance(1.0)
    assert b.allow() and not b.allow()
    b.release()
    assert b.allow()


def test_outcomes_arriving_while_open_are_ignored():
    clock = FakeClock()
    b = CircuitBreaker(failure_threshold=1, open_s=1.0, clock=clock)
    fail_n(b, 1)
    b.record_success()  # a call that started before the breaker opened
    assert b.state is OPEN
    b.record_failure()
    assert b.opened_count == 1
    clock.advance(1.0)
    assert b.state is HALF_OPEN


def test_a_failing_listener_does_not_break_the_breaker():
    def boom(old, new):
        raise RuntimeError("metrics down")

    b = CircuitBreaker(failure_threshold=1, clock=FakeClock(), on_state_change=boom)
    fail_n(b, 1)
    assert b.state is OPEN


@pytest.mark.parametrize(
    "kwargs, match",
    [({"failure_threshold": 0}, "failure_threshold"), ({"open_s": 0}, "open_s"), ({"open_s": 5, "max_open_s": 1}, "max_open_s")],
)
def test_breaker_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CircuitBreaker(**kwargs)


# ---------------------------------------------------------------- error classification


def test_grpc_codes_and_transient_flag():
    assert grpc_code_name(InferenceServerException("x", status="StatusCode.UNAVAILABLE")) == "UNAVAILABLE"
    assert grpc_code_name(ConnectionRefusedError()) == "UNAVAILABLE"
    assert grpc_code_name(InferenceServerException("no status")) is None
    assert EncoderUnavailable("x", code="DEADLINE_EXCEEDED").transient
    assert not EncoderUnavailable("x", code="NOT_FOUND").transient
    assert not EncoderUnavailable("bad shape").transient


def test_connection_refused_is_a_transient_unavailable():
    async def go():
        async with EncoderClient(f"127.0.0.1:{free_port()}", timeout_s=2.0) as client:  # nothing listens there
            await client.encode(["x"])

    with pytest.raises(EncoderUnavailable) as info:
        run(go())
    assert info.value.code == "UNAVAILABLE" and info.value.transient


# ---------------------------------------------------------------- ResilientEncoder


def make(fake, breaker=None, **kw) -> tuple[ResilientEncoder, CircuitBreaker, RecordingObserver]:
    breaker = breaker or CircuitBreaker(failure_threshold=2, clock=FakeClock())
    obs = RecordingObserver()
    return ResilientEncoder(fake, breaker, observer=obs, **kw), breaker, obs


def test_success_uses_the_deadline_and_reports_the_call():
    fake = FaultInjectingEncoderFake()
    enc, breaker, obs = make(fake, deadline_s=0.05)
    out = run(enc.encode(["a", "b"]))
    assert out.shape == (2, DIM)
    assert fake.calls[0]["timeout_s"] == pytest.approx(0.05, abs=0.01)
    assert [c[0] for c in obs.calls] == [True] and obs.calls[0][2] is None


def test_breaker_opens_and_open_calls_fail_fast_without_the_client():
    fake = FaultInjectingEncoderFake(unavailable("NOT_FOUND"), unavailable("NOT_FOUND"))
    enc, breaker, obs = make(fake, retries=0)
    for _ in range(2):
        with pytest.raises(EncoderUnavailable, match="injected NOT_FOUND"):
            run(enc.encode(["a"]))
    assert breaker.state is OPEN and obs.states == ["open"]
    for _ in range(3):
        with pytest.raises(CircuitOpenError, match="circuit breaker is open") as info:
            run(enc.encode(["a"]))
        assert info.value.code == CIRCUIT_OPEN
    with pytest.raises(CircuitOpenError):
        run(enc.encode_bulk(["a"]))
    assert len(fake.calls) == 2  # the open breaker sent nothing
    assert [c[2] for c in obs.calls] == ["NOT_FOUND"] * 2 + [CIRCUIT_OPEN] * 4


@pytest.mark.parametrize("probe_ok", [True, False])
def test_half_open_probe_through_the_encoder(probe_ok):
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, open_s=2.0, clock=clock)
    fake = FaultInjectingEncoderFake(unavailable(), unavailable(), *([] if probe_ok else [unavailable("NOT_FOUND")]))
    enc, _, obs = make(fake, breaker, retries=1, deadline_s=1.0)
    with pytest.raises(EncoderUnavailable):
        run(enc.encode(["a"]))
    clock.advance(2.0)
    if probe_ok:
        assert run(enc.encode(["a"])).shape == (1, DIM)
        assert breaker.state is CLOSED and obs.states == ["open", "half_open", "closed"]
    else:
        with pytest.raises(EncoderUnavailable, match="NOT_FOUND"):
            run(enc.encode(["a"]))
        assert breaker.state is OPEN and breaker.current_open_s == 4.0
        assert obs.states == ["open", "half_open", "open"]
    assert len(fake.calls) == 3


def test_only_one_probe_goes_out_while_half_open():
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, open_s=1.0, clock=clock)
    breaker.record_failure()
    clock.advance(1.0)
    fake = FaultInjectingEncoderFake(("slow", 0.05))
    enc, _, _ = make(fake, breaker, deadline_s=5.0)

    async def go():
        return await asyncio.gather(*(enc.encode(["a"]) for _ in range(3)), return_exceptions=True)

    results = run(go())
    assert sum(isinstance(r, np.ndarray) for r in results) == 1
    assert sum(isinstance(r, CircuitOpenError) for r in results) == 2
    assert len(fake.calls) == 1 and breaker.state is CLOSED


def test_retries_a_transient_error_once():
    fake = FaultInjectingEncoderFake(unavailable("UNAVAILABLE"))
    enc, breaker, obs = make(fake, retries=1, deadline_s=1.0)
    assert run(enc.encode(["a"])).shape == (1, DIM)
    assert len(fake.calls) == 2 and breaker.state is CLOSED
    assert [c[0] for c in obs.calls] == [True]  # one call, one outcome


def test_gives_up_after_the_retries():
    fake = FaultInjectingEncoderFake(*[unavailable()] * 5)
    enc, breaker, obs = make(fake, retries=2, deadline_s=1.0)
    with pytest.raises(EncoderUnavailable, match="UNAVAILABLE"):
        run(enc.encode(["a"]))
    assert len(fake.calls) == 3
    assert [c[2] for c in obs.calls] == ["UNAVAILABLE"]


@pytest.mark.parametrize("code", ["NOT_FOUND", "INVALID_ARGUMENT", None])
def test_does_not_retry_permanent_errors(code):
    fake = FaultInjectingEncoderFake(unavailable(code) if code else EncoderUnavailable("wrong shape"))
    enc, _, _ = make(fake, retries=3, deadline_s=1.0)
    with pytest.raises(EncoderUnavailable):
        run(enc.encode(["a"]))
    assert len(fake.calls) == 1


def test_deadline_exceeded_is_not_retried_when_the_attempt_used_the_whole_deadline():
    fake = FaultInjectingEncoderFake(("slow", 10.0))
    enc, _, _ = make(fake, retries=3, deadline_s=0.05)
    with pytest.raises(EncoderUnavailable) as info:
        run(enc.encode(["a"]))
    assert info.value.code == "DEADLINE_EXCEEDED" and len(fake.calls) == 1


def test_deadline_exceeded_is_retried_when_time_remains_in_the_overall_deadline():
    fake = FaultInjectingEncoderFake(("slow", 10.0))
    enc, _, _ = make(fake, retries=1, deadline_s=5.0, attempt_timeout_s=0.05)
    assert run(enc.encode(["a"])).shape == (1, DIM)
    assert [c["timeout_s"] for c in fake.calls][0] == pytest.approx(0.05)
    assert len(fake.calls) == 2


def test_retries_share_one_overall_deadline():
    clock = FakeClock()
    fast_fail = ("advance", 0.01, unavailable())  # refused after 10 ms
    fake = FaultInjectingEncoderFake(fast_fail, fast_fail, clock=clock)
    enc, _, _ = make(fake, retries=5, deadline_s=0.05, backoff_s=0.005, clock=clock)
    assert run(enc.encode(["a"])).shape == (1, DIM)
    timeouts = [c["timeout_s"] for c in fake.calls]
    assert timeouts == pytest.approx([0.05, 0.04, 0.03])  # each attempt gets only what is left

    slow_fail = ("advance", 0.046, unavailable())  # 4 ms left: less than back-off + MIN_ATTEMPT_S
    fake = FaultInjectingEncoderFake(slow_fail, clock=clock)
    enc, _, _ = make(fake, retries=5, deadline_s=0.05, backoff_s=0.005, clock=clock)
    with pytest.raises(EncoderUnavailable):
        run(enc.encode(["a"]))
    assert len(fake.calls) == 1


def test_deadline_holds_even_if_the_client_ignores_it():
    fake = FaultInjectingEncoderFake("hang", "hang")
    enc, breaker, obs = make(fake, retries=1, deadline_s=0.05)
    t0 = time.monotonic()
    with pytest.raises(EncoderUnavailable, match="did not finish within") as info:
        run(enc.encode(["a"]))
    assert time.monotonic() - t0 < 2.0  # liveness bound, not a speed assertion
    assert info.value.code == "DEADLINE_EXCEEDED"
    assert fake.cancelled == len(fake.calls) == 1  # the hung attempt was cancelled, no time left to retry
    assert obs.calls[0][2] == "DEADLINE_EXCEEDED"


def test_caller_errors_and_cancellation_are_not_counted_and_free_the_probe():
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, open_s=1.0, clock=clock)
    fake = FaultInjectingEncoderFake(TypeError("encode() takes a list of str"), "hang")
    enc, _, _ = make(fake, breaker, deadline_s=60.0)
    with pytest.raises(TypeError):
        run(enc.encode(["a"]))
    assert breaker.state is CLOSED

    breaker.record_failure()
    clock.advance(1.0)

    async def cancel_the_probe():
        task = asyncio.ensure_future(enc.encode(["a"]))
        await asyncio.sleep(0.01)
        assert breaker.state is HALF_OPEN and not breaker.allow()  # the probe is out
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(cancel_the_probe())
    assert breaker.state is HALF_OPEN and breaker.opened_count == 1
    assert run(enc.encode(["a"])).shape == (1, DIM)  # the next caller may probe
    assert breaker.state is CLOSED


def test_bulk_uses_the_long_deadline_and_counts_in_the_breaker():
    fake = FaultInjectingEncoderFake(unavailable(), unavailable())
    enc, breaker, obs = make(fake, bulk_timeout_s=120.0)
    for _ in range(2):
        with pytest.raises(EncoderUnavailable):
            run(enc.encode_bulk(["a"] * 3, max_in_flight=1))
    assert len(fake.calls) == 2  # no retries
    assert fake.calls[0] == {"n": 3, "timeout_s": 120.0, "max_in_flight": 1}
    assert breaker.state is OPEN


def test_empty_input_needs_no_call_even_when_open():
    fake = FaultInjectingEncoderFake()
    enc, breaker, _ = make(fake)
    fail_n(breaker, 2)
    assert run(enc.encode([])).shape == (0, DIM)
    assert fake.calls == []


def test_a_failing_observer_does_not_fail_the_call():
    class Broken:
        def on_call(self, ok, seconds, error):
            raise RuntimeError("metrics down")

        def on_breaker(self, state):
            raise RuntimeError("metrics down")

    fake = FaultInjectingEncoderFake(unavailable("NOT_FOUND"))
    enc = ResilientEncoder(fake, CircuitBreaker(failure_threshold=1), observer=Broken())
    with pytest.raises(EncoderUnavailable, match="NOT_FOUND"):
        run(enc.encode(["a"]))
    with pytest.raises(CircuitOpenError):
        run(enc.encode(["a"]))


@pytest.mark.parametrize(
    "kwargs, match",
    [({"deadline_s": 0}, "deadline_s"), ({"retries": -1}, "retries"), ({"attempt_timeout_s": 1.0, "deadline_s": 0.5}, "attempt_timeout_s")],
)
def test_encoder_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ResilientEncoder(FaultInjectingEncoderFake(), CircuitBreaker(), **kwargs)


def test_timeouts_of_calls_with_a_short_budget_never_open_the_breaker():
    """Issue 14, problem 6: five calls with a 6 ms deadline opened the shared breaker for every caller."""
    fake = FaultInjectingEncoderFake(*[("slow", 10.0)] * 7)
    enc, breaker, obs = make(fake, deadline_s=0.06, min_counted_timeout_s=0.05, retries=0)
    for _ in range(5):
        with pytest.raises(EncoderUnavailable) as info:
            run(enc.encode(["a"], timeout_s=0.006))  # what is left of a caller's short gRPC deadline
        assert info.value.code == "DEADLINE_EXCEEDED"
    assert breaker.state is CLOSED and [c[2] for c in obs.calls] == ["CALLER_DEADLINE"] * 5
    for _ in range(2):  # a full budget that times out is Triton's failure
        with pytest.raises(EncoderUnavailable):
            run(enc.encode(["a"]))
    assert breaker.state is OPEN and [c[2] for c in obs.calls][5:] == ["DEADLINE_EXCEEDED"] * 2


def test_a_short_budget_probe_frees_the_half_open_breaker_for_the_next_caller():
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, open_s=1.0, clock=clock)
    fake = FaultInjectingEncoderFake(("slow", 10.0))
    enc, _, _ = make(fake, breaker, deadline_s=0.06, min_counted_timeout_s=0.05, retries=0)
    breaker.record_failure()
    clock.advance(1.0)
    with pytest.raises(EncoderUnavailable):
        run(enc.encode(["a"], timeout_s=0.006))
    assert breaker.state is HALF_OPEN and breaker.opened_count == 1
    assert run(enc.encode(["a"])).shape == (1, DIM) and breaker.state is CLOSED


class SingleInstanceTritonFake:
    """Fault injection: one model instance, as the CPU Triton: calls are served one at a time, each
    taking `per_call_s`; a call whose timeout passes while it waits gives DEADLINE_EXCEEDED."""

    url = "fake:single"

    def __init__(self, per_call_s: float):
        self.per_call_s, self.dim, self.max_batch_size = per_call_s, DIM, 4
        self._busy = asyncio.Lock()
        self.order: list[str] = []  # "bulk" or "rank", in the order Triton served them

    async def _serve(self, texts, timeout_s, kind):
        try:
            async with asyncio.timeout(timeout_s):
                async with self._busy:
                    await asyncio.sleep(self.per_call_s)
                    self.order.append(kind)
        except TimeoutError:
            raise unavailable("DEADLINE_EXCEEDED") from None
        return np.full((len(texts), DIM), 0.5, dtype=np.float32)

    async def encode(self, texts, timeout_s=None, max_in_flight=None):
        return await self._serve(texts, timeout_s, "rank")

    async def encode_bulk(self, texts, timeout_s=300.0, max_in_flight=2):
        return await self._serve(texts, timeout_s, "bulk")


def test_ranks_texts_go_before_bulk_work_and_never_open_the_breaker():
    """Issue 30: a bulk upsert's chunks queued ahead of Ranks' inline texts on Triton, their timeouts
    opened the shared breaker, and 63 of 64 concurrent Ranks came back degraded. Bulk chunks now
    wait while a Rank's call is in flight, and a Rank's timeout while bulk work ran is not counted."""
    fake = SingleInstanceTritonFake(per_call_s=0.02)
    # A Rank behind every chunk would wait 1 s; behind a chunk or two, 20-40 ms. The deadline sits between,
    # with room for a loaded CI machine (at 0.2 s one Rank timed out there once).
    enc, breaker, obs = make(fake, deadline_s=0.5, min_counted_timeout_s=0.05, retries=0, bulk_timeout_s=30.0)

    async def scenario():
        bulk = asyncio.ensure_future(enc.encode_bulk([f"item {k}" for k in range(200)]))  # 50 chunks: 1 s of work
        await asyncio.sleep(0.05)
        ranks = await asyncio.gather(*(enc.encode([f"inline {k}"]) for k in range(8)), return_exceptions=True)
        await bulk
        return ranks

    ranks = asyncio.run(scenario())
    assert not [r for r in ranks if isinstance(r, BaseException)], ranks  # each waited a chunk or two, not the rest
    first_rank = fake.order.index("rank")
    assert fake.order[first_rank:first_rank + 8].count("rank") >= 6 and fake.order.count("bulk") == 50
    assert breaker.state is CLOSED

    # Even when a Rank does time out behind the bulk chunks already sent, the breaker does not count it.
    slow = SingleInstanceTritonFake(per_call_s=0.1)
    enc, breaker, obs = make(slow, deadline_s=0.15, min_counted_timeout_s=0.05, retries=0, bulk_timeout_s=30.0)

    async def behind():
        bulk = asyncio.ensure_future(enc.encode_bulk([f"item {k}" for k in range(40)], max_in_flight=2))
        await asyncio.sleep(0.01)
        out = await asyncio.gather(*(enc.encode(["x"]) for _ in range(6)), return_exceptions=True)
        await bulk
        return out

    out = asyncio.run(behind())
    assert any(isinstance(r, EncoderUnavailable) for r in out)  # queued behind 2 chunks of 100 ms each
    assert breaker.state is CLOSED and "DEADLINE_EXCEEDED" not in [c[2] for c in obs.calls if not c[0]]
