"""Encoder factories for `serving.encoding.pool.EncoderPool`: what serves a bundle's text tower.

    factory = triton_encoder_factory(TritonEncoderOptions(...))   # the service: a Triton child process
    factory = inprocess_encoder_factory()                          # batch jobs: TextEncoder in this process
    handle = await factory(bundle.encoder, bundle.path, key)       # -> EncoderHandle(encoder, close, dim)

Both encoders have the same async interface: `encode(texts, timeout_s=None)` on the request
path and `encode_bulk(texts)` for catalog embedding, float32 unit rows.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ranker.bundle import EncoderRef
from serving.encoding.pool import EncoderFactory, EncoderHandle, InProcessEncoder

log = logging.getLogger(__name__)

PROBE_TEXT = "semrank start-up probe"


def inprocess_encoder_factory(threads: int | None = None) -> EncoderFactory:
    """Loads the bundle's encoder into this process (torch on CPU; `threads`: torch intra-op threads)."""

    async def factory(ref: EncoderRef, bundle_path: Path, key: str) -> EncoderHandle:
        from ranker.encoder import TextEncoder

        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        model = await asyncio.to_thread(TextEncoder, ref.resolve(bundle_path), ref.max_length)
        log.info("in-process encoder %s loaded (key %s, dim %d)", model.model_dir, key, model.dim)

        async def close() -> None:
            return None

        return EncoderHandle(key=key, encoder=InProcessEncoder(model), close=close, dim=model.dim)

    return factory


@dataclass(frozen=True)
class TritonEncoderOptions:
    deadline_s: float = 0.25  # per encode() call on the request path, retries included
    retries: int = 1
    breaker_failures: int = 5
    breaker_open_s: float = 2.0
    max_queue_delay_us: int = 2000
    bulk_timeout_s: float = 300.0  # per chunk of encode_bulk (start-up and batch jobs)
    breaker_min_timeout_s: float = 0.05  # timeouts of calls with a smaller budget do not count in the breaker
    supervise_s: float = 2.0  # health-check period of the Triton process; 0: never restart it
    restart_after_failed_checks: int = 3  # consecutive failed checks (dead worker or model not ready)


def _model_ready(triton, timeout_s: float = 2.0) -> bool:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url=triton.grpc_url)
    try:
        return bool(client.is_model_ready(triton.config.model_name, client_timeout=timeout_s))
    except Exception:  # noqa: BLE001 - any failure means not ready
        return False
    finally:
        client.close()


def _report(observer, method: str, *args) -> None:
    """Tell the observer (metrics), if it listens for this; an observer must never break supervision."""
    fn = getattr(observer, method, None)
    if fn is None:
        return
    try:
        fn(*args)
    except Exception:  # noqa: BLE001
        log.exception("observer %s failed", method)


def triton_encoder_factory(opts: TritonEncoderOptions, observer=None,
                           started: Callable[[str, object], None] | None = None,
                           stopped: Callable[[str], None] | None = None) -> EncoderFactory:
    """A Triton child process per encoder, behind a deadline/retry/breaker client.

    `observer` gets the client's call outcomes (metrics); `started(key, TritonProcess)` and
    `stopped(key)` let the caller keep track of the processes."""

    async def factory(ref: EncoderRef, bundle_path: Path, key: str) -> EncoderHandle:
        from serving.triton.client import EncoderClient
        from serving.triton.process import TritonProcess, TritonWorkerConfig, free_port
        from serving.triton.resilience import CircuitBreaker, ResilientEncoder

        triton = TritonProcess(TritonWorkerConfig(
            model_dir=ref.resolve(bundle_path), max_length=ref.max_length, grpc_port=free_port(),
            http_port=free_port(), metrics_port=free_port(), max_queue_delay_us=opts.max_queue_delay_us,
        ))
        await asyncio.to_thread(triton.start)
        client = EncoderClient(triton.grpc_url)
        breaker = CircuitBreaker(failure_threshold=opts.breaker_failures, open_s=opts.breaker_open_s)
        encoder = ResilientEncoder(client, breaker, deadline_s=opts.deadline_s, retries=opts.retries,
                                   observer=observer, bulk_timeout_s=opts.bulk_timeout_s,
                                   min_counted_timeout_s=opts.breaker_min_timeout_s)
        if started is not None:
            started(key, triton)
        _report(observer, "on_triton", key, True)
        current = {"triton": triton}

        async def supervise() -> None:
            """Restart Triton on the same ports when it dies or stops answering (the client and
            its breaker then find it again; answers are degraded meanwhile, never errors)."""
            failed = 0
            while True:
                await asyncio.sleep(opts.supervise_s)
                t = current["triton"]
                ok = t.is_running() and await asyncio.to_thread(_model_ready, t)
                _report(observer, "on_triton", key, ok)
                failed = 0 if ok else failed + 1
                if failed < opts.restart_after_failed_checks:
                    continue
                log.error("Triton for encoder %s is down (%d failed checks): restarting it on %s", key, failed, t.grpc_url)
                await asyncio.to_thread(t.stop)
                fresh = TritonProcess(t.config)
                try:
                    await asyncio.to_thread(fresh.start)
                except Exception:  # noqa: BLE001 - try again at the next check
                    log.exception("restarting Triton for encoder %s failed", key)
                    await asyncio.to_thread(fresh.stop)
                    continue
                current["triton"], failed = fresh, 0
                _report(observer, "on_triton_restart", key)
                _report(observer, "on_triton", key, True)
                if started is not None:
                    started(key, fresh)

        watchdog = asyncio.create_task(supervise()) if opts.supervise_s > 0 else None

        async def close() -> None:
            if watchdog is not None:
                watchdog.cancel()
                await asyncio.gather(watchdog, return_exceptions=True)
            await client.close()
            await asyncio.to_thread(current["triton"].stop)
            if stopped is not None:
                stopped(key)

        try:
            probe = await encoder.encode_bulk([PROBE_TEXT])
        except BaseException:
            await close()
            raise
        return EncoderHandle(key=key, encoder=encoder, close=close, dim=int(probe.shape[1]))

    return factory


async def remote_triton_encoder(url: str, key: str, opts: TritonEncoderOptions, observer=None) -> EncoderHandle:
    """A Triton this process did not start (the one `semrank serve --workers N` started for every
    worker), behind the same deadline/retry/breaker client. It supervises nothing: its owner does."""
    from serving.triton.client import EncoderClient
    from serving.triton.resilience import CircuitBreaker, ResilientEncoder

    client = EncoderClient(url)
    encoder = ResilientEncoder(client, CircuitBreaker(failure_threshold=opts.breaker_failures, open_s=opts.breaker_open_s),
                               deadline_s=opts.deadline_s, retries=opts.retries, observer=observer,
                               bulk_timeout_s=opts.bulk_timeout_s, min_counted_timeout_s=opts.breaker_min_timeout_s)

    async def close() -> None:
        await client.close()

    try:
        probe = await encoder.encode_bulk([PROBE_TEXT])
    except BaseException:
        await close()
        raise
    _report(observer, "on_triton", key, True)
    log.info("encoder %s served by the Triton at %s (started by the supervisor)", key, url)
    return EncoderHandle(key=key, encoder=encoder, close=close, dim=int(probe.shape[1]))


def encoder_factory(kind: str, *, threads: int | None = None,
                    triton: TritonEncoderOptions | None = None) -> EncoderFactory:
    """'inprocess' or 'triton' (the CLI's --encoder)."""
    if kind == "inprocess":
        return inprocess_encoder_factory(threads)
    if kind == "triton":
        return triton_encoder_factory(triton or TritonEncoderOptions())
    raise ValueError(f"encoder {kind!r}: expected 'inprocess' or 'triton'")
