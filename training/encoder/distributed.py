"""Data-parallel encoder fine-tuning over `torch.distributed`, started by `torchrun` (issue 32 item 2).

    torchrun --nproc-per-node 2 .venv/bin/semrank train encoder --data D --out OUT ...   # one machine
    torchrun --nnodes 2 --node-rank K --master-addr HEAD --master-port 29500 \\
             --nproc-per-node 8 .venv/bin/semrank train encoder ...                        # several

`training.encoder.train.train_encoder` sees torchrun's environment (`WORLD_SIZE` > 1) and joins the
process group (`init_from_env`: NCCL on GPUs, gloo on CPUs). Every process builds the same pairs and
the same global batches (same seed); process r takes its contiguous slice of each. The model is
wrapped in `DistributedDataParallel`, which all-reduces the gradients every step.

In-batch negatives are global: each process embeds only its slice's item texts, then gathers every
process's embeddings with a **gradient-carrying** all-gather (`gather_rows`,
`torch.distributed.nn.functional.all_gather`), so its users are scored against the whole batch's
candidates and the gradient of a gathered row flows back to the process that embedded it. The
weighted loss is normalised by the whole batch's weight (`all_sum`): the sum of the processes'
losses is the one-process loss of the same global batch, and so is the gradient DDP averages
(each process backpropagates world_size x its share). `tests/training/encoder/test_distributed.py`
checks both on 2 CPU processes, dropout off.

Only process 0 validates, saves and writes curves; the others wait at a barrier, and the decision
to stop (the time budget) is process 0's, broadcast every step.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def init_from_env() -> bool:
    """Join torchrun's process group when its environment says there are several processes; True
    when this call started it (the caller then ends it with `dist.destroy_process_group`)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return True


def my_slice(rows: np.ndarray) -> np.ndarray:
    """This process's contiguous share of a global batch's rows (rank order = row order)."""
    return np.array_split(rows, world_size())[rank()]


def _sizes(n: int) -> list[int]:
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([n], dtype=torch.int64))
    return [int(s) for s in sizes]


def gather_rows(x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Every process's rows of `x` in rank order, and how many each gave (they may differ). The
    gather carries gradients: a row's gradient from every process's loss returns to its owner."""
    from torch.distributed.nn.functional import all_gather

    sizes = _sizes(x.shape[0])
    pad = max(sizes) - x.shape[0]
    padded = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))]) if pad else x
    parts = all_gather(padded.contiguous())
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]), sizes


def gather_ids(ids: np.ndarray) -> np.ndarray:
    """Every process's int64 ids in rank order (no gradients)."""
    t = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))
    sizes = _sizes(t.numel())
    padded = torch.cat([t, t.new_zeros(max(sizes) - t.numel())])
    parts = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]).numpy()


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum over processes of a tensor without gradients (a copy; `x` is left alone)."""
    out = x.detach().clone()
    dist.all_reduce(out)
    return out


def agree(flag: bool) -> bool:
    """Process 0's decision, the same on every process."""
    t = torch.tensor([1 if flag else 0], dtype=torch.int64)
    dist.broadcast(t, src=0)
    return bool(t.item())
