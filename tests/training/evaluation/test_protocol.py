import json
from datetime import datetime, timedelta, timezone

import numpy as np
import polars as pl
import pytest

from featurizer.contracts.schema import (
    Dataset,
    catalog_report,
    validate_events,
    validate_items,
)
from ranker.user_tower import UserTower
from training.data.loo import loo_split
from training.evaluation.models import (
    EncoderScorer,
    PopularityScorer,
    cached_item_embeddings,
    parse_encoder_arg,
    resolve_encoder_spec,
)
from training.evaluation.protocol import (
    FULL,
    METRICS,
    SAMPLED,
    EvalConfig,
    bootstrap_means,
    evaluate,
    full_ranks,
    negatives_matrix,
    rank_metrics,
    sample_negatives,
    sample_users,
    sampled_ranks,
    summarize,
)
from training.evaluation.report import PUBLISHED, build_report, json_path_for, markdown

# --------------------------------------------------------------------------- helpers


def make_dataset(sequences: dict[str, list[str]], n_items: int) -> Dataset:
    items = validate_items(pl.DataFrame({"item_id": [f"i{k}" for k in range(n_items)],
                                         "title": [f"title {k}" for k in range(n_items)]}))
    t0 = datetime(2024, 1, 1, tzinfo=timezone.utc)
    rows = [(t0 + timedelta(hours=p), u, i) for u, seq in sequences.items() for p, i in enumerate(seq)]
    events = validate_events(pl.DataFrame({"ts": [r[0] for r in rows], "user_id": [r[1] for r in rows],
                                           "item_id": [r[2] for r in rows], "event": ["purchase"] * len(rows)}))
    return Dataset(items=items, events=events, report=catalog_report(events, items))


def random_split(n_users=60, n_items=150, seed=0):
    rng = np.random.default_rng(seed)
    seqs = {f"u{k}": [f"i{j}" for j in rng.choice(n_items, size=rng.integers(3, 12), replace=False)]
            for k in range(n_users)}
    return loo_split(make_dataset(seqs, n_items))


class OracleScorer:
    """Knows each user's target (via the history -> user lookup) and scores it highest."""

    name, description = "oracle", "oracle"

    def __init__(self, split):
        self.n = len(split.item_ids)
        self.target = {tuple(s[:-1]): int(s[-1]) for s in split.sequences}

    def score(self, histories):
        s = np.zeros((len(histories), self.n), dtype=np.float32)
        for k, h in enumerate(histories):
            s[k, self.target[tuple(h)]] = 1.0
        return s


class ConstantScorer:
    name, description = "constant", "constant"

    def __init__(self, n):
        self.n = n

    def score(self, histories):
        return np.ones((len(histories), self.n))


class FakeEncoder:
    """Deterministic unit vectors from the text's hash; counts calls."""

    def __init__(self, dim=8):
        self.dim, self.calls = dim, 0

    def encode(self, texts):
        self.calls += 1
        out = np.stack([np.random.default_rng(abs(hash(t)) % 2**32).normal(size=self.dim) for t in texts]) \
            if texts else np.zeros((0, self.dim))
        return (out / np.linalg.norm(out, axis=1, keepdims=True).clip(1e-9)).astype(np.float32)


# --------------------------------------------------------------------------- metrics and ranks


def test_rank_metrics_on_hand_made_ranks():
    m = rank_metrics(np.array([1, 2, 5, 10, 11, 100]))
    assert m["hr@10"].tolist() == [1, 1, 1, 1, 0, 0]
    np.testing.assert_allclose(m["ndcg@10"], [1, 1 / np.log2(3), 1 / np.log2(6), 1 / np.log2(11), 0, 0])
    np.testing.assert_allclose(m["ndcg@5"], [1, 1 / np.log2(3), 1 / np.log2(6), 0, 0, 0])
    np.testing.assert_allclose(m["mrr"], [1, 0.5, 0.2, 0.1, 1 / 11, 0.01])
    with pytest.raises(ValueError, match="1-based"):
        rank_metrics(np.array([0, 1]))


def test_ties_count_against_the_target():
    # target (item 0) ties with items 2 and 3, item 1 is above: rank = 1 + 1 + 2
    scores = np.array([[0.5, 0.9, 0.5, 0.5, 0.1]])
    assert sampled_ranks(scores, np.array([0]), np.array([[1, 2, 3, 4]]))[0] == 4
    assert full_ranks(scores, np.array([0]), [np.array([], dtype=np.int64)])[0] == 4
    # a constant scorer is ranked last under both protocols
    const = np.ones((1, 50))
    assert sampled_ranks(const, np.array([7]), np.arange(10, 30)[None, :])[0] == 21
    assert full_ranks(const, np.array([7]), [np.array([1, 2, 3])])[0] == 50 - 3
    # NaN scores count as -inf; a NaN target is last
    nan_target = np.array([[np.nan, 0.1, np.nan]])
    assert full_ranks(nan_target, np.array([0]), [np.array([], dtype=np.int64)])[0] == 3


def test_full_protocol_masks_history():
    scores = np.array([[0.9, 0.8, 0.7, 0.1, 0.2], [0.1, 0.2, 0.3, 0.4, 0.5]])
    ranks = full_ranks(scores, np.array([2, 0]), [np.array([0, 1]), np.array([3])])
    assert ranks.tolist() == [1, 4]  # user 0: items 0,1 masked; user 1: item 3 masked, 4,2,1 above
    with pytest.raises(ValueError, match="history"):
        full_ranks(scores, np.array([0, 0]), [np.array([0]), np.array([3])])


def test_sampled_ranks_ignore_padding():
    scores = np.array([[0.5, 0.9, 0.1, 0.0]])
    assert sampled_ranks(scores, np.array([0]), np.array([[2, -1, -1]]))[0] == 1
    assert sampled_ranks(scores, np.array([0]), np.array([[1, 2, -1]]))[0] == 2


# --------------------------------------------------------------------------- sampling


def test_sampled_negatives_exclude_the_users_items_and_are_deterministic():
    seq = np.array([3, 17, 42, 99, 5])
    a = sample_negatives(seq, 500, 100, seed=1, user=7)
    assert a.size == 100 and np.unique(a).size == 100
    assert not np.isin(a, seq).any() and a.min() >= 0 and a.max() < 500
    np.testing.assert_array_equal(a, sample_negatives(seq, 500, 100, seed=1, user=7))
    assert not np.array_equal(a, sample_negatives(seq, 500, 100, seed=2, user=7))
    assert not np.array_equal(a, sample_negatives(seq, 500, 100, seed=1, user=8))
    # fewer eligible items than asked: all of them
    short = sample_negatives(np.arange(0, 95), 120, 100, seed=0, user=0)
    assert short.tolist() == list(range(95, 120))


def test_negatives_matrix_excludes_whole_sequence_including_target():
    split = random_split(n_users=40, n_items=130)
    users = np.arange(len(split.users))
    neg, short = negatives_matrix(split, users, 100, seed=3)
    assert short == 0 and neg.shape == (users.size, 100)
    for row, u in enumerate(users):
        assert not np.isin(neg[row], split.sequences[u]).any()  # history, validation and test target
    again, _ = negatives_matrix(split, users, 100, seed=3)
    np.testing.assert_array_equal(neg, again)


def test_user_sample_is_seeded_sorted_and_capped():
    a = sample_users(1000, 50, seed=4)
    assert a.size == 50 and np.all(np.diff(a) > 0)
    np.testing.assert_array_equal(a, sample_users(1000, 50, seed=4))
    assert not np.array_equal(a, sample_users(1000, 50, seed=5))
    assert sample_users(30, 50, seed=4).tolist() == list(range(30))


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_ci_contains_the_mean_and_shrinks_with_more_users():
    rng = np.random.default_rng(0)
    small, large = rng.binomial(1, 0.3, 200).astype(float), rng.binomial(1, 0.3, 20_000).astype(float)
    widths = []
    for values in (small, large):
        means = bootstrap_means(values, 1000, seed=0)[:, 0]
        lo, hi = np.percentile(means, [2.5, 97.5])
        assert lo <= values.mean() <= hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 5
    np.testing.assert_array_equal(bootstrap_means(small, 100, seed=1), bootstrap_means(small, 100, seed=1))
    # chunking does not change the result
    np.testing.assert_allclose(bootstrap_means(small, 50, seed=1), bootstrap_means(small, 50, seed=1, max_cells=450))


def test_summarize_keys_and_ci_order():
    out = summarize(np.array([1, 3, 20, 2, 8, 50, 1]), n_boot=200, seed=0)
    for m in METRICS:
        lo, hi = out[f"{m}_ci"]
        assert lo <= out[m] <= hi


# --------------------------------------------------------------------------- models


def test_popularity_counts_training_interactions_only():
    # u1: i0 i1 i2 i3 (test i3); u2: i3 i0 i2 (test i2); u3: i1 i2 i0 i4 (test i4); u4: i4 (short, training)
    split = loo_split(make_dataset({"u1": ["i0", "i1", "i2", "i3"], "u2": ["i3", "i0", "i2"],
                                    "u3": ["i1", "i2", "i0", "i4"], "u4": ["i4"]}, n_items=6))
    scorer = PopularityScorer(split.train_item_counts("test"))
    row = scorer.score([np.array([0])])[0]
    idx = split.item_index
    assert row[idx["i3"]] == 1  # u2's history only; u1's test interaction not counted
    assert row[idx["i4"]] == 1  # the short user only; u3's test target excluded
    assert row[idx["i2"]] == 2  # u1 and u3; u2's test target excluded
    assert row[idx["i0"]] == 3 and row[idx["i5"]] == 0


def test_user_text_is_last_titles_most_recent_first():
    titles = [f"t{k}" for k in range(10)]
    enc = FakeEncoder(dim=10)
    seen = []
    scorer = EncoderScorer("e", enc, np.eye(10, dtype=np.float32), titles, UserTower.text(2))
    scorer.encoder = type("Spy", (), {"encode": lambda self, texts: seen.extend(texts) or enc.encode(texts)})()
    scorer.user_vectors([np.array([1, 2, 3, 4])])  # oldest first, as the protocol gives histories
    assert seen == ["t4 | t3"]


def test_pooled_encoder_scorer_needs_no_encoder_call():
    """The pooled tower's user vector is the recency-weighted mean of the history's item vectors."""
    emb = np.eye(6, dtype=np.float32)
    enc = FakeEncoder()
    scorer = EncoderScorer("e", enc, emb, [f"t{k}" for k in range(6)], UserTower.pooled(3, 0.5))
    s = scorer.score([np.array([0, 1, 2, 4])])  # most recent: 4, then 2, then 1 (0 is past 3 items)
    calls = enc.calls
    assert calls == 0
    w = np.array([0.0, 0.25, 0.5, 0.0, 1.0, 0.0])
    np.testing.assert_allclose(s[0], w / np.linalg.norm(w), rtol=1e-6)


def test_encoder_scorer_cosine_and_embedding_cache(tmp_path):
    enc = FakeEncoder()
    texts = [f"item {k}" for k in range(7)]
    cache = tmp_path / "c" / "x.npy"
    emb = cached_item_embeddings(enc, texts, cache, progress=False)
    calls = enc.calls
    again = cached_item_embeddings(enc, texts, cache, progress=False)
    assert enc.calls == calls and np.array_equal(emb, again)
    scorer = EncoderScorer("e", enc, emb, titles=texts, tower=UserTower.text(1))
    s = scorer.score([np.array([0, 3])])
    # history "item 3" alone is the user text, so item 3 has cosine 1
    assert s.shape == (1, 7) and int(np.argmax(s[0])) == 3 and s[0, 3] == pytest.approx(1.0, abs=1e-5)


def test_encoder_dir_or_bundle_dir(tmp_path):
    (tmp_path / "b" / "enc").mkdir(parents=True)
    (tmp_path / "b" / "enc" / "config.json").write_text("{}")
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(
        {"encoder": {"model_dir": "enc", "max_length": 64, "history_items": 3}}))
    spec = resolve_encoder_spec("ft", tmp_path / "b")
    assert spec.model_dir == str((tmp_path / "b" / "enc").resolve()) and spec.max_length == 64
    assert spec.tower == UserTower.text(3)  # a bundle from before towers: its text tower
    plain = resolve_encoder_spec("ft", tmp_path / "b" / "enc", tower=UserTower.pooled(7))
    assert plain.model_dir == str(tmp_path / "b" / "enc") and plain.tower == UserTower.pooled(7)
    # an encoder that records the tower it was fine-tuned with is scored with it
    own = UserTower("pooled", 4, np.array([1.0, 0.7, 0.2, 0.1]))
    entry = own.save(tmp_path / "b" / "enc")
    (tmp_path / "b" / "enc" / "training.json").write_text(json.dumps({"user_tower": entry}))
    assert resolve_encoder_spec("ft", tmp_path / "b" / "enc", tower=UserTower.text(5)).tower == own
    with pytest.raises(FileNotFoundError, match="neither a bundle"):
        resolve_encoder_spec("x", tmp_path)
    assert parse_encoder_arg("a=runs/x") == ("a", __import__("pathlib").Path("runs/x"))
    with pytest.raises(ValueError, match="NAME=DIR"):
        parse_encoder_arg("runs/x")
    from training.evaluation.models import parse_named_path
    from training.evaluation.rankers import parse_ranker_arg

    with pytest.raises(ValueError, match="^--sequence expects NAME=DIR"):  # each flag's error names that flag
        parse_named_path("runs/x", "--sequence", "s=runs/s")
    with pytest.raises(ValueError, match="^--ranker expects NAME=BUNDLE"):
        parse_ranker_arg("=runs/x")


# --------------------------------------------------------------------------- driver and report


def test_evaluate_oracle_and_constant_and_report_schema():
    split = random_split()
    n_items = len(split.item_ids)
    run = evaluate(split, [OracleScorer(split), ConstantScorer(n_items)],
                   EvalConfig(users=25, seed=1, batch_size=7, bootstrap=100), progress=False)
    assert run.users.size == 25
    assert (run.ranks[SAMPLED]["oracle"] == 1).all() and (run.ranks[FULL]["oracle"] == 1).all()
    assert (run.ranks[SAMPLED]["constant"] == 101).all()
    hist = np.array([split.sequences[u].size - 1 for u in run.users])
    np.testing.assert_array_equal(run.ranks[FULL]["constant"], n_items - hist)
    report = build_report("toy", FULL, run, len(split.users), 1, {}, 1.5, n_boot=100,
                          compare=[("oracle", "constant")])
    report = json.loads(json.dumps(report))
    assert {"dataset", "protocol", "users", "models"} <= set(report)
    assert set(report) <= {"dataset", "protocol", "users", "models", "seed", "notes", "seconds", "tie_rule",
                           "user_towers", "comparisons"}
    (c,) = report["comparisons"]
    assert (c["a"], c["b"], c["mean_a"]) == ("oracle", "constant", 1.0) and c["difference"] == 1.0
    with pytest.raises(ValueError, match="not in the run: nobody"):
        build_report("toy", FULL, run, len(split.users), 1, {}, 1.5, n_boot=10, compare=[("oracle", "nobody")])
    assert report["users"] == 25 and set(report["models"]) == {"oracle", "constant"}
    for m in report["models"].values():
        assert set(m) == {"hr@10", "hr@10_ci", "ndcg@10", "ndcg@10_ci", "ndcg@5", "ndcg@5_ci", "mrr", "mrr_ci"}
        assert all(len(m[f"{k}_ci"]) == 2 for k in METRICS)
    assert report["models"]["oracle"]["ndcg@10"] == 1.0 and report["models"]["constant"]["hr@10"] == 0.0
    assert "| oracle |" in markdown(report)


def test_bad_model_shape_is_a_clear_error():
    split = random_split(n_users=10)

    class Bad:
        name, description = "bad", "bad"

        def score(self, histories):
            return np.zeros((len(histories), 3))

    with pytest.raises(ValueError, match="score\\(\\) returned"):
        evaluate(split, [Bad()], EvalConfig(users=5), progress=False)
    with pytest.raises(ValueError, match="unknown protocol"):
        EvalConfig(protocols=("sampled-50",))


def test_published_markdown_and_json_path():
    assert PUBLISHED[("amazon-beauty-2014", SAMPLED)]["rows"]["SASRec"]["hr@10"] == 0.4854
    assert PUBLISHED[("amazon-toys-2014", FULL)]["rows"]["TIGER"]["ndcg@10"] == 0.0432
    assert str(json_path_for("runs/beauty.json", SAMPLED, True)) == "runs/beauty.sampled-100.json"
    assert str(json_path_for("runs/beauty.json", SAMPLED, False)) == "runs/beauty.json"
    split = random_split(n_users=12)
    run = evaluate(split, [ConstantScorer(len(split.item_ids))], EvalConfig(users=10, bootstrap=50), progress=False)
    text = markdown(build_report("amazon-beauty-2014", SAMPLED, run, 12, 0, {}, 1.0, n_boot=50))
    assert "SASRec (published)" in text and "0.4854" in text and "Protocol differences" in text


# --------------------------------------------------------------------------- CLI end to end


def test_cli_eval_end_to_end_on_synthetic_shop(tmp_path, capsys):
    from semrank.cli import main
    from training.data.synth import SynthConfig, synthesize

    synthesize(tmp_path / "shop", seed=3, config=SynthConfig(n_users=120, n_items=80, n_days=7))
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text(json.dumps({"encoder": {"model_dir": "base", "history_items": 3}}))
    out = tmp_path / "eval"
    rc = main(["eval", "--data", str(tmp_path / "shop"), "--users", "50", "--out-dir", str(out),
               "--no-frozen", "--encoder", f"enc-bundle={bundle}", "--json", str(tmp_path / "r.json"),
               "--bootstrap", "200"])
    assert rc == 0
    printed = capsys.readouterr().out
    for protocol in (SAMPLED, FULL):
        for ext in ("json", "md", "png"):
            assert (out / f"shop.{protocol}.{ext}").stat().st_size > 0
        report = json.loads((tmp_path / f"r.{protocol}.json").read_text())
        assert report == json.loads((out / f"shop.{protocol}.json").read_text())
        assert report["protocol"] == protocol and 0 < report["users"] <= 50
        # the frozen encoder via a bundle dir, and the shop's ground truth
        assert set(report["models"]) == {"popularity", "enc-bundle", "oracle-true-interest"}
        assert f"### shop — {protocol}" in printed
    assert list((out / "cache" / "embeddings").glob("*.npy"))
    # a bad --encoder is a clear error, not a traceback
    rc = main(["eval", "--data", str(tmp_path / "shop"), "--out-dir", str(out), "--encoder", "x=nowhere"])
    assert rc == 2


def test_true_interest_scorer_is_the_shops_truth_at_the_test_day(tmp_path):
    from featurizer.contracts.schema import read_dataset
    from training.data.loo import loo_data
    from training.data.synth import SynthConfig, synthesize, true_interest
    from training.evaluation.models import TrueInterestScorer
    from training.lambdarank.leave_one_out import sequence_times

    synthesize(tmp_path / "shop", seed=5, config=SynthConfig(n_users=80, n_items=60, n_days=6))
    ds, split = loo_data(read_dataset(tmp_path / "shop"))
    test_us = [int(t[-1]) for t in sequence_times(ds, split)]
    scorer = TrueInterestScorer(tmp_path / "shop", split, test_us)
    users = np.arange(len(split.users))
    scores = scorer.score_users(users, [split.history(int(u), "test") for u in users])
    assert scores.shape == (users.size, len(split.item_ids)) and (scores > 0).all()
    targets = np.array([split.target(int(u), "test") for u in users])
    events = pl.DataFrame({
        "ts": [datetime.fromtimestamp(t / 1e6, timezone.utc) for t in test_us],
        "user_id": split.users, "item_id": [split.item_ids[i] for i in targets]})
    np.testing.assert_allclose(scores[users, targets], true_interest(tmp_path / "shop", events), rtol=1e-6)
    with pytest.raises(TypeError, match="scores users"):
        scorer.score([split.history(0, "test")])
    other = tmp_path / "other"
    synthesize(other, seed=6, config=SynthConfig(n_users=30, n_items=40, n_days=3))
    with pytest.raises(ValueError, match="do not name"):
        TrueInterestScorer(other, split, test_us)


def test_the_report_slices_pick_rare_test_items_and_short_histories():
    from training.evaluation.protocol import RARE_TARGET_MAX, SHORT_HISTORY_MAX, user_slices

    split = random_split(n_users=80, n_items=40)
    users = np.arange(len(split.users))
    rare, short = user_slices(split, users).values()
    counts = split.train_item_counts("test")
    for u in users:
        assert rare[u] == (counts[split.target(int(u), "test")] <= RARE_TARGET_MAX)
        assert short[u] == (split.history(int(u), "test").size <= SHORT_HISTORY_MAX)
    assert 0 < short.sum() < users.size  # histories of 2 to 10 items: both sides occur
