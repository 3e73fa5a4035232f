"""Which encoder serves a bundle's text tower: the async service interface and the pool that shares them.

- `EncoderService`: what the request path and catalog embedding call. `encode(texts, timeout_s)`
  answers within a deadline or raises `EncoderUnavailable` (the engine then degrades);
  `encode_bulk(texts)` is for start-up and batch jobs, with long deadlines. It is the async,
  deadline-bound face of a `ranker.encoder.Encoder`: served by Triton
  (`serving.triton.resilience.ResilientEncoder`) or in this process (`InProcessEncoder`).
- `EncoderPool` keeps one `EncoderHandle` (a service, its dimension and how to stop it) per
  encoder key (`ranker.encoder.encoder_key`: weights + token budget), shared by every bundle that
  uses the same encoder, and stopped when the last such bundle is retired. The factories that
  start them are in `serving.encoding.factories`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from ranker.bundle import EncoderRef
from ranker.encoder import Encoder, encoder_key

log = logging.getLogger(__name__)


class EncoderService(Protocol):
    async def encode(self, texts: list[str], timeout_s: float | None = None) -> np.ndarray: ...

    async def encode_bulk(self, texts: list[str]) -> np.ndarray: ...


class InProcessEncoder:
    """A `ranker.encoder.Encoder` behind the `EncoderService` interface.

    The model runs in a worker thread, so the event loop stays free; `timeout_s` is accepted and
    ignored (there is no remote call to time out)."""

    def __init__(self, encoder: Encoder):
        self.encoder = encoder
        self.dim = int(encoder.dim)

    async def encode(self, texts: list[str], timeout_s: float | None = None) -> np.ndarray:  # noqa: ARG002
        return await asyncio.to_thread(self.encoder.encode, list(texts))

    async def encode_bulk(self, texts: list[str]) -> np.ndarray:
        return await self.encode(texts)


@dataclass
class EncoderHandle:
    key: str
    encoder: EncoderService
    close: Callable[[], Awaitable[None]]
    dim: int = 384
    users: int = 0
    # Checks that the encoder still serves a bundle's encoder (an external Triton: its contract and
    # probe embeddings); the factory ran it for the first bundle, `EncoderPool.acquire` for each later one.
    verify: Callable[[EncoderRef, Path], Awaitable[None]] | None = None


EncoderFactory = Callable[[EncoderRef, Path, str], Awaitable[EncoderHandle]]


class EncoderPool:
    def __init__(self, factory: EncoderFactory):
        self._factory = factory
        self._handles: dict[str, EncoderHandle] = {}
        self._lock = asyncio.Lock()

    async def acquire(self, ref: EncoderRef, bundle_path: Path) -> EncoderHandle:
        key = encoder_key(ref.resolve(bundle_path), ref.max_length)
        async with self._lock:
            h = self._handles.get(key)
            if h is None:
                h = await self._factory(ref, bundle_path, key)
                self._handles[key] = h
            elif h.verify is not None:
                await h.verify(ref, bundle_path)  # raises: this bundle is refused, the handle serves on
            h.users += 1
            return h

    async def release(self, h: EncoderHandle) -> None:
        async with self._lock:
            h.users -= 1
            if h.users <= 0 and self._handles.get(h.key) is h:
                del self._handles[h.key]
                log.info("encoder %s no longer used: stopping it", h.key)
                await h.close()

    def handles(self) -> list[EncoderHandle]:
        return list(self._handles.values())

    async def close(self) -> None:
        async with self._lock:
            for h in self._handles.values():
                await h.close()
            self._handles.clear()
