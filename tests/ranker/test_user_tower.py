"""The user tower (`ranker.user_tower`): its arithmetic, its torch twin, and its place in the bundle."""

import json

import lightgbm as lgb
import numpy as np
import pytest
import torch

from ranker.bundle import BundleError, EncoderRef, load_bundle, save_bundle
from ranker.user_tower import WEIGHTS_FILE, UserTower, pool_torch, user_vectors


def unit(rng, n, d=16):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_pooled_is_the_normalised_recency_weighted_sum():
    tower = UserTower.pooled(3, 0.5)
    e = np.eye(4, dtype=np.float32)
    u = tower.pool(np.stack([e[[2, 0, 1]]]))  # most recent first
    w = np.array([0.5, 0.25, 1.0, 0.0])
    np.testing.assert_allclose(u[0], w / np.linalg.norm(w), rtol=1e-6)
    assert u.dtype == np.float32


def test_missing_items_are_left_out_and_keep_the_others_weights():
    tower = UserTower.pooled(3, 0.5)
    e = np.eye(3, dtype=np.float32)
    items = np.vstack([e, np.full((1, 3), np.nan, dtype=np.float32)])  # row 3: no vector (NaN)
    has = np.array([True, True, False, True])  # row 2: not current
    u = tower.pool_rows([[3, 0, 1], [2], [], [-1, 1]], items, has)
    w0 = np.array([0.5, 0.25, 0.0])  # row 3 left out: rows 0 and 1 keep positions 1 and 2
    np.testing.assert_allclose(u[0], w0 / np.linalg.norm(w0), rtol=1e-6)
    assert np.isnan(u[1]).all() and np.isnan(u[2]).all()  # nothing left: NaN, a missing feature
    np.testing.assert_allclose(u[3], [0, 1, 0], rtol=1e-6)


def test_history_past_the_tower_size_is_cut():
    rng = np.random.default_rng(0)
    items = unit(rng, 30)
    tower = UserTower.pooled(4, 0.7)
    np.testing.assert_array_equal(tower.pool_rows([list(range(10))], items), tower.pool_rows([[0, 1, 2, 3]], items))


def test_training_tower_equals_serving_tower():
    """Given the same item vectors, the torch tower the encoder trains through and the numpy tower
    the server runs give the same user vector (rtol 1e-6), masks included."""
    rng = np.random.default_rng(1)
    tower = UserTower("pooled", 10, rng.uniform(0.01, 1.0, 10))
    vectors = np.stack([unit(rng, 10, 384) for _ in range(64)])
    mask = rng.random((64, 10)) < 0.8
    mask[:, 0] = True
    served = tower.pool(vectors, mask)
    trained = pool_torch(torch.from_numpy(vectors), torch.from_numpy(mask), torch.from_numpy(tower.position_weights.copy()))
    np.testing.assert_allclose(trained.numpy(), served, rtol=1e-6)
    # and its gradient reaches the vectors and the weights
    v = torch.from_numpy(vectors).requires_grad_()
    w = torch.from_numpy(tower.position_weights.copy()).requires_grad_()
    pool_torch(v, torch.from_numpy(mask), w)[:, 0].sum().backward()
    assert v.grad is not None and w.grad is not None and torch.isfinite(w.grad).all()


def test_text_tower_encodes_each_distinct_text_once():
    calls = []

    def encode(texts):
        calls.append(list(texts))
        return np.eye(len(texts), 5, dtype=np.float32)

    titles = ["a", "b", "", "d"]
    u = user_vectors(UserTower.text(2), [[0, 1, 3], [0, 1], [2], []], np.zeros((4, 5)), titles, encode)
    assert calls == [["a | b"]]  # the first two titles, once; an empty title is skipped
    np.testing.assert_array_equal(u[0], u[1])
    assert np.isnan(u[2]).all() and np.isnan(u[3]).all()
    with pytest.raises(ValueError, match="titles and an encoder"):
        user_vectors(UserTower.text(2), [[0]], np.zeros((4, 5)))


def test_keys_tell_towers_apart():
    keys = {UserTower.pooled().key, UserTower.pooled(10, 0.6).key, UserTower.pooled(5).key, UserTower.text(5).key,
            UserTower.text(3).key}
    assert len(keys) == 5
    assert UserTower.pooled() == UserTower.pooled() and UserTower.pooled() != UserTower.text(10)


@pytest.mark.parametrize("make, match", [
    (lambda: UserTower("mean", 3), "kind must be one of"),
    (lambda: UserTower.pooled(11), "online state keeps"),
    (lambda: UserTower("pooled", 3, np.array([1.0, -1.0, 0.0])), "non-negative"),
    (lambda: UserTower("pooled", 3, np.array([1.0, 0.5])), "must be 3"),
    (lambda: UserTower.pooled(3, 0.0), "decay"),
    (lambda: UserTower.text(0), "history_items must be >= 1"),
])
def test_bad_towers_are_refused(make, match):
    with pytest.raises(BundleError, match=match):
        make()


def _booster():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 2))
    return lgb.train({"objective": "lambdarank", "verbose": -1, "min_data_in_leaf": 2}, lgb.Dataset(
        X, rng.integers(0, 2, 60), group=[10] * 6, feature_name=["interest_score", "item_clicks_7d"]), 3)


def test_bundle_keeps_its_tower(tmp_path):
    tower = UserTower("pooled", 4, np.array([1.0, 0.6, 0.3, 0.1]))
    save_bundle(tmp_path / "b", _booster(), ["interest_score", "item_clicks_7d"], EncoderRef(history_items=4), {},
                tower=tower)
    assert (tmp_path / "b" / WEIGHTS_FILE).is_file()
    assert load_bundle(tmp_path / "b").tower == tower
    # a bundle from before towers (no manifest entry) serves its text tower
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    old = {k: v for k, v in manifest.items() if k != "user_tower"}
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(old))
    assert load_bundle(tmp_path / "b").tower == UserTower.text(4)


@pytest.mark.parametrize("damage, match", [
    (lambda d, m: (d / WEIGHTS_FILE).unlink(), "missing"),
    (lambda d, m: (d / WEIGHTS_FILE).write_bytes(b"\x00" * 20), "not a safetensors file"),
    (lambda d, m: m["user_tower"].update(position_weights=[1.0, 1.0, 1.0]), "differ from"),
    (lambda d, m: m["user_tower"].update(weights_file="../elsewhere.safetensors"), "in the bundle directory"),
    (lambda d, m: m.update(user_tower={"kind": "pooled"}), "'user_tower' must be"),
])
def test_a_damaged_tower_is_a_bundle_error(tmp_path, damage, match):
    save_bundle(tmp_path / "b", _booster(), ["interest_score", "item_clicks_7d"], EncoderRef(), {},
                tower=UserTower.pooled(3))
    mf = tmp_path / "b" / "manifest.json"
    manifest = json.loads(mf.read_text())
    damage(tmp_path / "b", manifest)
    mf.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=match):
        load_bundle(tmp_path / "b")
