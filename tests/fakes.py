"""Stand-ins shared by unit tests; each is named for what it fakes.

- `HashEncoder`: a `ranker.encoder.Encoder` whose unit vectors come from the text's md5: the same
  text always gets the same vector, different texts unrelated ones. Fast, and deterministic across
  processes, where the real encoder would cost seconds to load.
- `FailingEncoderService`: fault injection, an `EncoderService` that is down (every call raises
  `EncoderUnavailable`).
"""

from __future__ import annotations

import hashlib

import numpy as np

from serving.triton.client import EncoderUnavailable

DIM = 16


class HashEncoder:
    dim = DIM
    max_length = 128

    def encode(self, texts) -> np.ndarray:
        out = np.zeros((len(texts), DIM), dtype=np.float32)
        for k, t in enumerate(texts):
            v = np.random.default_rng(int(hashlib.md5(t.encode()).hexdigest()[:8], 16)).standard_normal(DIM)
            out[k] = v / np.linalg.norm(v)
        return out


class FailingEncoderService:
    def __init__(self) -> None:
        self.calls = 0

    async def encode(self, texts, timeout_s=None):
        self.calls += 1
        raise EncoderUnavailable("fault injection: the encoder is down", code="UNAVAILABLE")

    async def encode_bulk(self, texts):
        return await self.encode(texts)
