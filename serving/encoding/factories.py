"""Encoder factories for `serving.encoding.pool.EncoderPool`: what serves a bundle's text tower.

    factory = triton_encoder_factory(TritonEncoderOptions(...))   # the service: a Triton child process
    factory = external_triton_factory(ExternalTriton(url), opts)  # a Triton somebody else runs (GPU)
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
from typing import TYPE_CHECKING

from ranker.bundle import EncoderRef
from serving.encoding.pool import EncoderFactory, EncoderHandle, InProcessEncoder

if TYPE_CHECKING:
    from serving.triton.client import EncoderClient, ExternalTriton

log = logging.getLogger(__name__)

PROBE_TEXT = "semrank start-up probe"
MIN_PROBE_COSINE = 0.999  # an external Triton's probe embeddings against the bundle's reference
VERIFY_TIMEOUT_S = 30.0  # each call of that check


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


async def verify_external(ext: ExternalTriton, client: EncoderClient, ref: EncoderRef, bundle_path: Path,
                          timeout_s: float = VERIFY_TIMEOUT_S) -> None:
    """Is the model at `ext` the bundle's encoder? Reads its config (the contract: strings or token ids),
    checks the contract's parameters against the bundle's encoder, then encodes the bundle's probe
    texts through it and compares them with the bundle's reference (cosine >= MIN_PROBE_COSINE).
    Raises `ContractMismatch` with the reason, or `EncoderUnavailable` when Triton does not answer.
    On success `client` takes the contract's tokenizer (or none, for strings); on failure it is
    left as it was, so a bundle serving through it keeps serving. `timeout_s` bounds each of its calls
    (generous: a GPU Triton's first call after a (re)load can take seconds)."""
    from ranker.encoder import encoder_key
    from ranker.encoder_probes import PROBE_FILE, load_probes, min_cosine
    from serving.triton.contract import ClientTokenizer, ContractMismatch, check_parameters, read_signature

    sig = read_signature(await client.model_config(timeout_s), ext.model)
    model_dir = ref.resolve(bundle_path)
    await asyncio.to_thread(check_parameters, sig, model_dir, ref.max_length, ext.model)
    tokenizer = None
    if sig.kind == "tokens":
        tokenizer = await asyncio.to_thread(ClientTokenizer, model_dir, sig.tokens)
    try:
        probes = await asyncio.to_thread(load_probes, bundle_path)
    except ValueError as e:
        raise ContractMismatch(str(e)) from e
    key = encoder_key(model_dir, ref.max_length)
    if probes is None or probes.encoder_key != key:
        what = "carries no" if probes is None else f"has {PROBE_FILE} of another encoder ({probes.encoder_key}), no"
        raise ContractMismatch(f"bundle {bundle_path.name} {what} probe embeddings for encoder {key}; "
                               f"`semrank export triton --bundle {bundle_path.name} ...` writes them")
    checker = ext.client(timeout_s=timeout_s, tokenizer=tokenizer)
    try:
        got = await checker.encode(list(probes.texts))
    finally:
        await checker.close()
    cosine = min_cosine(probes.embeddings, got)
    if cosine < MIN_PROBE_COSINE:
        raise ContractMismatch(f"Triton model {ext.model!r} at {ext.url} answers the probe texts unlike the bundle's "
                               f"encoder (min cosine {cosine:.6f} < {MIN_PROBE_COSINE}): it serves other weights, "
                               "tokens or truncation")
    if sig.max_batch_size:
        client.max_batch_size = min(client.max_batch_size, sig.max_batch_size)
    client.tokenizer, client.dim = tokenizer, int(got.shape[1])
    log.info("Triton model %r at %s checked for bundle %s: %s contract, probe min cosine %.6f", ext.model, ext.url,
             bundle_path.name, sig.kind, cosine)


def external_triton_factory(ext: ExternalTriton, opts: TritonEncoderOptions, observer=None) -> EncoderFactory:
    """Encoders served by a Triton this process did not start (`ExternalTriton`), behind the same
    deadline/retry/breaker client. Each handle is checked (`verify_external`) when it is made and
    at every later acquire (each bundle load); its health goes to `observer.on_triton` every
    `ext.health_s`. Nothing there is started, supervised or restarted."""

    async def factory(ref: EncoderRef, bundle_path: Path, key: str) -> EncoderHandle:
        from serving.triton.resilience import CircuitBreaker, ResilientEncoder

        client = ext.client(timeout_s=max(opts.deadline_s, 1.0))
        encoder = ResilientEncoder(client, CircuitBreaker(failure_threshold=opts.breaker_failures, open_s=opts.breaker_open_s),
                                   deadline_s=opts.deadline_s, retries=opts.retries, observer=observer,
                                   bulk_timeout_s=opts.bulk_timeout_s, min_counted_timeout_s=opts.breaker_min_timeout_s)

        async def verify(ref: EncoderRef, bundle_path: Path) -> None:
            await verify_external(ext, client, ref, bundle_path)

        try:
            await verify(ref, bundle_path)
        except BaseException:
            await client.close()
            raise

        async def health() -> None:
            while True:
                _report(observer, "on_triton", key, await client.ready())
                await asyncio.sleep(ext.health_s)

        watcher = asyncio.create_task(health()) if ext.health_s > 0 else None  # only for an encoder that serves

        async def close() -> None:
            if watcher is not None:
                watcher.cancel()
                await asyncio.gather(watcher, return_exceptions=True)
            await client.close()

        log.info("encoder %s served by the external Triton at %s (model %r)", key, ext.url, ext.model)
        return EncoderHandle(key=key, encoder=encoder, close=close, dim=client.dim, verify=verify)

    return factory


def encoder_factory(kind: str, *, threads: int | None = None, triton: TritonEncoderOptions | None = None,
                    external: ExternalTriton | None = None) -> EncoderFactory:
    """'inprocess' or 'triton' (the CLI's --encoder); 'triton' with `external` (an `ExternalTriton`)
    uses that Triton instead of starting one."""
    if kind == "inprocess":
        if external is not None:
            raise ValueError("an external Triton goes with --encoder triton")
        return inprocess_encoder_factory(threads)
    if kind == "triton":
        if external is not None:
            return external_triton_factory(external, triton or TritonEncoderOptions())
        return triton_encoder_factory(triton or TritonEncoderOptions())
    raise ValueError(f"encoder {kind!r}: expected 'inprocess' or 'triton'")
