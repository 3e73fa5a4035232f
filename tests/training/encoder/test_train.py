"""Encoder fine-tuning: loss maths, LoRA, leakage-free pairs, and a tiny end-to-end run."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import numpy as np
import polars as pl
import pytest
import torch

from featurizer.contracts.schema import (
    Dataset,
    catalog_report,
    validate_events,
    validate_items,
)
from training.encoder.lora import LoRALinear, apply_lora, lora_modules, merge_lora
from training.encoder.pairs import (
    NO_ITEM,
    embed_texts,
    impression_pairs,
    loo_pairs,
    sample_epoch,
    sampled_metrics,
)
from ranker.user_tower import UserTower
from training.encoder.tower import encoder_tower
from training.encoder.train import EncoderTrainConfig, save_encoder, train_encoder
from training.encoder.two_tower import contrastive_loss


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


# ---------------------------------------------------------------- contrastive_loss


def test_loss_is_lower_when_positives_align():
    g = torch.Generator().manual_seed(0)
    users = _unit(torch.randn(8, 16, generator=g))
    w = torch.ones(8)
    aligned = contrastive_loss(users, users.clone(), w)
    shuffled = contrastive_loss(users, users[torch.randperm(8, generator=g)], w)
    assert aligned < shuffled
    assert aligned < np.log(8)  # better than chance


def test_weights_scale_each_rows_contribution():
    g = torch.Generator().manual_seed(1)
    users, items = _unit(torch.randn(4, 8, generator=g)), _unit(torch.randn(4, 8, generator=g))
    per_row = torch.stack([contrastive_loss(users, items, torch.eye(4)[i]) for i in range(4)])
    w = torch.tensor([3.0, 1.0, 0.0, 2.0])
    expected = (w * per_row).sum() / w.sum()
    torch.testing.assert_close(contrastive_loss(users, items, w), expected)
    torch.testing.assert_close(contrastive_loss(users, items, 10 * w), expected)  # only relative weights matter
    assert not torch.isclose(contrastive_loss(users, items, torch.ones(4)), expected)


def test_similar_hard_negatives_increase_the_loss():
    g = torch.Generator().manual_seed(2)
    users = _unit(torch.randn(6, 16, generator=g))
    items = _unit(users + 0.3 * torch.randn(6, 16, generator=g))
    w = torch.ones(6)
    base = contrastive_loss(users, items, w)
    similar = contrastive_loss(users, items, w, hard_neg_emb=_unit(users + 0.2 * torch.randn(6, 16, generator=g)))
    opposite = contrastive_loss(users, items, w, hard_neg_emb=-users)
    assert similar > base + 0.1
    assert base <= opposite < base + 0.01


def test_exclude_drops_false_negatives_but_never_the_positive():
    users = _unit(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    items = users.clone()
    items[1] = users[0]  # both rows' items are the same item: row 0 sees its own item as a negative
    w = torch.ones(2)
    exclude = torch.tensor([[True, True], [True, True]])  # the diagonal is ignored
    masked = contrastive_loss(users, items, w, exclude=exclude)
    alone = (contrastive_loss(users[:1], items[:1], w[:1]) + contrastive_loss(users[1:], items[1:], w[:1])) / 2
    torch.testing.assert_close(masked, alone)
    assert contrastive_loss(users, items, w) > masked


def test_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        contrastive_loss(torch.randn(3, 4), torch.randn(2, 4), torch.ones(3))
    with pytest.raises(ValueError, match="weights"):
        contrastive_loss(torch.randn(3, 4), torch.randn(3, 4), torch.ones(2))


def test_sampled_metrics_ranks_and_ties():
    scores = np.array([[0.9, 0.1, 0.2], [0.1, 0.5, 0.2], [0.5, 0.5, 0.1]])
    m = sampled_metrics(scores, k=2)
    # ranks 0, 2 (miss at k=2), 1 (a tie counts against the target)
    assert m["hr@2"] == pytest.approx(2 / 3)
    assert m["ndcg@2"] == pytest.approx((1.0 + 0.0 + 1 / np.log2(3)) / 3)


# ---------------------------------------------------------------- LoRA


@pytest.fixture(scope="module")
def tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    return BertModel(cfg).eval()


def _out(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state


def test_lora_starts_as_the_base_model_and_trains_only_adapters(tiny_bert):
    import copy

    ids = torch.randint(0, 100, (3, 7), generator=torch.Generator().manual_seed(0))
    wrapped = copy.deepcopy(tiny_bert)
    names = apply_lora(wrapped, ("query", "value"), rank=4)
    assert len(names) == 4 and all(isinstance(wrapped.get_submodule(n), LoRALinear) for n in names)
    torch.testing.assert_close(_out(wrapped, ids), _out(tiny_bert, ids))
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_a", "lora_b")) for n in trainable)
    with pytest.raises(ValueError, match="no nn.Linear matches"):
        apply_lora(copy.deepcopy(tiny_bert), ("qkv",))


def test_merged_weights_reproduce_the_adapted_output(tiny_bert):
    import copy

    ids = torch.randint(0, 100, (3, 7), generator=torch.Generator().manual_seed(1))
    wrapped = copy.deepcopy(tiny_bert)
    apply_lora(wrapped, ("query", "value", "dense"), rank=4)
    with torch.no_grad():
        for n in lora_modules(wrapped):
            wrapped.get_submodule(n).lora_b.normal_(0, 0.1)
    adapted = _out(wrapped, ids)
    assert not torch.allclose(adapted, _out(tiny_bert, ids), atol=1e-3)
    merged = merge_lora(wrapped)
    assert not lora_modules(merged)
    assert all(type(m) is not LoRALinear for m in merged.modules())
    torch.testing.assert_close(_out(merged, ids), adapted, atol=1e-5, rtol=1e-5)


def test_saved_encoder_loads_in_text_encoder_with_the_same_embeddings(tmp_path):
    from transformers import AutoModel, AutoTokenizer

    from ranker.encoder import TextEncoder, base_model_path

    tok = AutoTokenizer.from_pretrained(base_model_path())
    model = AutoModel.from_pretrained(base_model_path())
    apply_lora(model, ("query", "value"), rank=4)
    with torch.no_grad():
        for n in lora_modules(model):
            model.get_submodule(n).lora_b.normal_(0, 0.02)
    save_encoder(model, tok, tmp_path / "encoder", {"method": "lora"}, UserTower.text(5))
    assert (tmp_path / "encoder" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "encoder" / "training.json").read_text())["method"] == "lora"
    texts = ["Argan oil shampoo", "Matte lipstick | Nail polish remover | Eyeliner pencil"]
    expected = embed_texts(model, tok, texts, max_length=64, bf16=False)
    got = TextEncoder(model_dir=tmp_path / "encoder", max_length=64).encode(texts)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    base = TextEncoder(max_length=64).encode(texts)
    assert not np.allclose(got, base, atol=1e-4)  # the adapters were saved, not the base


# ---------------------------------------------------------------- pairs: no leakage


def _sequence_dataset(n_users: int = 12, n_items: int = 30, seed: int = 0) -> tuple[Dataset, dict[str, list[str]]]:
    rng = np.random.default_rng(seed)
    items = validate_items(pl.DataFrame({"item_id": [f"i{k}" for k in range(n_items)], "title": [f"item {k}" for k in range(n_items)]}))
    t0 = datetime(2024, 1, 1, tzinfo=timezone.utc)
    rows, seqs = [], {}
    for u in range(n_users):
        seq = [f"i{k}" for k in rng.choice(n_items, int(rng.integers(2, 9)), replace=False)]
        seqs[f"u{u}"] = seq
        rows += [{"ts": t0 + timedelta(days=int(p // 2)), "user_id": f"u{u}", "item_id": i, "event": "purchase", "seq_pos": p} for p, i in enumerate(seq)]
    events = validate_events(pl.DataFrame(rows))
    return Dataset(items=items, events=events, report=catalog_report(events, items)), seqs


def test_loo_pairs_never_use_validation_or_test_items_nor_later_history():
    ds, seqs = _sequence_dataset()
    data = loo_pairs(ds, history_items=3, val_users=100, n_negatives=5, negative_pool=None, seed=0)
    long_users = sorted(u for u, s in seqs.items() if len(s) >= 3)
    assert data.users[: len(long_users)] == long_users
    item_pos = {}  # (user index, item index) -> position; user index as in the split (long users first)
    for ui, u in enumerate(long_users):
        for p, i in enumerate(seqs[u]):
            item_pos[ui, data.item_ids.index(i)] = p
    held_out = {(ui, data.item_ids.index(i)) for ui, u in enumerate(long_users) for i in seqs[u][-2:]}
    p = data.pairs
    assert len(p) > 0
    for r in range(len(p)):
        u, t = int(p.user[r]), int(p.target[r])
        assert (u, t) not in held_out
        if u < len(long_users):
            hist = [h for h in p.history[r] if h != NO_ITEM]
            assert hist and all(item_pos[u, h] < item_pos[u, t] for h in hist)
            assert [item_pos[u, h] for h in hist] == sorted((item_pos[u, h] for h in hist), reverse=True)  # most recent first
    v = data.valid
    assert v.users == long_users
    for k, u in enumerate(v.users):
        assert data.item_ids[v.target[k]] == seqs[u][-2]
        assert [data.item_ids[h] for h in v.history[k] if h != NO_ITEM] == seqs[u][:-2][::-1][:3]
        assert not set(v.negatives[k]) & {data.item_ids.index(i) for i in seqs[u]}


def test_sample_epoch_is_bounded_per_user_and_favours_recent_pairs():
    ds, _ = _sequence_dataset(n_users=40, seed=3)
    pairs = loo_pairs(ds, history_items=3, val_users=1, n_negatives=5, negative_pool=None, seed=0).pairs
    rng = np.random.default_rng(0)
    counts = np.zeros(pairs.recency.max() + 1)
    for _ in range(200):
        chosen = sample_epoch(pairs, rng, pairs_per_user=1, recency_half_life=1.0)
        assert np.bincount(pairs.user[chosen]).max() == 1 and len(set(chosen)) == chosen.size
        counts += np.bincount(pairs.recency[chosen], minlength=counts.size)
    assert counts[0] > counts[1] > counts[2]


@pytest.fixture(scope="module")
def tiny_shop(tmp_path_factory):
    from featurizer.contracts.schema import read_dataset
    from training.data.synth import SynthConfig, synthesize

    out = tmp_path_factory.mktemp("tiny_shop")
    synthesize(out, 3, SynthConfig(n_users=80, n_items=60, n_days=6))
    return out, read_dataset(out)


def test_impression_pairs_train_on_the_past_with_shown_hard_negatives(tiny_shop):
    _, ds = tiny_shop
    data = impression_pairs(ds, history_items=5, val_users=50, n_negatives=20, negative_pool=None, seed=0, test_days=1, valid_days=1)
    from training.lambdarank.impression_lists import impression_lists

    valid_start = datetime.fromisoformat(data.split["train_end_exclusive"])
    eng = ds.events.filter(pl.col("event").is_in(["click", "add_to_cart", "purchase"]))
    lists = impression_lists(ds.events)
    engaged_before = set(lists.filter((pl.col("ts") < valid_start) & (pl.col("label") > 0)).select("user_id", "item_id").iter_rows())
    p = data.pairs
    for r in range(len(p)):
        u, t = data.users[p.user[r]], data.item_ids[p.target[r]]
        assert (u, t) in engaged_before  # a training target was engaged in a list shown before the validation window
        assert t not in {data.item_ids[i] for i in p.hard_negatives[r]}  # hard negatives: shown, not engaged
        hist = [data.item_ids[i] for i in p.history[r] if i != NO_ITEM]
        assert hist and all((u, h) in set(eng.select("user_id", "item_id").iter_rows()) for h in hist)
    assert sum(h.size for h in p.hard_negatives) > 0
    for k, u in enumerate(data.valid.users):
        t = data.item_ids[data.valid.target[k]]
        first = eng.filter((pl.col("user_id") == u) & (pl.col("item_id") == t))["ts"].min()
        assert first >= valid_start  # validation: newly engaged inside the window


def test_impression_pair_histories_are_the_serving_history(tiny_shop):
    """Training user texts use the history serving builds (OnlineFeatures.history == user_recent_items)."""
    from featurizer.offline.pipeline import user_recent_items
    from training.lambdarank.impression_lists import impression_lists

    _, ds = tiny_shop
    data = impression_pairs(ds, history_items=5, val_users=50, n_negatives=20, negative_pool=None, seed=0, test_days=1, valid_days=1)
    valid_start = datetime.fromisoformat(data.split["train_end_exclusive"])
    catalog = set(data.item_ids)
    lists = impression_lists(ds.events).filter(pl.col("item_id").is_in(list(catalog)))
    positives = lists.filter((pl.col("ts") < valid_start) & (pl.col("label") > 0))
    expected = user_recent_items(ds.events.lazy(), ds.items.lazy(), positives.lazy(), 5).collect()
    expected = sorted((u, t, tuple(i for i in h if i in catalog)) for u, t, h in
                      expected.filter(pl.col("history").list.len() > 0).select("user_id", "item_id", "history").iter_rows())
    p = data.pairs
    got = sorted((data.users[p.user[r]], data.item_ids[p.target[r]],
                  tuple(data.item_ids[i] for i in p.history[r] if i != NO_ITEM)) for r in range(len(p)))
    assert got == expected and len(got) > 0


# ---------------------------------------------------------------- end to end


def test_tiny_end_to_end_run_writes_encoder_curves_and_manifest(tiny_shop, tmp_path):
    from ranker.bundle import EncoderRef
    from ranker.encoder import TextEncoder

    data_dir, ds = tiny_shop
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 1, "encoder": EncoderRef().__dict__}))
    cfg = EncoderTrainConfig(max_steps=2, batch_size=8, val_users=10, eval_every=2, test_days=1, valid_days=1,
                             max_length_user=32, max_length_item=24, max_minutes=5)
    summary = train_encoder(ds, tmp_path, cfg, data_source=str(data_dir))
    enc = tmp_path / "encoder"
    for f in ("model.safetensors", "config.json", "tokenizer.json", "training.json"):
        assert (enc / f).is_file(), f
    saved = json.loads((enc / "training.json").read_text())
    assert saved["status"] == "finished" and saved["steps"] == 2 and saved["data"]["split"]["kind"] == "time"
    assert set(saved["metrics"]) == {"frozen", "final", "best"}
    curves = json.loads((tmp_path / "encoder_curves.json").read_text())
    assert [r["step"] for r in curves["valid"]] == [0, 2] and len(curves["loss"]) == 2
    assert (tmp_path / "encoder_curves.png").stat().st_size > 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    ref = EncoderRef(**manifest["encoder"])
    assert ref.model_dir == "encoder" and ref.max_length == 32
    assert manifest["encoder_training"]["method"] == summary["method"]
    assert TextEncoder(model_dir=ref.resolve(tmp_path)).encode(["hello"]).shape == (1, 384)
    # the tower it trained through is recorded beside it (the best checkpoint's): pooled by default,
    # with its weights learned (they moved in 2 steps)
    tower = encoder_tower(enc)
    assert tower.kind == "pooled" and tower.history_items == 10 and tower.position_weights[0] == 1.0
    assert saved["user_tower"] == tower.manifest_entry()
    final = summary["final_tower"]["position_weights"]
    assert final[0] == 1.0 and not np.allclose(final, UserTower.pooled().position_weights, rtol=1e-6)


@pytest.mark.parametrize("history_grad", [None, 1])
def test_pooled_tower_training_runs_with_and_without_the_history_cache(tmp_path, history_grad):
    """With `history_grad` 1 the history past the first position comes from the re-embedded cache,
    and the run records its refreshes."""
    ds, _ = _sequence_dataset(n_users=30, seed=5)
    cfg = EncoderTrainConfig(max_steps=2, batch_size=4, val_users=10, val_negatives=5, eval_every=5, history_items=4,
                             max_length_item=8, max_minutes=5, history_grad=history_grad, history_cache_steps=1,
                             learn_tower=False)
    summary = train_encoder(ds, tmp_path, cfg)
    assert summary["steps"] == 2 and summary["hyper_parameters"]["tower"] == "pooled"
    assert (summary["history_cache"] or {}).get("refreshes") == (2 if history_grad == 1 else None)
    tower = encoder_tower(tmp_path / "encoder")
    assert tower == UserTower.pooled(4, 0.5)  # fixed weights: the initial ones


def test_the_loss_reaches_the_history_items_through_the_pooled_tower():
    """The user side is differentiable in the embedded history items (and the position weights)."""
    from training.encoder.two_tower import TwoTower

    two = TwoTower(torch.nn.Identity(), 20.0, UserTower.pooled(3, 0.5), learn_tower=True)
    it = torch.nn.functional.normalize(torch.randn(6, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    it.requires_grad_()
    b = {"history_pos": torch.tensor([[4, 5, -1], [5, 0, 4]]), "weights": torch.ones(2)}
    u = two.users(it, b)
    loss = contrastive_loss(u, it[:2], b["weights"])
    loss.backward()
    assert it.grad[4].abs().sum() > 0 and it.grad[5].abs().sum() > 0  # history-only rows get gradients
    assert two.log_weights.grad is not None and two.log_weights.grad[:2].abs().sum() > 0
    np.testing.assert_allclose(u.detach().numpy(), UserTower.pooled(3, 0.5).pool(
        it.detach().numpy()[[[4, 5, 0], [5, 0, 4]]], np.array([[True, True, False], [True, True, True]])), rtol=1e-6)


def test_pooled_batches_embed_each_history_item_once_with_the_candidates(tmp_path):
    from transformers import AutoTokenizer

    from ranker.encoder import base_model_path
    from training.encoder.train import _Batcher, build_data

    ds, _ = _sequence_dataset(n_users=30, seed=5)
    cfg = EncoderTrainConfig(batch_size=4, val_users=10, val_negatives=5, history_items=4, history_grad=2)
    data = build_data(ds, cfg)
    batcher = _Batcher(data, AutoTokenizer.from_pretrained(base_model_path()), cfg)
    batcher.cache = torch.arange(len(data.item_ids), dtype=torch.float32)[:, None].repeat(1, 3)  # row k = k
    rows = np.arange(4)
    b = batcher.make(rows)
    n = b["n_candidates"]
    hist = data.pairs.history[rows]
    texts = batcher.tok.batch_decode(b["items"]["input_ids"], skip_special_tokens=True)
    assert n == 4 and len(texts) == len(set(texts[n:])) + n
    for r in range(4):
        for g in range(2):
            pos = int(b["history_pos"][r, g])
            assert (pos < 0) == (hist[r, g] == NO_ITEM)
            if pos >= 0:
                assert texts[pos] == data.item_texts[hist[r, g]].lower()
        cached = b["history_cached"][r, :, 0].numpy()
        np.testing.assert_array_equal(b["history_cached_mask"][r].numpy(), hist[r, 2:] != NO_ITEM)
        np.testing.assert_array_equal(cached[hist[r, 2:] != NO_ITEM], hist[r, 2:][hist[r, 2:] != NO_ITEM])


@pytest.mark.parametrize("tower", ["pooled", "text"])
def test_tiny_lora_run_on_sequence_data(tmp_path, tower):
    ds, _ = _sequence_dataset(n_users=30, seed=5)
    cfg = EncoderTrainConfig(method="lora", max_steps=1, batch_size=4, val_users=10, val_negatives=5, eval_every=5,
                             max_length_user=16, max_length_item=8, max_minutes=5, tower=tower)
    summary = train_encoder(ds, tmp_path, cfg)
    assert summary["data"]["split"]["kind"] == "leave-one-out" and summary["steps"] == 1
    assert summary["lora"]["layers"] and not (tmp_path / "manifest.json").exists()
    assert encoder_tower(tmp_path / "encoder").kind == tower
    from safetensors import safe_open

    with safe_open(tmp_path / "encoder" / "model.safetensors", "pt") as f:
        assert not any("lora" in k for k in f.keys())  # merged into a plain BertModel


def test_cli_registers_train_encoder():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "semrank.cli", "train", "encoder", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for flag in ("--data", "--out", "--max-minutes", "--method", "--seed", "--batch-size", "--lr", "--history-items",
                 "--max-length-user", "--max-length-item", "--val-users", "--eval-every", "--tower", "--history-grad",
                 "--fixed-tower", "--tower-decay"):
        assert flag in out.stdout
