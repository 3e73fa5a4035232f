"""A small LoRA (Hu et al. 2021) for the encoder's nn.Linear layers.

`apply_lora` swaps chosen nn.Linear modules of a model for `LoRALinear`
wrappers (frozen base weight plus a trainable rank-r update `B @ A`, B = 0 at
start so the wrapped model computes exactly what the base did) and freezes
every other parameter. `merge_lora` folds the updates back into plain
nn.Linear layers, so a saved model is an ordinary BertModel that loads without
this module.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch import nn

log = logging.getLogger(__name__)

# Module-name suffixes inside a BertModel layer.
ATTENTION_QV = ("attention.self.query", "attention.self.value")
ATTENTION_ALL = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense")
DENSE = ("intermediate.dense", "output.dense")


class LoRALinear(nn.Module):
    """y = base(x) + dropout(x) @ A^T @ B^T * (alpha / r); the base layer stays frozen."""

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, dtype=base.weight.dtype))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear does; B = 0 keeps the output
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        for p in self.base.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (self.dropout(x) @ self.lora_a.t() @ self.lora_b.t()) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_b @ self.lora_a) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain nn.Linear computing the adapted function (without dropout)."""
        out = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None)
        out = out.to(device=self.base.weight.device, dtype=self.base.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.base.weight + self.delta_weight().to(self.base.weight.dtype))
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
        return out


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def apply_lora(
    model: nn.Module,
    targets: Sequence[str] = ATTENTION_QV,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
) -> list[str]:
    """Wrap every nn.Linear whose name ends with one of `targets`; freeze all other parameters.

    Returns the wrapped module names. Raises ValueError when nothing matches (a typo in
    `targets` would otherwise train nothing).
    """
    names = [
        n for n, m in model.named_modules() if isinstance(m, nn.Linear) and any(n == t or n.endswith("." + t) for t in targets)
    ]
    if not names:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"no nn.Linear matches LoRA targets {list(targets)}; linear layer names end with {linear}")
    for p in model.parameters():
        p.requires_grad_(False)
    for n in names:
        _set_submodule(model, n, LoRALinear(model.get_submodule(n), rank=rank, alpha=alpha, dropout=dropout))
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    log.info("LoRA r=%d alpha=%g on %d layers: %d trainable of %d parameters (%.2f%%)", rank, alpha, len(names), n_train, n_all, 100 * n_train / n_all)
    return names


def lora_modules(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by its merged nn.Linear, in place; returns the model.

    Parameters are left trainable (a merged model is a plain model again).
    """
    for n in lora_modules(model):
        _set_submodule(model, n, model.get_submodule(n).merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model
