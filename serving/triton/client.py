"""Async client for the Triton-served text encoder (served by serving/triton/worker.py).

Texts go in as a BYTES tensor "texts" of shape [n, 1]; unit-norm float32 rows come back
in "embedding". Large lists are split into max_batch_size requests that are sent
concurrently, so Triton's dynamic batcher can pack them with other callers' requests.
"""

from __future__ import annotations

import asyncio
import logging

import numpy as np

from featurizer.errors import SemrankError

log = logging.getLogger(__name__)

DEFAULT_DIM = 384
# tritonclient's defaults, plus a short reconnect back-off: gRPC's default grows to 120 s, so after a
# long Triton outage the client noticed the restarted server only seconds later.
CHANNEL_ARGS = [
    ("grpc.max_send_message_length", 2**31 - 1),
    ("grpc.max_receive_message_length", 2**31 - 1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]  # all-MiniLM-L6-v2; replaced by what the server returns on the first call


# gRPC codes after which the same request may well succeed if sent again soon.
TRANSIENT_CODES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED"})


class EncoderUnavailable(SemrankError, RuntimeError):
    """Triton could not produce embeddings (down, model not loaded, timed out, or rejected the request).

    `code` is the gRPC status name ("UNAVAILABLE", "DEADLINE_EXCEEDED", "NOT_FOUND", ...) or None
    when there was none (e.g. a reply of the wrong shape); `transient` is True when retrying the
    same request could succeed (server unreachable, connection refused or reset, deadline hit).
    """

    grpc_code = "UNAVAILABLE"
    reason = "ENCODER_UNAVAILABLE"

    def __init__(self, message: str, code: str | None = None, transient: bool | None = None):
        super().__init__(message)
        self.code = code
        self.transient = code in TRANSIENT_CODES if transient is None else transient


def grpc_code_name(err: BaseException) -> str | None:
    """The gRPC status name behind a tritonclient/grpc error ("StatusCode.UNAVAILABLE" -> "UNAVAILABLE")."""
    if isinstance(err, ConnectionError):
        return "UNAVAILABLE"
    status = getattr(err, "status", None)  # tritonclient's InferenceServerException
    if callable(status):
        text = status()
        if isinstance(text, str) and text:
            return text.rsplit(".", 1)[-1]
    code = getattr(err, "code", None)  # grpc.RpcError
    if callable(code):
        name = getattr(code(), "name", None)
        if isinstance(name, str):
            return name
    return None


class EncoderClient:
    """`await EncoderClient(url).encode(texts) -> float32 (len(texts), dim)`.

    The gRPC channel is created lazily inside the running event loop, so a client belongs to
    one loop; `await close()` (or `async with`) when done.
    """

    def __init__(self, url: str, model_name: str = "encoder", max_batch_size: int = 64, timeout_s: float = 10.0):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size} must be >= 1 (and at most the model's max_batch_size)")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s={timeout_s} must be > 0")
        self.url = url
        self.model_name = model_name
        self.max_batch_size = max_batch_size
        self.timeout_s = timeout_s
        self.dim = DEFAULT_DIM
        self._client = None

    def _get_client(self):
        if self._client is None:
            import tritonclient.grpc.aio as grpcclient_aio

            self._client = grpcclient_aio.InferenceServerClient(url=self.url, channel_args=CHANNEL_ARGS)
        return self._client

    def _unavailable(self, what: str, err: BaseException) -> EncoderUnavailable:
        code = grpc_code_name(err)
        return EncoderUnavailable(
            f"{what} failed for Triton model {self.model_name!r} at {self.url}: {err}. "
            f"Check that the Triton worker is running there (python -m serving.triton.worker ...) "
            f"and that model {self.model_name!r} is loaded.",
            code=code,
        )

    async def encode_bulk(self, texts: list[str], timeout_s: float = 300.0, max_in_flight: int = 2) -> np.ndarray:
        """For start-up and batch jobs: few chunks in flight, each with a long deadline, so a
        large list neither floods Triton's queue nor times out behind its own chunks."""
        return await self.encode(texts, timeout_s=timeout_s, max_in_flight=max_in_flight)

    async def encode(self, texts: list[str], timeout_s: float | None = None, max_in_flight: int | None = None) -> np.ndarray:
        """float32 (len(texts), dim) embeddings; an empty list gives (0, dim) without a call.

        `timeout_s` (default: the client's) is the deadline of each chunk; `max_in_flight`
        bounds how many chunks are sent at once (default: all)."""
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise TypeError(f"encode() takes a list of str; items {bad[:5]} are {type(texts[bad[0]]).__name__}")
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        chunks = [texts[i : i + self.max_batch_size] for i in range(0, len(texts), self.max_batch_size)]
        gate = asyncio.Semaphore(max_in_flight or len(chunks))

        async def one(chunk: list[str]) -> np.ndarray:
            async with gate:
                return await self._infer(chunk, timeout_s or self.timeout_s)

        tasks = [asyncio.ensure_future(one(chunk)) for chunk in chunks]
        try:
            parts = await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:  # one chunk failed (or we were cancelled): don't leave the rest running
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        out = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        self.dim = int(out.shape[1])
        return out

    async def _infer(self, texts: list[str], timeout_s: float) -> np.ndarray:
        import tritonclient.grpc.aio as grpcclient_aio

        data = np.array([t.encode("utf-8") for t in texts], dtype=np.object_).reshape(-1, 1)
        inp = grpcclient_aio.InferInput("texts", list(data.shape), "BYTES")
        inp.set_data_from_numpy(data)
        try:
            result = await self._get_client().infer(
                self.model_name,
                [inp],
                outputs=[grpcclient_aio.InferRequestedOutput("embedding")],
                client_timeout=timeout_s,
            )
        except asyncio.CancelledError:
            raise
        except Exception as e:  # tritonclient wraps gRPC errors in InferenceServerException
            raise self._unavailable(f"infer of {len(texts)} texts", e) from e
        emb = result.as_numpy("embedding")
        if emb is None or emb.ndim != 2 or emb.shape[0] != len(texts):
            shape = None if emb is None else emb.shape
            raise EncoderUnavailable(
                f"Triton model {self.model_name!r} at {self.url} returned 'embedding' of shape {shape} "
                f"for {len(texts)} texts; expected ({len(texts)}, dim). Is the right model served there?"
            )
        return emb.astype(np.float32, copy=False)

    async def ready(self) -> bool:
        """True when the server answers and the model is loaded; never raises."""
        try:
            return bool(await self._get_client().is_model_ready(self.model_name, client_timeout=self.timeout_s))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.debug("Triton model %r at %s not ready: %s", self.model_name, self.url, e)
            return False

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()

    async def __aenter__(self) -> EncoderClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
