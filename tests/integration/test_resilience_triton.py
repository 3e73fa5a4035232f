"""ResilientEncoder against a real Triton that is SIGKILLed and then comes back; no mocks.

The client's URL is fixed (as in the service), so the replacement Triton is started on the
same ports and recovery goes through the breaker's half-open probe on the same client.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import numpy as np
import pytest

from ranker.encoder import EMBEDDING_DIM
from serving.triton.client import EncoderClient, EncoderUnavailable
from serving.triton.process import (
    TritonProcess,
    TritonWorkerConfig,
    free_port,
    port_in_use,
)
from serving.triton.resilience import (
    BreakerState,
    CircuitBreaker,
    CircuitOpenError,
    ResilientEncoder,
)
from tests.integration.test_triton_encoder import TEXTS, live_tritonserver_processes
from tests.serving.triton.test_resilience import RecordingObserver

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

# Generous for two texts on a loaded 2-core machine; failures after the kill come much faster.
DEADLINE_S = 1.0
LIVENESS_S = 2.0  # no call may take longer: a bound against hangs, not a speed assertion
RECOVERY_TIMEOUT_S = 90.0


class CountingEncoderClient(EncoderClient):
    """The real client, counting the calls that reach it, to show an open breaker sends nothing."""

    calls = 0

    async def encode(self, texts, timeout_s=None, max_in_flight=None):
        self.calls += 1
        return await super().encode(texts, timeout_s=timeout_s, max_in_flight=max_in_flight)


def tritonserver_pids(tp: TritonProcess) -> list[int]:
    return [int(line.split(" ", 1)[0]) for line in live_tritonserver_processes(str(tp.workdir))]


async def timed(coro) -> tuple[float, object]:
    """(seconds, result or the exception raised)."""
    t0 = time.monotonic()
    try:
        out = await coro
    except EncoderUnavailable as e:
        out = e
    return time.monotonic() - t0, out


async def scenario(first: TritonProcess, second: TritonProcess) -> dict:
    client = CountingEncoderClient(first.grpc_url)
    obs = RecordingObserver()
    breaker = CircuitBreaker(failure_threshold=3, window_s=10.0, open_s=0.5, max_open_s=2.0)
    enc = ResilientEncoder(client, breaker, deadline_s=DEADLINE_S, retries=1, observer=obs)
    texts = TEXTS[:2]
    try:
        # healthy: a bulk call (opens the channel), then the request path
        reference = await enc.encode_bulk(texts)
        got = await enc.encode(texts)
        assert got.shape == (2, EMBEDDING_DIM)
        np.testing.assert_allclose(got, reference, atol=1e-5)

        # the tritonserver process dies (SIGKILL); the pytriton worker above it is left alone
        pids = tritonserver_pids(first)
        assert pids, "tritonserver should run under the worker"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while tritonserver_pids(first):
            assert time.monotonic() < deadline, "tritonserver survived SIGKILL"
            await asyncio.sleep(0.05)

        # every call fails within the deadline, and the breaker opens after 3
        failures = []
        for _ in range(3):
            seconds, err = await timed(enc.encode(texts))
            assert isinstance(err, EncoderUnavailable) and not isinstance(err, CircuitOpenError), err
            assert seconds < min(LIVENESS_S, DEADLINE_S + 0.5), f"a failing call took {seconds:.2f}s"
            failures.append((round(seconds, 4), err.code, err.transient))
        assert breaker.state is BreakerState.OPEN and breaker.opened_count == 1
        assert all(transient for _, _, transient in failures), failures

        # open: calls fail fast and never reach the client
        sent = client.calls
        for _ in range(5):
            seconds, err = await timed(enc.encode(texts))
            assert isinstance(err, CircuitOpenError) and seconds < LIVENESS_S
        assert client.calls == sent

        # a new Triton on the same ports; the same client recovers through a half-open probe
        await asyncio.to_thread(first.kill_hard)  # the worker and the rest of its group
        await asyncio.to_thread(second.start)
        ready_at = time.monotonic()
        failed_probes = 0
        while True:
            assert time.monotonic() - ready_at < RECOVERY_TIMEOUT_S, f"no recovery; {breaker!r}, {obs.states}"
            seconds, out = await timed(enc.encode(texts))
            assert seconds < LIVENESS_S, f"a call took {seconds:.2f}s while Triton restarted"
            if isinstance(out, np.ndarray):
                break
            if not isinstance(out, CircuitOpenError):
                failed_probes += 1
            await asyncio.sleep(0.05)
        np.testing.assert_allclose(out, reference, atol=1e-5)
        assert breaker.state is BreakerState.CLOSED
        assert obs.states[:2] == ["open", "half_open"] and obs.states[-1] == "closed"
        return {"failures": failures, "recovery_s": time.monotonic() - ready_at, "failed_probes": failed_probes,
                "states": obs.states}
    finally:
        await client.close()


def test_triton_killed_then_restarted_degrades_fast_and_recovers():
    cfg = TritonWorkerConfig(model_dir="base", grpc_port=free_port(), http_port=free_port(), metrics_port=free_port())
    first, second = TritonProcess(cfg), TritonProcess(cfg)
    markers = []
    try:
        first.start()
        markers.append(str(first.workdir))
        report = asyncio.run(scenario(first, second))
        markers.append(str(second.workdir))
    finally:
        first.kill_hard()
        if second.workdir is not None:
            markers.append(str(second.workdir))
        second.stop()
    print(report)
    for marker in markers:
        assert live_tritonserver_processes(marker) == [], f"a tritonserver from {marker} is still running"
    for port in (cfg.grpc_port, cfg.http_port, cfg.metrics_port):
        assert not port_in_use(port, cfg.host), f"port {port} still bound after the test"
