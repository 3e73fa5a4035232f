import numpy as np
import pytest

from training.ranking_metrics import group_metrics, mean_metrics


def test_perfect_and_worst_order():
    labels = np.array([0, 0, 3, 1, 0], dtype=float)
    best = group_metrics(np.array([0, 0, 9, 5, 0.0]), labels)
    assert best["ndcg@10"] == pytest.approx(1.0) and best["mrr"] == 1.0 and best["auc"] == 1.0
    worst = group_metrics(np.array([5, 4, 0, 1, 3.0]), labels)
    assert worst["ndcg@10"] < 0.6 and worst["auc"] == 0.0 and worst["mrr"] == pytest.approx(1 / 4)


def test_known_ndcg_value():
    # one relevant item (gain 1) at rank 3: 1/log2(4) = 0.5
    m = group_metrics(np.array([3, 2, 1.0]), np.array([0, 0, 1.0]))
    assert m["ndcg@10"] == pytest.approx(0.5) and m["hr@10"] == 1.0


def test_hr_at_k_cutoff_and_nan_scores_rank_last():
    labels = np.zeros(12)
    labels[0] = 1
    scores = np.arange(12, dtype=float)  # the positive is last
    assert group_metrics(scores, labels)["hr@10"] == 0.0
    scores = np.full(12, np.nan)
    scores[1:] = 1.0
    assert group_metrics(scores, labels)["mrr"] == pytest.approx(1 / 12)


def test_ties_keep_input_order():
    m = group_metrics(np.zeros(4), np.array([0, 1, 0, 0.0]))
    assert m["mrr"] == 0.5


def test_mean_skips_groups_without_positives():
    scores = np.array([1, 0, 1, 0.0])
    labels = np.array([1, 0, 0, 0.0])
    out = mean_metrics(scores, labels, np.array([2, 2]))
    assert out["groups"] == 1 and out["ndcg@10"] == 1.0
    with pytest.raises(ValueError, match="no group has a positive"):
        mean_metrics(scores, np.zeros(4), np.array([2, 2]))
