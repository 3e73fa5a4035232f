"""The SASRec-CE sequence model (issue 31 item 1): it learns an order that item counts cannot see,
its scores do not depend on the batch a history is scored in, it round-trips through its files,
and item text gives a vector to an item nobody interacted with."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from ranker.sequence import CONFIG_FILE, SASRecConfig
from ranker.sequence_torch import SASRec, last_scores
from training.data.loo import LooSplit
from training.evaluation.models import PopularityScorer
from training.evaluation.protocol import EvalConfig, evaluate
from training.sequence.sasrec import SASRecScorer, train_sasrec

N_ITEMS = 40


def cyclic_split(n_users: int = 300, seed: int = 0) -> LooSplit:
    """Each user walks the catalog in steps of +1 (mod 40) from a random start: the next item is
    fully determined by the last one, while every item is equally popular."""
    rng = np.random.default_rng(seed)
    seqs = []
    for _ in range(n_users):
        start, n = int(rng.integers(N_ITEMS)), int(rng.integers(4, 12))
        seqs.append((start + np.arange(n)) % N_ITEMS)
    ids = [f"i{k}" for k in range(N_ITEMS)]
    return LooSplit(item_ids=ids, item_index={i: k for k, i in enumerate(ids)}, titles=ids,
                    users=[f"u{k}" for k in range(n_users)], sequences=seqs, train_only=[])


FAST = SASRecConfig(max_len=12, dim=32, layers=1, heads=2, dropout=0.0, lr=5e-3, batch_size=64, epochs=30,
                    eval_every=5, patience=3, valid_users=200)


def test_it_learns_the_order_that_popularity_cannot_see(tmp_path):
    split = cyclic_split()
    model, summary = train_sasrec(split, FAST, tmp_path / "sasrec", progress=False)
    assert summary["best_valid_ndcg@10"] > 0.9, summary["curve"]
    run = evaluate(split, [SASRecScorer.load("sasrec", tmp_path / "sasrec", split.item_ids),
                           PopularityScorer(split.train_item_counts("test"))],
                   EvalConfig(protocols=("full",), users=300, seed=0), progress=False)
    hit = {name: float((r <= 10).mean()) for name, r in run.ranks["full"].items()}
    assert hit["sasrec"] > 0.95 and hit["popularity"] < 0.5, hit  # the test target, never trained on
    meta = json.loads((tmp_path / "sasrec" / CONFIG_FILE).read_text())
    assert meta["item_ids"] == split.item_ids and meta["curve"] and meta["stopped_by"] in ("epochs", "patience")
    assert (tmp_path / "sasrec" / "sasrec_curves.png").stat().st_size > 0


def test_a_history_scores_the_same_alone_and_in_a_batch_of_longer_ones():
    torch.manual_seed(0)
    model = SASRec(N_ITEMS, SASRecConfig(max_len=10, dim=16, heads=2, layers=2, dropout=0.3))
    short, long_ = np.array([3, 4, 5]), np.arange(20) % N_ITEMS
    alone = last_scores(model, [short])
    batched = last_scores(model, [long_, short, np.array([7])])
    np.testing.assert_allclose(batched[1], alone[0], rtol=1e-5, atol=1e-5)
    assert not np.allclose(batched[0], batched[1])  # (the histories do change the scores)
    np.testing.assert_allclose(last_scores(model, [long_])[0], last_scores(model, [long_[-10:]])[0], rtol=1e-5, atol=1e-5)


def test_the_saved_model_scores_as_the_trained_one_and_refuses_another_catalog(tmp_path):
    split = cyclic_split(80)
    cfg = SASRecConfig(max_len=8, dim=16, layers=1, heads=2, epochs=2, eval_every=1, valid_users=50)
    model, _ = train_sasrec(split, cfg, tmp_path / "m", progress=False)
    loaded = SASRecScorer.load("m", tmp_path / "m", split.item_ids)
    hist = [split.history(u, "test") for u in range(10)]
    np.testing.assert_allclose(loaded.score(hist), last_scores(model, hist), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="another catalog"):
        SASRecScorer.load("m", tmp_path / "m", list(reversed(split.item_ids)))


def test_with_text_an_item_nobody_chose_gets_the_vector_of_its_text(tmp_path):
    """Item 39 never occurs in training; its text vector equals item 0's. With text the model scores
    it close to item 0 after every history; with ids only its vector stays at its initial draw."""
    split = cyclic_split()
    split.sequences = [s[s != 39] for s in split.sequences]
    split.sequences = [s for s in split.sequences if s.size >= 3]
    split.users = split.users[:len(split.sequences)]
    rng = np.random.default_rng(1)
    text = rng.normal(size=(N_ITEMS, 24)).astype(np.float32)
    text[39] = text[0]
    cfg = SASRecConfig(**{**FAST.__dict__, "text": True})
    model, _ = train_sasrec(split, cfg, tmp_path / "t", text_vectors=text, progress=False)
    table = model.table().detach()
    same = torch.cosine_similarity(table[40], table[1], dim=0)  # rows: item + 1
    others = torch.cosine_similarity(table[40][None], table[2:39], dim=1)
    assert float(same) > float(others.max()), (float(same), float(others.max()))
    loaded = SASRecScorer.load("t", tmp_path / "t", split.item_ids)
    hist = [split.history(u, "test") for u in range(5)]
    np.testing.assert_allclose(loaded.score(hist), last_scores(model, hist), rtol=1e-6, atol=1e-6)


def test_hold_out_leaves_the_items_before_validation_out_of_training(monkeypatch):
    """With `hold_out` k the model trains on seq[:-2-k] (a ranker then trains on those k items with
    the model's score as a feature it never fitted); validation still reads seq[:-2]."""
    import training.sequence.sasrec as sasrec

    split = cyclic_split(40)
    seen: list[list[np.ndarray]] = []
    real = sasrec._batches
    monkeypatch.setattr(sasrec, "_batches", lambda seqs, cfg, rng: (seen.append(seqs), real(seqs, cfg, rng))[1])
    for hold_out in (0, 1):
        seen.clear()
        _, summary = train_sasrec(split, replace(FAST, epochs=1, hold_out=hold_out), progress=False)
        want = [s[:-2 - hold_out] for s in split.sequences if s[:-2 - hold_out].size >= 2]
        assert [x.tolist() for x in seen[0]] == [x.tolist() for x in want]
        assert summary["config"]["hold_out"] == hold_out


def test_bad_configurations_are_refused():
    with pytest.raises(ValueError, match="hold_out"):
        SASRecConfig(hold_out=-1)
    with pytest.raises(ValueError, match="multiple of heads"):
        SASRecConfig(dim=30, heads=4)
    with pytest.raises(ValueError, match="text_vectors"):
        SASRec(N_ITEMS, SASRecConfig(text=True))
    with pytest.raises(ValueError, match="rows"):
        SASRec(N_ITEMS, SASRecConfig(text=True), np.zeros((3, 8), dtype=np.float32))


def test_cli_trains_a_sequence_model_writes_its_curves_and_eval_reports_it(tmp_path, capsys):
    from semrank.cli import main
    from training.data.synth import SynthConfig, synthesize

    synthesize(tmp_path / "shop", seed=3, config=SynthConfig(n_users=120, n_items=80, n_days=7))
    rc = main(["train", "sequence", "--data", str(tmp_path / "shop"), "--out", str(tmp_path / "seq"), "--epochs", "2",
               "--eval-every", "1", "--dim", "16", "--heads", "2", "--layers", "1", "--max-len", "8"])
    assert rc == 0 and "| epoch | loss |" in capsys.readouterr().out
    assert list((tmp_path / "seq" / "tensorboard").glob("train-sequence-*/events.out.tfevents.*"))
    rc = main(["eval", "--data", str(tmp_path / "shop"), "--users", "40", "--out-dir", str(tmp_path / "eval"),
               "--no-frozen", "--protocol", "full", "--sequence", f"sasrec-ce={tmp_path / 'seq'}", "--bootstrap", "50"])
    assert rc == 0
    report = json.loads((tmp_path / "eval" / "shop.full.json").read_text())
    assert "sasrec-ce" in report["models"]
    assert all("sasrec-ce" in by_model for by_model in report["slices"].values() if by_model)  # rare items, short histories
    # a model of another catalog, or a missing one, is a clear error
    rc = main(["eval", "--data", str(tmp_path / "shop"), "--out-dir", str(tmp_path / "eval"), "--no-frozen",
               "--sequence", f"x={tmp_path / 'nowhere'}"])
    assert rc == 2
