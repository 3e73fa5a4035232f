"""The ranker on interactions without impression lists (`training.lambdarank.leave_one_out`) and its evaluation
(`training.evaluation.rankers`): leakage, negatives, determinism, bundle, `semrank eval --ranker`."""

import json
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from featurizer.contracts.schema import (
    Dataset,
    catalog_report,
    has_impression_lists,
    read_dataset,
    validate_events,
    validate_items,
    write_dataset,
)
from featurizer.definitions import NAMES
from featurizer.errors import ConfigError
from featurizer.offline.pipeline import offline_features
from ranker.bundle import load_bundle
from ranker.user_tower import UserTower
from tests.fakes import HashEncoder
from training.data.loo import break_ties, clock_resolution_us, loo_data, loo_split
from training.evaluation.rankers import two_stage_rank
from training.lambdarank.first_stage import (
    EASE_RRF_K,
    EASE_STAGES,
    FIRST_STAGES,
    RRF_K,
    SEQUENCE_STAGES,
    FirstStage,
    Ease,
    SourceUnion,
    _symmetric_from_lower,
    ordinal_ranks,
    top_k,
)
from training.lambdarank.leave_one_out import (
    TRAINING_MODE,
    build_examples,
    example_chunks,
    groups_per_chunk,
    sequence_times,
    tower_user_vectors,
    train_loo_ranker,
    user_histories,
)
from training.lambdarank.negatives import (
    SOURCE_HARD,
    SOURCE_POPULAR,
    SOURCE_TARGET,
    SOURCE_UNIFORM,
    NegativeSampler,
    build_groups,
    group_keys,
    hard_pools,
)
from training.lambdarank.params import LooRankerConfig

FAST = dict(negatives=8, hard_negatives=0, min_data_in_leaf=5, num_boost_round=30, early_stopping_rounds=10)


@pytest.fixture(scope="module")
def loo_dir(tmp_path_factory):
    """The synthetic shop as purchases only (no impressions, no request_id): an interaction dataset."""
    from training.data.synth import SynthConfig, synthesize

    root = tmp_path_factory.mktemp("loo")
    synthesize(root / "synth", seed=3, config=SynthConfig(n_users=150, n_items=80, n_days=7), progress=False)
    ds = read_dataset(root / "synth")
    assert has_impression_lists(ds.events)
    ev = ds.events.filter(pl.col("event") != "impression").with_columns(
        pl.lit("purchase").alias("event"), pl.lit(None, pl.Utf8).alias("request_id"), pl.lit(None, pl.Int32).alias("position"))
    write_dataset(root / "data", ds.items, ev)
    return root / "data"


@pytest.fixture(scope="module")
def data(loo_dir):
    ds, split = loo_data(read_dataset(loo_dir))
    return ds, split, sequence_times(ds, split)


def test_interaction_data_has_no_impression_lists(data):
    assert not has_impression_lists(data[0].events)


def test_groups_target_only_positions_before_the_validation_item(data):
    ds, split, times = data
    cfg = LooRankerConfig(**FAST)
    groups = build_groups(split, group_keys(split, times, cfg), cfg)
    index = {u: k for k, u in enumerate(split.users)}
    targets = groups.filter(pl.col("label") == 1)
    assert targets.height == groups["group"].n_unique()  # exactly one positive per group
    assert (targets["source"] == SOURCE_TARGET).all()
    for part, user, item, k, ts in targets.select("part", "user_id", "item_id", "pos", "ts").iter_rows():
        seq, u_times = split.sequences[index[user]], times[index[user]]
        assert split.item_index[item] == seq[k] and ts == datetime.fromtimestamp(u_times[k] / 1e6, timezone.utc)
        if part == "train":
            assert 1 <= k <= seq.size - 3  # seq[:-2], never the validation or test item
        else:
            assert k == seq.size - 2
        assert split.item_index[item] != seq[-1]  # the test item is never a target
    assert set(groups["part"]) == {"train", "valid"}


def test_negatives_exclude_the_users_items_and_follow_the_mix(data):
    ds, split, times = data
    cfg = LooRankerConfig(**FAST)
    groups = build_groups(split, group_keys(split, times, cfg), cfg)
    index = {u: k for k, u in enumerate(split.users)}
    for (g,), rows in groups.group_by(["group"]):
        seq = split.sequences[index[rows["user_id"][0]]]
        neg = rows.filter(pl.col("label") == 0)
        idx = np.array([split.item_index[i] for i in neg["item_id"]])
        assert not np.isin(idx, seq).any() and np.unique(idx).size == idx.size
        if len(split.item_ids) - seq.size >= cfg.negatives:
            assert (neg["source"] == SOURCE_POPULAR).sum() == cfg.n_popular
            assert (neg["source"] == SOURCE_UNIFORM).sum() == cfg.negatives - cfg.n_popular


def test_hard_negatives_come_from_the_first_stage_top_k(data):
    ds, split, times = data
    cfg = LooRankerConfig(**{**FAST, "hard_negatives": 4, "hard_k": 10})
    enc = HashEncoder()
    emb = enc.encode(split.titles)
    ex = build_examples(ds, split, cfg, enc, emb, times, progress=False)
    keys = group_keys(split, times, cfg)
    hist = user_histories(ds, keys.select("user_id", "ts"), 10)
    user_emb = tower_user_vectors(cfg.user_tower(), enc, hist, split, emb, progress=False)
    pools = hard_pools(split, keys, user_emb, emb, [np.array([split.item_index[i] for i in h]) for h in hist], cfg.hard_k)
    index = {u: k for k, u in enumerate(split.users)}
    for (g,), rows in ex.group_by(["group"]):
        seq = split.sequences[index[rows["user_id"][0]]]
        hard = np.array([split.item_index[i] for i in rows.filter(pl.col("source") == SOURCE_HARD)["item_id"]])
        assert hard.size == min(4, pools[g].size) and np.isin(hard, pools[g]).all() and not np.isin(hard, seq).any()
        assert pools[g].size == min(10, len(split.item_ids) - seq.size)
    mean = ex.group_by("source").agg(pl.col("interest_score").mean())
    by = dict(zip(mean["source"], mean["interest_score"]))
    assert by[SOURCE_HARD] > by[SOURCE_UNIFORM]  # the first stage ranks them higher, so they look more like targets


def test_negative_sampler_weights_by_popularity():
    counts = np.zeros(1000)
    counts[:20] = 100.0  # only 20 items were ever bought
    sampler = NegativeSampler(counts, n=10, n_popular=5)
    exclude = np.array([0, 1, 500])
    pop, uni = [], []
    for s in range(200):
        items, src = sampler.sample(exclude, np.random.default_rng(s))
        assert not np.isin(items, exclude).any() and np.unique(items).size == 10
        pop.append(items[src == SOURCE_POPULAR])
        uni.append(items[src == SOURCE_UNIFORM])
    assert (np.concatenate(pop) < 20).all()  # popularity draws only bought items
    assert (np.concatenate(uni) >= 20).mean() > 0.9  # uniform draws spread over the catalog
    short = NegativeSampler(counts, n=10, n_popular=10).sample(np.arange(15), np.random.default_rng(0))
    assert (short[1] == SOURCE_POPULAR).sum() == 5 and short[0].size == 10  # 5 bought items left; uniform fills


def test_groups_are_deterministic_per_seed(data):
    _, split, times = data
    def groups(seed):
        cfg = LooRankerConfig(**FAST, seed=seed)
        return build_groups(split, group_keys(split, times, cfg), cfg)

    a = groups(1)
    assert a.equals(groups(1))
    assert not a.equals(groups(2))


def test_features_use_only_events_strictly_before_the_group_time(data):
    ds, split, _ = data
    ex = build_examples(ds, split, LooRankerConfig(**FAST, variant="behavioural"), progress=False)
    rng = np.random.default_rng(0)
    for g in rng.choice(ex["group"].unique().to_numpy(), size=6, replace=False):
        rows = ex.filter(pl.col("group") == g)
        t = rows["ts"][0]
        past = ds.events.filter(pl.col("ts") < t)
        again = offline_features(past.lazy(), ds.items.lazy(), rows.select("user_id", "item_id", "ts").lazy(),
                                 resolution_us=split.resolution_us).collect()
        assert np.allclose(rows.select(NAMES[1:]).to_numpy(), again.select(NAMES[1:]).to_numpy(), equal_nan=True)


def _day_dataset() -> Dataset:
    """Day-resolution timestamps: user a buys i1 and i2 on the same day."""
    day = lambda d: datetime(2024, 1, 1, tzinfo=timezone.utc) + timedelta(days=d)  # noqa: E731
    rows = [(day(0), "a", "i0", 0), (day(1), "a", "i1", 1), (day(1), "a", "i2", 2), (day(2), "a", "i3", 3),
            (day(3), "a", "i4", 4), (day(0), "b", "i5", 0), (day(1), "b", "i2", 1), (day(2), "b", "i6", 2)]
    items = validate_items(pl.DataFrame({"item_id": [f"i{k}" for k in range(12)], "title": [f"thing {k}" for k in range(12)]}))
    events = validate_events(pl.DataFrame({"ts": [r[0] for r in rows], "user_id": [r[1] for r in rows], "item_id": [r[2] for r in rows],
                                           "event": ["purchase"] * len(rows), "seq_pos": [r[3] for r in rows]}))
    return Dataset(items=items, events=events, report=catalog_report(events, items))


def test_same_day_events_own_ones_by_sequence_others_not_before_t():
    raw = _day_dataset()
    assert clock_resolution_us(raw.events) == 86_400_000_000
    ds, split = loo_data(raw)
    assert split.resolution_us == 86_400_000_000
    assert [s.tolist() for s in split.sequences] == [s.tolist() for s in loo_split(raw).sequences]
    cfg = LooRankerConfig(negatives=3, hard_negatives=2, hard_k=5, positions_per_user=2)
    ex = build_examples(ds, split, cfg, HashEncoder(), HashEncoder().encode(split.titles), progress=False)
    tgt = {k: r for k, r in zip(ex["pos"], ex.iter_rows(named=True)) if r["label"] == 1 and r["user_id"] == "a"}
    assert set(tgt) == {1, 2, 3}  # train k = 1, 2; valid k = 3 (i3); the test item i4 is never a target
    # i1, bought the same day just before i2 (seq_pos), is the user's own history at i2's time ...
    assert tgt[2]["item_id"] == "i2" and tgt[2]["user_engagements_all"] == 2
    assert tgt[2]["user_hours_since_last_engagement"] < 1e-6  # i1, not i0 a day earlier
    assert tgt[2]["item_purchases_all"] == 0  # ... but b's same-day purchase of i2 is not before t
    assert tgt[3]["user_engagements_all"] == 3
    assert tgt[3]["item_purchases_all"] == 0  # i3 was never bought before


def test_break_ties_orders_a_users_tick_by_seq_pos_and_keeps_rows():
    raw = _day_dataset()
    out = break_ties(raw.events, 86_400_000_000)
    assert out.select("user_id", "item_id", "seq_pos").equals(raw.events.select("user_id", "item_id", "seq_pos"))
    shift = (out["ts"] - raw.events["ts"]).dt.total_microseconds().to_list()
    by = dict(zip(zip(raw.events["user_id"], raw.events["item_id"]), shift))
    assert by[("a", "i1")] == 0 and by[("a", "i2")] == 1 and by[("b", "i2")] == 0 and by[("a", "i0")] == 0
    assert break_ties(raw.events, 1) is raw.events
    crowded = pl.concat([raw.events, raw.events.filter(pl.col("item_id") == "i2").with_columns(pl.lit("i7").alias("item_id"))])
    with pytest.raises(ValueError, match="more than 2 events in one tick"):
        break_ties(crowded, 2)  # a has 3 events on day 1: +2 µs would reach the next 2 µs tick


def test_bundle_is_written_loadable_and_deterministic(data, tmp_path):
    ds, split, _ = data
    enc = HashEncoder()
    emb = enc.encode(split.titles)
    extras = {}
    for name, variant in (("full", "full"), ("full-again", "full"), ("behavioural", "behavioural")):
        extras[name] = train_loo_ranker(ds, split, tmp_path / name, LooRankerConfig(**FAST, variant=variant), enc, emb, progress=False)
    full, beh = load_bundle(tmp_path / "full"), load_bundle(tmp_path / "behavioural")
    assert full.feature_names == list(NAMES)
    assert beh.feature_names == [n for n in NAMES if n != "interest_score"]
    assert (tmp_path / "full" / "ranker.txt").read_text() == (tmp_path / "full-again" / "ranker.txt").read_text()
    m = full.manifest
    assert m["training_mode"] == TRAINING_MODE and m["variant"] == "full"
    assert m["negative_sampling"]["negatives_per_group"] == FAST["negatives"]
    assert {"learning_rate", "num_leaves", "best_iteration"} <= set(m["hyper_parameters"])
    assert list(m["feature_importance_gain"]) == list(NAMES)
    assert m["metrics"]["valid"]["lightgbm"]["groups"] > 0
    assert m["training_data"]["groups"]["valid"] > 0
    with pytest.raises(ValueError, match="need an encoder"):
        train_loo_ranker(ds, split, tmp_path / "x", LooRankerConfig(**FAST), None, None, progress=False)


def test_two_stage_rank_is_pessimistic():
    first = np.array([0.9, 0.8, 0.7, 0.7, -np.inf, 0.1])
    top = np.array([0, 1])
    assert two_stage_rank(first, top, np.array([0.5, 0.5]), 1) == 2  # tie in the re-ranked top: counts against
    assert two_stage_rank(first, top, np.array([0.5, 0.2]), 0) == 1
    assert two_stage_rank(first, top, np.array([0.5, 0.2]), 2) == 4  # below the top 2, tied with item 3
    assert two_stage_rank(first, top, np.array([0.5, 0.2]), 5) == 5  # item 4 is masked
    s, tops = top_k(np.array([[3.0, 2.0, 1.0, 0.0]]), [np.array([0])], 2)
    assert sorted(tops[0]) == [1, 2] and s[0, 0] == -np.inf
    assert ordinal_ranks(np.array([[0.1, 0.3, 0.3]])).tolist() == [[3, 1, 2]]


def test_first_stage_counts_only_the_training_part(data):
    _, split, _ = data
    assert np.array_equal(FirstStage(split, "test").popularity, split.train_item_counts("test"))
    assert np.array_equal(FirstStage(split, "valid").popularity, split.train_item_counts("valid"))
    day = loo_split(_day_dataset())  # a's test item i4 was bought by nobody else
    stage = FirstStage(day, "test")
    i4, i3 = day.item_index["i4"], day.item_index["i3"]
    assert stage.popularity[i4] == 0 and stage.cooc[i4].nnz == 0 and stage.cooc[:, i4].nnz == 0
    assert stage.cooc[i3].nnz > 0  # the validation item is part of the training part


def test_the_source_union_counts_what_the_sources_hold_at_all():
    """Recall@K of each source, of the union of their top K lists and of their top ceil(K/n) lists;
    history items (masked) are never counted."""
    enc = np.array([5.0, 4, 3, 2, 1, 0])
    cooc = np.array([0.0, 0, 0, 1, 2, 3])
    union = SourceUnion(k=2)
    # user a: target 2, item 0 in the history: the encoder's top 2 are {1, 2} once 0 is masked, cooc's {5, 4}
    union.add({"encoder": enc[None], "cooc": cooc[None]}, [np.array([0])], np.array([2]))
    # users b and c, no history: targets 4 (cooc's 2nd) and 5 (cooc's 1st); the encoder's top 2 are {0, 1}
    union.add({"encoder": np.tile(enc, (2, 1)), "cooc": np.tile(cooc, (2, 1))}, [np.zeros(0, np.int64)] * 2,
              np.array([4, 5]))
    report = union.report()
    assert report["users"] == 3 and report["recall_by_source"] == {"encoder": 0.3333, "cooc": 0.6667}
    top2, top1 = report["unions"]  # top 1 each: a {1} | {5}, b and c {0} | {5}: only c's target
    assert (top2["depth"], top2["recall"], top2["mean_items"]) == (2, 1.0, 4.0)
    assert (top1["depth"], top1["recall"], top1["mean_items"]) == (1, 0.3333, 2.0)


def test_the_sequence_first_stages_fuse_the_sequence_models_ranks(data):
    """Issue 31 item 2: `sequence` is the model's scores; `encoder+cooc+sequence` adds its reciprocal
    rank to encoder+cooc's fusion; neither is computed without a sequence model's scores."""
    _, split, _ = data
    stage = FirstStage(split, "test")
    rng = np.random.default_rng(0)
    cos = rng.normal(size=(3, stage.n_items))
    recent = [split.sequences[u][-4:-1] for u in range(3)]
    seq = rng.normal(size=(3, stage.n_items)).astype(np.float32)
    out = stage.scores(FIRST_STAGES, cos, recent, seq)
    assert set(out) == set(FIRST_STAGES)
    np.testing.assert_array_equal(out["sequence"], seq.astype(np.float64))
    np.testing.assert_array_equal(out["encoder+cooc+sequence"], out["encoder+cooc"] + 1.0 / (RRF_K + ordinal_ranks(seq)))
    assert out["encoder+cooc"].tolist() == stage.scores(["encoder+cooc"], cos, recent)["encoder+cooc"].tolist()
    best = int(np.argmax(seq[0]))  # the sequence model's first choice gains the most from it
    gain = out["encoder+cooc+sequence"][0] - out["encoder+cooc"][0]
    assert gain[best] == gain.max() == 1.0 / (RRF_K + 1)
    for kind in SEQUENCE_STAGES:
        with pytest.raises(ValueError, match="sequence model"):
            stage.scores([kind], cos, recent)
    with pytest.raises(ValueError, match="unknown first stage"):
        stage.scores(["encoder+nothing"], cos, recent)


def test_ease_is_the_closed_form_of_its_definition():
    """EASE's weights equal B = I - P diag(1/diag P) with P = (X'X + λI)^-1 and diag B = 0, computed
    here with a plain inverse; a history scores the sum of its items' rows, each item once; items
    never seen and, past max_items, the least frequent ones are left out (score 0)."""
    seqs = [np.array([0, 1, 2]), np.array([1, 2]), np.array([2, 3, 3]), np.array([0, 2]), np.array([4])]
    ease = Ease(seqs, n_items=6, lam=2.0)
    x = np.zeros((len(seqs), 6))
    for u, s in enumerate(seqs):
        x[u, s] = 1.0
    seen = [0, 1, 2, 3, 4]  # item 5 never occurs
    g = x[:, seen].T @ x[:, seen] + 2.0 * np.eye(5)
    p = np.linalg.inv(g)
    b = np.eye(5) - p / np.diag(p)[None, :]
    np.fill_diagonal(b, 0.0)
    assert ease.items.tolist() == seen
    np.testing.assert_allclose(ease.weights, b, rtol=1e-5, atol=1e-6)
    got = ease.scores([np.array([0, 2, 0]), np.array([5]), np.zeros(0, np.int64)])
    np.testing.assert_allclose(got[0, seen], b[0] + b[2], rtol=1e-5, atol=1e-6)
    assert got[0, 5] == 0.0 and not got[1].any() and not got[2].any()
    top2 = Ease(seqs, n_items=6, lam=2.0, max_items=2)  # item 2 (4 users), then 0 / 1 / 3 (2 each): 0 by index
    assert top2.items.tolist() == [0, 2] and top2.weights.shape == (2, 2)
    with pytest.raises(ValueError, match="lambda"):
        Ease(seqs, n_items=6, lam=0.0)


def test_the_solve_mirrors_the_lower_triangle_block_by_block():
    """EASE symmetrises LAPACK's half-filled inverse in place, in row blocks (`_symmetric_from_lower`):
    blocks that do not divide the size, and one block for all, give the same matrix."""
    m = np.random.default_rng(3).normal(size=(23, 23))
    want = np.tril(m) + np.tril(m, -1).T
    for block in (1, 5, 23, 64):
        np.testing.assert_array_equal(_symmetric_from_lower(m.copy(), block=block), want)


def test_the_ease_first_stages_put_ease_where_cooc_was(data):
    """`encoder+ease` is encoder+cooc's fusion with EASE's reciprocal ranks instead of co-occurrence's
    (k = EASE_RRF_K), `encoder+ease+sequence` adds the sequence model's; EASE reads the same recent
    items as cooc."""
    _, split, _ = data
    stage = FirstStage(split, "test")
    rng = np.random.default_rng(1)
    cos = rng.normal(size=(3, stage.n_items))
    recent = [split.sequences[u][-4:-1] for u in range(3)]
    seq = rng.normal(size=(3, stage.n_items))
    sources = stage.sources(cos, recent, seq, ease=True)
    np.testing.assert_array_equal(sources["ease"], stage.ease.scores(recent))
    out = stage.scores(FIRST_STAGES, cos, recent, seq)
    ease = sources["ease"]  # fused with k = EASE_RRF_K; items EASE gives nothing (0) get nothing from it
    fused = 1.0 / (EASE_RRF_K + ordinal_ranks(cos)) + np.where(ease > 0, 1.0 / (EASE_RRF_K + ordinal_ranks(ease)), 0.0)
    np.testing.assert_allclose(out["encoder+ease"], fused, rtol=1e-15)
    np.testing.assert_allclose(out["encoder+ease+sequence"], fused + 1.0 / (EASE_RRF_K + ordinal_ranks(seq)), rtol=1e-15)
    assert set(EASE_STAGES) <= set(out) and not np.array_equal(out["encoder+ease"], out["encoder+cooc"])
    assert "ease" not in stage.sources(cos, recent, seq)  # only when asked for: the solve is not free


def test_the_sequence_first_stage_asks_for_its_model(loo_dir, tmp_path):
    from semrank.cli import main

    args = ["eval", "--data", str(loo_dir), "--out-dir", str(tmp_path), "--no-frozen", "--first-stage", "sequence"]
    assert main(args) == 2  # no --sequence: refused before anything is loaded
    assert main([*args, "--ranker", "r=x", "--sequence", "a=x", "--sequence", "b=y"]) == 2  # which one to fuse


def test_train_and_eval_with_rankers_end_to_end(loo_dir, tmp_path, capsys):
    from semrank.cli import main

    for variant, tower in (("behavioural", "pooled"), ("full", "pooled"), ("full", "text")):
        assert main(["train", "ranker", "--data", str(loo_dir), "--out", str(tmp_path / f"{variant}-{tower}"),
                     "--variant", variant, "--tower", tower, "--negatives", "8",
                     "--embedding-cache", str(tmp_path / "cache")]) == 0
    full_pooled = load_bundle(tmp_path / "full-pooled")
    assert full_pooled.manifest["training_mode"] == TRAINING_MODE
    assert full_pooled.tower == UserTower.pooled() and load_bundle(tmp_path / "full-text").tower == UserTower.text()
    # the sequence model, without the last item before each validation item: a first stage, and a feature
    assert main(["train", "sequence", "--data", str(loo_dir), "--out", str(tmp_path / "seq"), "--epochs", "2",
                 "--eval-every", "1", "--dim", "16", "--heads", "2", "--layers", "1", "--max-len", "8",
                 "--hold-out", "1"]) == 0
    assert main(["train", "ranker", "--data", str(loo_dir), "--out", str(tmp_path / "full-seq"), "--negatives", "8",
                 "--embedding-cache", str(tmp_path / "cache"), "--sequence", str(tmp_path / "seq"),
                 "--hard-from", "encoder+cooc+sequence"]) == 0
    with_seq = load_bundle(tmp_path / "full-seq")
    assert "of the encoder+cooc+sequence first stage" in with_seq.manifest["negative_sampling"]["hard_from"]
    assert with_seq.feature_names[-1] == "sequence_score" and with_seq.manifest["sequence_model"] == "sequence"
    assert with_seq.manifest["train_config"]["held_out_targets"] == 1
    assert with_seq.manifest["training_data"]["targets"].startswith("train: the last 1 position")
    from serving.ranking.engine import serving_inputs

    assert with_seq.sequence is not None and serving_inputs(with_seq).given == ["sequence_score"]  # served
    out = tmp_path / "eval"
    assert main(["eval", "--data", str(loo_dir), "--out-dir", str(out), "--users", "40", "--bootstrap", "50",
                 "--cache-dir", str(tmp_path / "cache"), "--rerank-k", "15", "--tower", "pooled", "--tower", "text",
                 "--ranker", f"ranker-behavioural={tmp_path / 'behavioural-pooled'}",
                 "--ranker", f"ranker-full={tmp_path / 'full-pooled'}", "--ranker", f"ranker-text={tmp_path / 'full-text'}",
                 "--ranker", f"ranker-seq={tmp_path / 'full-seq'}",
                 "--sequence", f"sasrec-ce={tmp_path / 'seq'}", "--first-stage", "encoder+cooc+sequence",
                 "--compare", "ranker-full:ranker-text"]) == 0
    full = json.loads((out / "data.full.json").read_text())
    sampled = json.loads((out / "data.sampled-100.json").read_text())
    for report in (full, sampled):
        assert {"ranker-behavioural", "ranker-full", "ranker-text", "ranker-seq", "popularity", "encoder-frozen-pooled",
                "encoder-frozen-text", "sasrec-ce"} <= set(report["models"])
        assert report["user_towers"]["ranker-text"].startswith("text tower")
        assert report["user_towers"]["ranker-full"].startswith("pooled tower")
        (c,) = report["comparisons"]
        assert (c["a"], c["b"]) == ("ranker-full", "ranker-text") and len(c["relative_ci"]) == 2
    # the two towers' rankers are evaluated in two groups, each with the first stage of its own tower
    stage = next(s for s in full["two_stage"] if s["rankers"] == ["ranker-behavioural", "ranker-full", "ranker-seq"])
    assert stage["k"] == 15 and stage["first_stage"] == "encoder+cooc+sequence"
    recall = stage["recall@15_by_first_stage"]
    assert set(recall) == set(FIRST_STAGES)
    assert stage["first_stage_recall@15"] == recall["encoder+cooc+sequence"] and 0.0 <= min(recall.values())
    sources = stage["sources"]  # the fused stage's single sources, alone and joined
    assert sources["k"] == 15 and set(sources["recall_by_source"]) == {"encoder", "cooc", "ease", "sequence"}
    assert sources["recall_by_source"]["encoder"] == recall["encoder"]
    assert sources["recall_by_source"]["sequence"] == recall["sequence"]
    wide, short = sources["unions"]
    assert wide["recall"] >= max(sources["recall_by_source"].values()) and wide["mean_items"] <= 60
    assert short["depth"] == 4 and short["mean_items"] <= 16
    assert "two_stage" not in sampled
    md = (out / "data.full.md").read_text()
    assert "first-stage recall@15" in md and "ranker-full" in md
    assert "ranker-full vs ranker-text, NDCG@10" in md
    # training and eval share the item embeddings; only the text tower encodes user texts
    assert sorted(p.name.split("__")[0] for p in (tmp_path / "cache").glob("*.npy")) == ["data", "data-user-texts"]


def test_a_ranker_refuses_a_sequence_model_that_saw_its_targets(loo_dir, tmp_path):
    """`semrank train ranker --sequence` needs a model trained without the ranker's targets (--hold-out)."""
    from semrank.cli import main

    assert main(["train", "sequence", "--data", str(loo_dir), "--out", str(tmp_path / "seq"), "--epochs", "1",
                 "--eval-every", "1", "--dim", "16", "--heads", "2", "--layers", "1", "--max-len", "8"]) == 0
    args = ["train", "ranker", "--data", str(loo_dir), "--out", str(tmp_path / "r"), "--variant", "behavioural",
            "--hard-negatives", "0", "--negatives", "4"]
    assert main([*args, "--sequence", str(tmp_path / "seq")]) == 2  # hold_out 0
    assert main([*args, "--sequence", str(tmp_path / "nowhere")]) == 2
    assert not (tmp_path / "r" / "ranker.txt").exists()
    with pytest.raises(ConfigError, match="held_out_targets"):
        LooRankerConfig(sequence_dir="sequence")
    with pytest.raises(ConfigError, match="hard_from"):  # a sequence first stage needs the model
        LooRankerConfig(hard_from="encoder+cooc+sequence")
    # the same targets without the feature (the control of a --sequence bundle)
    assert main([*args, "--last-positions", "1"]) == 0
    manifest = load_bundle(tmp_path / "r").manifest
    assert manifest["training_data"]["targets"].startswith("train: the last 1 position")
    assert "sequence_score" not in manifest["feature_names"] and "sequence_model" not in manifest


def test_a_bundle_serves_the_refit_of_the_sequence_model_its_ranker_learned_from(loo_dir, tmp_path):
    """`--sequence-serve`: the trees are those `--sequence` alone gives (they learn `sequence_score` from
    the held-out model), the bundle carries the refit (the same recipe, a smaller hold-out), and the
    manifest names the model that trained it; a refit of another recipe or catalog is refused."""
    import hashlib

    from ranker.sequence import CONFIG_FILE, MODEL_FILE
    from semrank.cli import main

    seq = ["train", "sequence", "--data", str(loo_dir), "--epochs", "1", "--eval-every", "1", "--dim", "16",
           "--heads", "2", "--layers", "1", "--max-len", "8"]
    for name, extra in (("h1", ["--hold-out", "1"]), ("h0", ["--hold-out", "0"]), ("h2", ["--hold-out", "2"]),
                        ("h0-dim8", ["--hold-out", "0", "--dim", "8"])):  # (the last --dim counts)
        assert main([*seq, "--out", str(tmp_path / name), *extra]) == 0
    args = ["train", "ranker", "--data", str(loo_dir), "--variant", "behavioural", "--hard-negatives", "0",
            "--negatives", "4", "--sequence", str(tmp_path / "h1")]
    assert main([*args, "--out", str(tmp_path / "held-out")]) == 0
    assert main([*args, "--out", str(tmp_path / "refit"), "--sequence-serve", str(tmp_path / "h0")]) == 0
    held_out, refit = load_bundle(tmp_path / "held-out"), load_bundle(tmp_path / "refit")
    assert (tmp_path / "refit" / "ranker.txt").read_text() == (tmp_path / "held-out" / "ranker.txt").read_text()
    for name in (MODEL_FILE, CONFIG_FILE):
        assert (tmp_path / "refit" / "sequence" / name).read_bytes() == (tmp_path / "h0" / name).read_bytes()
    assert refit.sequence.cfg.hold_out == 0 and held_out.sequence.cfg.hold_out == 1
    assert not np.array_equal(refit.sequence.table, held_out.sequence.table)  # another model is served
    trained = refit.manifest["sequence_training_model"]
    assert trained["hold_out"] == 1
    assert trained["sha256"] == hashlib.sha256((tmp_path / "h1" / MODEL_FILE).read_bytes()).hexdigest()
    assert "sequence_training_model" not in held_out.manifest
    for bad in ("h2", "h0-dim8"):  # holds out more; another recipe
        assert main([*args, "--out", str(tmp_path / f"r-{bad}"), "--sequence-serve", str(tmp_path / bad)]) == 2
        assert not (tmp_path / f"r-{bad}" / "ranker.txt").exists()
    assert main([*args[:-2], "--out", str(tmp_path / "r-alone"), "--sequence-serve", str(tmp_path / "h0")]) == 2


def test_cli_choices_match_the_evaluation_module():
    from semrank.cli import evaluate as cli_eval
    from training.evaluation import rankers as eval_rankers

    assert cli_eval.FIRST_STAGES == eval_rankers.FIRST_STAGES
    assert cli_eval.SEQUENCE_STAGES == eval_rankers.SEQUENCE_STAGES
    assert (cli_eval.DEFAULT_FIRST_STAGE, cli_eval.DEFAULT_RERANK_K) == (eval_rankers.DEFAULT_FIRST_STAGE, eval_rankers.DEFAULT_RERANK_K)
    from semrank.cli import train as cli_train
    from training.lambdarank import params

    assert cli_train.FEATURE_CHUNK_ROWS == params.FEATURE_CHUNK_ROWS


def test_examples_do_not_depend_on_the_chunk_size(data):
    """Memory follows `feature_chunk_rows` (issue 32 item 1); the examples must not: every per-group
    piece (user vectors, hard-negative pools, draws, row order, features) is the same in any chunk."""
    ds, split, times = data
    enc = HashEncoder()
    emb = enc.encode(split.titles)
    cfg = LooRankerConfig(**{**FAST, "hard_negatives": 4, "hard_k": 10})
    whole = build_examples(ds, split, cfg, enc, emb, times, progress=False)
    chunks = list(example_chunks(ds, split, replace(cfg, feature_chunk_rows=40), enc, emb, times, progress=False))
    assert groups_per_chunk(replace(cfg, feature_chunk_rows=40)) == 3 and len(chunks) > 10
    # equal but for a float sum's order (co-occurrence sums may differ by about 1e-16)
    assert_frame_equal(pl.concat(chunks), whole, rel_tol=1e-12, abs_tol=1e-12)
    assert groups_per_chunk(replace(cfg, feature_chunk_rows=13 * 2500)) == 2000  # a multiple of the pools' pass


def test_a_sequence_ranker_trains_on_a_log_with_impression_lists(small_shop, tmp_path):
    """A shop's log (impression lists): `--sequence` trains the ranker on leave-one-out targets from
    its engagements, as on interaction data (the lists are not read)."""
    from featurizer.contracts.schema import has_impression_lists, read_dataset
    from semrank.cli import main

    assert has_impression_lists(read_dataset(small_shop).events)
    assert main(["train", "sequence", "--data", str(small_shop), "--out", str(tmp_path / "seq"), "--epochs", "1",
                 "--eval-every", "1", "--dim", "16", "--heads", "2", "--layers", "1", "--max-len", "8",
                 "--hold-out", "1"]) == 0
    assert main(["train", "ranker", "--data", str(small_shop), "--out", str(tmp_path / "r"), "--variant", "behavioural",
                 "--hard-negatives", "0", "--negatives", "4", "--sequence", str(tmp_path / "seq")]) == 0
    bundle = load_bundle(tmp_path / "r")
    assert bundle.manifest["training_mode"] == TRAINING_MODE and bundle.sequence is not None

