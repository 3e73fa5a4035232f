"""The sequence model's numpy forward pass (`ranker.sequence.SequenceState`, what a server runs
without torch) equals the trained torch model's scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ranker.sequence import SASRecConfig, SequenceState
from ranker.sequence_torch import SASRec, last_scores


@pytest.mark.parametrize("text", [False, True])
def test_the_numpy_forward_equals_the_torch_model(tmp_path, text):
    torch.manual_seed(1)
    rng = np.random.default_rng(1)
    n_items = 30
    cfg = SASRecConfig(max_len=8, dim=16, heads=2, layers=2, dropout=0.3, text=text)
    vectors = rng.normal(size=(n_items, 12)).astype(np.float32) if text else None
    model = SASRec(n_items, cfg, vectors)
    with torch.no_grad():  # trained-looking weights, not the initial ones (biases 0, norms 1)
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.eval()
    histories = [rng.integers(0, n_items, size=k) for k in (1, 3, 8, 20)]  # 20: longer than max_len
    want = last_scores(model, histories)
    state = SequenceState(cfg, {k: v.numpy() for k, v in model.state_dict().items()})
    items = np.arange(n_items)
    for h, w in zip(histories, want):
        got = state.scores(state.user_vector(h), items)
        np.testing.assert_allclose(got, w, rtol=1e-4, atol=1e-4)
    assert state.user_vector(np.zeros(0, dtype=np.int64)) is None


def test_it_loads_from_the_model_files_without_torch(tmp_path):
    from training.sequence.sasrec import save

    torch.manual_seed(0)
    cfg = SASRecConfig(max_len=6, dim=8, heads=2, layers=1)
    model = SASRec(12, cfg).eval()
    ids = [f"i{k}" for k in range(12)]
    save(model, ids, {"format": 1, "config": cfg.__dict__, "n_items": 12, "curve": []}, tmp_path / "m")
    state, meta = SequenceState.load(tmp_path / "m")
    assert meta["item_ids"] == ids and state.cfg == cfg
    h = np.array([3, 4, 5])
    np.testing.assert_allclose(state.scores(state.user_vector(h), np.arange(12)), last_scores(model, [h])[0],
                               rtol=1e-4, atol=1e-4)
