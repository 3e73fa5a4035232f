"""Ranking metrics over groups (one group = one ranked list).

Graded relevance: gain = 2**label - 1. Within a group, items are ordered by
score descending; ties (and NaN scores, which rank last) keep the order in
which the items were given, so a constant score reproduces the input order.
"""

from __future__ import annotations

import numpy as np


def order_by_score(scores: np.ndarray) -> np.ndarray:
    """Indices best first; NaN last; ties stable."""
    s = np.where(np.isnan(scores), -np.inf, scores)
    return np.argsort(-s, kind="stable")


def dcg(gains_in_rank_order: np.ndarray, k: int) -> float:
    g = gains_in_rank_order[:k]
    return float(np.sum(g / np.log2(np.arange(2, g.size + 2))))


def group_metrics(scores: np.ndarray, labels: np.ndarray, k: int = 10) -> dict[str, float]:
    """nDCG@k, nDCG@5, HR@k (any positive in top k), MRR (first positive) and AUC for one group."""
    order = order_by_score(scores)
    ranked = labels[order]
    gains = np.power(2.0, ranked) - 1.0
    ideal = np.sort(np.power(2.0, labels) - 1.0)[::-1]
    idcg_k, idcg_5 = dcg(ideal, k), dcg(ideal, 5)
    pos = np.flatnonzero(ranked > 0)
    out = {
        f"ndcg@{k}": dcg(gains, k) / idcg_k if idcg_k > 0 else float("nan"),
        "ndcg@5": dcg(gains, 5) / idcg_5 if idcg_5 > 0 else float("nan"),
        f"hr@{k}": float(pos.size > 0 and pos[0] < k),
        "mrr": 1.0 / (pos[0] + 1) if pos.size else 0.0,
    }
    n_pos, n_neg = int((labels > 0).sum()), int((labels <= 0).sum())
    if n_pos and n_neg:
        # Probability that a random positive outranks a random negative (ties count half).
        ranks = np.empty(labels.size)
        ranks[order] = np.arange(labels.size)
        pr, nr = ranks[labels > 0], ranks[labels <= 0]
        out["auc"] = float(np.mean(pr[:, None] < nr[None, :]))
    else:
        out["auc"] = float("nan")
    return out


def mean_metrics(scores: np.ndarray, labels: np.ndarray, group_sizes: np.ndarray, k: int = 10) -> dict[str, float]:
    """Mean of `group_metrics` over groups that have at least one positive label."""
    rows = []
    start = 0
    for n in group_sizes:
        sl = slice(start, start + int(n))
        start += int(n)
        if (labels[sl] > 0).any():
            rows.append(group_metrics(scores[sl], labels[sl], k))
    if not rows:
        raise ValueError("no group has a positive label; nothing to evaluate")
    keys = rows[0].keys()
    out = {key: float(np.nanmean([r[key] for r in rows])) for key in keys}
    out["groups"] = len(rows)
    return out
