"""The two-tower model that fine-tunes the text encoder, and its loss (`training.encoder.train` runs it).

    net = TwoTower(encoder, scale=20.0, tower=UserTower.pooled())
    loss = net(batch)    # weighted InfoNCE over in-batch items plus hard negatives (`contrastive_loss`)

One shared transformer embeds both sides: the item text, and on the user side either the history
text (text tower) or the item vectors of the history pooled by the service's own function (pooled
tower, `ranker.user_tower.pool_torch`). Under torchrun each process's users meet every process's
candidates (`TwoTower.global_loss`, `training.encoder.distributed`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ranker.encoder import mean_pool
from ranker.user_tower import UserTower, pool_torch
from training.encoder import distributed


def contrastive_loss(
    user_emb: torch.Tensor,
    item_emb: torch.Tensor,
    weights: torch.Tensor,
    hard_neg_emb: torch.Tensor | None = None,
    scale: float = 20.0,
    exclude: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    weight_total: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted InfoNCE (multiple-negatives ranking loss) over cosine similarities.

    Row i of `user_emb` (B, d) should match row `targets[i]` of `item_emb` (N, d) (default: row i,
    N = B); every other item and every row of `hard_neg_emb` (H, d) is a negative for it.
    `exclude` (B, N + H) bool marks candidates that are not negatives (other known positives of the
    user); a user's own target is never excluded. Returns sum_i w_i * CE_i / `weight_total`
    (default sum_i w_i; data-parallel training passes the whole batch's, over every process).
    """
    n = user_emb.shape[0]
    if targets is None:
        if user_emb.shape != item_emb.shape:
            raise ValueError(f"user_emb {tuple(user_emb.shape)} and item_emb {tuple(item_emb.shape)} must have the same shape")
        targets = torch.arange(n, device=user_emb.device)
    elif targets.shape != (n,) or user_emb.shape[1:] != item_emb.shape[1:]:
        raise ValueError(f"targets must have shape ({n},) and the embeddings one width, got {tuple(targets.shape)}, "
                         f"{tuple(user_emb.shape)}, {tuple(item_emb.shape)}")
    if weights.shape != (n,):
        raise ValueError(f"weights must have shape ({n},), got {tuple(weights.shape)}")
    cands = item_emb if hard_neg_emb is None else torch.cat([item_emb, hard_neg_emb])
    logits = scale * F.normalize(user_emb, dim=-1) @ F.normalize(cands, dim=-1).T
    rows = torch.arange(n, device=logits.device)
    if exclude is not None:
        if exclude.shape != logits.shape:
            raise ValueError(f"exclude must have shape {tuple(logits.shape)}, got {tuple(exclude.shape)}")
        exclude = exclude.clone()
        exclude[rows, targets] = False
        logits = logits.masked_fill(exclude, float("-inf"))
    ce = F.cross_entropy(logits, targets, reduction="none")
    w = weights.to(ce.dtype)
    total = w.sum() if weight_total is None else weight_total.to(ce.dtype)
    return (w * ce).sum() / total.clamp_min(1e-12)


class TwoTower(nn.Module):
    """One shared transformer for users and items; `forward` returns the loss.

    Text tower: the user side is the transformer over the history text. Pooled tower: the user side
    is `ranker.user_tower.pool_torch` over the item vectors of the history, the same function the
    service runs, with the position weights as parameters (log scale) when they are learned."""

    def __init__(self, encoder: nn.Module, scale: float, tower: UserTower, learn_tower: bool = False):
        super().__init__()
        self.encoder, self.scale, self.kind = encoder, scale, tower.kind
        if tower.kind == "pooled":
            log_w = torch.log(torch.from_numpy(tower.position_weights.astype(np.float64)).clamp_min(1e-12))
            self.log_weights = nn.Parameter(log_w.float(), requires_grad=learn_tower)

    def tower(self) -> UserTower:
        """The user tower as it stands (the learned weights, normalised to a first weight of 1)."""
        if self.kind == "text":
            raise ValueError("a text tower has no weights; use the config's")
        w = torch.exp(self.log_weights.detach().double())
        return UserTower("pooled", int(w.numel()), (w / w[0]).numpy())

    def embed(self, batch: dict) -> torch.Tensor:
        hidden = self.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        return mean_pool(hidden.float(), batch["attention_mask"])

    def users(self, it: torch.Tensor, b: dict) -> torch.Tensor:
        """The pooled user vectors of batch `b` from the embedded items `it`: the positions with gradients
        gather rows of `it`, the others come from the batch's cached vectors."""
        pos = b["history_pos"]  # (B, g) rows of `it`, -1 none
        vectors, mask = it[pos.clamp_min(0)], pos >= 0
        if b.get("history_cached") is not None:
            vectors = torch.cat([vectors, b["history_cached"]], dim=1)
            mask = torch.cat([mask, b["history_cached_mask"]], dim=1)
        with torch.autocast("cpu", enabled=False):
            return pool_torch(vectors.float(), mask, torch.exp(self.log_weights))

    def forward(self, b: dict) -> torch.Tensor:
        """The batch's loss; under torchrun this process's share of the global batch's (`global_loss`)."""
        it = self.embed(b["items"])
        n = b["weights"].shape[0]
        u = self.users(it, b) if self.kind == "pooled" else self.embed(b["users"])
        c = b["n_candidates"]
        with torch.autocast("cpu", enabled=False):
            if distributed.world_size() > 1:
                return self.global_loss(u, it, b)
            return contrastive_loss(u, it[:n], b["weights"], it[n:c] if c > n else None, self.scale, b["exclude"])

    def global_loss(self, u: torch.Tensor, it: torch.Tensor, b: dict) -> torch.Tensor:
        """This process's users against every process's candidates (targets, then hard negatives, each
        in rank order), gathered with their gradients; weighted by the whole batch's weight, so the
        processes' losses sum to the one-process loss (`training.encoder.distributed`)."""
        n, c = b["weights"].shape[0], b["n_candidates"]
        targets, sizes = distributed.gather_rows(it[:n].float())
        hard, _ = distributed.gather_rows(it[n:c].float())
        ids = np.concatenate([distributed.gather_ids(b["cand_ids"][:n]), distributed.gather_ids(b["cand_ids"][n:])])
        exclude = torch.from_numpy(exclusion(ids, b["target_ids"], b["known"]))
        first = sum(sizes[: distributed.rank()])
        return contrastive_loss(u, targets, b["weights"], hard if hard.shape[0] else None, self.scale, exclude,
                                targets=torch.arange(first, first + n), weight_total=distributed.all_sum(b["weights"].sum()))


def exclusion(cands: np.ndarray, targets: np.ndarray, known: list[np.ndarray]) -> np.ndarray:
    """(users, candidates) bool: a candidate that is one of the user's known items, or their target, is
    no negative for them (`contrastive_loss` keeps each user's own target)."""
    return np.stack([np.isin(cands, k) | (cands == t) for t, k in zip(targets.tolist(), known)])
