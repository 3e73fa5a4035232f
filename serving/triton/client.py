"""Async client for a Triton-served text encoder.

Two input contracts (serving/triton/contract.py): the development worker's (serving/triton/worker.py)
takes texts as a BYTES tensor "texts" [n, 1]; the exported ONNX model takes "input_ids" and
"attention_mask" INT64 [n, S], which this client makes with `tokenizer` (a `ClientTokenizer`).
Either way unit-norm float32 rows come back in "embedding". Large lists are split into
max_batch_size requests that are sent concurrently, so Triton's dynamic batcher can pack them with
other callers' requests. Several endpoints (`url` "host:port,host:port") take the requests in turn;
TLS and headers (`TritonTls`, `headers`) are passed to tritonclient as given.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass
from pathlib import Path

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


@dataclass(frozen=True)
class TritonTls:
    """TLS to Triton's gRPC port: the CA to trust (None: the system's), and a client certificate
    and key for mutual TLS (both or neither)."""

    root_certificates: Path | None = None
    certificate_chain: Path | None = None
    private_key: Path | None = None

    def __post_init__(self) -> None:
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ValueError("a client certificate and its private key go together")
        for name in ("root_certificates", "certificate_chain", "private_key"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"TLS {name.replace('_', ' ')} {path}: no such file")

    def kwargs(self) -> dict:
        """tritonclient's arguments (it takes the files' paths and reads them itself)."""
        def path(p):
            return None if p is None else str(p)

        return {"ssl": True, "root_certificates": path(self.root_certificates),
                "certificate_chain": path(self.certificate_chain), "private_key": path(self.private_key)}


def split_urls(url: str) -> list[str]:
    urls = [u.strip() for u in url.split(",") if u.strip()]
    bad = [u for u in urls if "://" in u or ":" not in u]
    if not urls or bad:
        raise ValueError(f"Triton url {url!r}: expected host:port, or several separated by commas (gRPC, no scheme)")
    return urls


class EncoderClient:
    """`await EncoderClient(url).encode(texts) -> float32 (len(texts), dim)`.

    The gRPC channels are created lazily inside the running event loop, so a client belongs to
    one loop; `await close()` (or `async with`) when done.
    """

    def __init__(self, url: str, model_name: str = "encoder", max_batch_size: int = 64, timeout_s: float = 10.0,
                 *, tls: TritonTls | None = None, headers: dict[str, str] | None = None, tokenizer=None):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size} must be >= 1 (and at most the model's max_batch_size)")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s={timeout_s} must be > 0")
        self.url = url
        self.urls = split_urls(url)
        self.model_name = model_name
        self.max_batch_size = max_batch_size
        self.timeout_s = timeout_s
        self.tls = tls
        self.headers = dict(headers) if headers else None
        self.tokenizer = tokenizer  # None: the strings contract; a ClientTokenizer: token ids
        self.dim = DEFAULT_DIM
        self._clients: list | None = None
        self._turn = itertools.count()

    def _get_client(self):
        """The first endpoint's client (the channels are made on first use, in the running loop)."""
        if self._clients is None:
            import tritonclient.grpc.aio as grpcclient_aio

            extra = self.tls.kwargs() if self.tls is not None else {}
            self._clients = [grpcclient_aio.InferenceServerClient(url=u, channel_args=CHANNEL_ARGS, **extra)
                             for u in self.urls]
        return self._clients[0]

    async def model_config(self, timeout_s: float | None = None) -> dict:
        """The model's config as Triton reports it (JSON form)."""
        reply = await self._failover(
            "reading the model config",
            lambda client: client.get_model_config(self.model_name, headers=self.headers, as_json=True,
                                                   client_timeout=timeout_s or self.timeout_s))
        return reply.get("config", reply)

    async def _failover(self, what: str, call):
        """`await call(client)` on the next endpoint; when it is unreachable (UNAVAILABLE), on the
        others in turn. Any other failure (a deadline: the time is spent) is raised at once."""
        self._get_client()
        start = next(self._turn)
        clients = [self._clients[(start + k) % len(self._clients)] for k in range(len(self._clients))]
        for k, client in enumerate(clients):
            try:
                return await call(client)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # tritonclient wraps gRPC errors in InferenceServerException
                err = self._unavailable(what, e)
                if err.code != "UNAVAILABLE" or k == len(clients) - 1:
                    raise err from e
                log.debug("Triton endpoint unreachable (%s); trying the next one", e)

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

        if self.tokenizer is None:
            data = np.array([t.encode("utf-8") for t in texts], dtype=np.object_).reshape(-1, 1)
            inputs = [grpcclient_aio.InferInput("texts", list(data.shape), "BYTES")]
            inputs[0].set_data_from_numpy(data)
        else:
            inputs = []
            for name, arr in zip(("input_ids", "attention_mask"), self.tokenizer(texts)):
                inputs.append(grpcclient_aio.InferInput(name, list(arr.shape), "INT64"))
                inputs[-1].set_data_from_numpy(arr)
        result = await self._failover(
            f"infer of {len(texts)} texts",
            lambda client: client.infer(self.model_name, inputs, outputs=[grpcclient_aio.InferRequestedOutput("embedding")],
                                        client_timeout=timeout_s, headers=self.headers))
        emb = result.as_numpy("embedding")
        if emb is None or emb.ndim != 2 or emb.shape[0] != len(texts):
            shape = None if emb is None else emb.shape
            raise EncoderUnavailable(
                f"Triton model {self.model_name!r} at {self.url} returned 'embedding' of shape {shape} "
                f"for {len(texts)} texts; expected ({len(texts)}, dim). Is the right model served there?"
            )
        return emb.astype(np.float32, copy=False)

    async def ready(self) -> bool:
        """True when some endpoint answers and has the model loaded; never raises."""
        self._get_client()
        for client in self._clients:
            try:
                if await client.is_model_ready(self.model_name, headers=self.headers, client_timeout=self.timeout_s):
                    return True
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.debug("Triton model %r at %s not ready: %s", self.model_name, self.url, e)
        return False

    async def close(self) -> None:
        if self._clients is not None:
            clients, self._clients = self._clients, None
            for client in clients:
                await client.close()

    async def __aenter__(self) -> EncoderClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


@dataclass(frozen=True)
class ExternalTriton:
    """A Triton this process did not start (`semrank serve --triton-url`): where, which model, how to
    connect. semrank supervises and restarts nothing there; it reads its health every `health_s`."""

    url: str
    model: str = "encoder_onnx"
    tls: TritonTls | None = None
    headers: tuple[tuple[str, str], ...] = ()
    health_s: float = 2.0

    def __post_init__(self) -> None:
        split_urls(self.url)  # raises ValueError naming the url
        if not self.model or "/" in self.model:
            raise ValueError(f"Triton model {self.model!r}: expected a model name")
        if self.health_s < 0:
            raise ValueError(f"health_s={self.health_s} must be >= 0")

    def client(self, timeout_s: float = 10.0, tokenizer=None) -> EncoderClient:
        return EncoderClient(self.url, self.model, timeout_s=timeout_s, tls=self.tls,
                             headers=dict(self.headers) or None, tokenizer=tokenizer)
