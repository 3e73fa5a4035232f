"""Reference embeddings of a few fixed probe texts, carried by the bundle (`encoder_probes.safetensors`).

A service that encodes through a Triton it did not start (serving/triton/contract.py) sends
these texts through that Triton and compares the answers with the reference, so a model that
was exported from other weights, truncates otherwise or tokenizes otherwise is refused before
it serves. The file holds one float32 tensor `embeddings` (len(texts), dim); its metadata holds
the texts (JSON) and the encoder key (`ranker.encoder.encoder_key`) they were made with, so a
reference left over from another encoder is never trusted.

Written where torch is at hand: `semrank export triton --bundle` and `semrank train ranker`
(`write_probes`). Reading needs only numpy and safetensors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PROBE_FILE = "encoder_probes.safetensors"
# Short, punctuated, non-ASCII, and one past any max_length (truncation must agree too).
PROBE_TEXTS = (
    "a",
    "red running shoes for men",
    "Stainless steel water bottle, 1 L - keeps drinks cold for 24 h!",
    "Crème brûlée set: 4 ramekins + torch (für Zuhause)",
    "USB-C cable 2m / 60W, braided",
    "organic green tea, 100 bags",
    "children's winter jacket with hood, waterproof and warm, sizes 4 to 12 years " * 12,
)


@dataclass(frozen=True)
class Probes:
    texts: tuple[str, ...]
    embeddings: np.ndarray  # float32 (len(texts), dim), unit rows
    encoder_key: str


def compute_probes(encoder, key: str, texts: tuple[str, ...] = PROBE_TEXTS) -> Probes:
    """Embed the probe texts with `encoder` (anything with `encode(list[str])`)."""
    return Probes(tuple(texts), np.asarray(encoder.encode(list(texts)), dtype=np.float32), key)


def save_probes(bundle_dir: str | Path, probes: Probes) -> Path:
    from safetensors.numpy import save_file

    path = Path(bundle_dir) / PROBE_FILE
    tmp = path.with_suffix(".tmp")
    save_file({"embeddings": np.ascontiguousarray(probes.embeddings)}, str(tmp),
              metadata={"texts": json.dumps(list(probes.texts)), "encoder_key": probes.encoder_key})
    tmp.replace(path)
    return path


def load_probes(bundle_dir: str | Path) -> Probes | None:
    """The bundle's probes, or None when it carries none. A malformed file raises ValueError."""
    from safetensors import safe_open

    path = Path(bundle_dir) / PROBE_FILE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
            emb = f.get_tensor("embeddings")
        texts = tuple(json.loads(meta["texts"]))
        key = meta["encoder_key"]
    except Exception as e:  # noqa: BLE001 - any unreadable file is a bad reference
        raise ValueError(f"{path}: not a probe file ({type(e).__name__}: {e})") from e
    if emb.ndim != 2 or emb.shape[0] != len(texts) or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"{path}: {emb.shape} embeddings for {len(texts)} texts")
    return Probes(texts, emb.astype(np.float32, copy=False), key)


def write_probes(bundle_dir: str | Path, force: bool = False) -> Path | None:
    """Compute the bundle encoder's probes (torch, in this process) and save them into the bundle;
    returns the file, or None when a current one was already there and `force` is False."""
    from ranker.bundle import MANIFEST, EncoderRef
    from ranker.encoder import TextEncoder, encoder_key

    bundle_dir = Path(bundle_dir)
    ref = EncoderRef(**json.loads((bundle_dir / MANIFEST).read_text())["encoder"])
    model_dir = ref.resolve(bundle_dir)
    key = encoder_key(model_dir, ref.max_length)
    try:
        current = load_probes(bundle_dir)
    except ValueError:
        current = None
    if current is not None and current.encoder_key == key and not force:
        return None
    return save_probes(bundle_dir, compute_probes(TextEncoder(model_dir, ref.max_length), key))


def min_cosine(reference: np.ndarray, got: np.ndarray) -> float:
    """The smallest cosine between matching rows (the rows need not be unit length)."""
    if reference.shape != got.shape:
        return -1.0
    a = reference / np.maximum(np.linalg.norm(reference, axis=1, keepdims=True), 1e-12)
    b = got / np.maximum(np.linalg.norm(got, axis=1, keepdims=True), 1e-12)
    return float(np.min(np.sum(a * b, axis=1)))
