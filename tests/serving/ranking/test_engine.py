"""The request-path engine (serving/ranking/engine.py) without gRPC or Triton: ordering, unknown and
inline items, cold starts, the user-embedding cache, degraded answers when the encoder is down,
the clock, explanations and holdouts."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import numpy as np
import polars as pl
import pytest

from featurizer.contracts.schema import read_dataset
from featurizer.definitions import FAMILIES, NAMES
from featurizer.online.features import OnlineFeatures
from featurizer.store.in_process import InProcessStore
from ranker.bundle import load_bundle
from ranker.user_tower import UserTower
from serving.encoding.pool import InProcessEncoder
from serving.ranking.engine import BundleRuntime, RankingEngine
from serving.ranking.outcome import Candidate, degraded_code, holdout
from serving.ranking.item_store import ItemStore
from tests.fakes import DIM, FailingEncoderService, HashEncoder
from tests.serving.ranking.ranking_kit import write_bundle

KEY = "hash-encoder-L128"


@pytest.fixture(scope="module")
def ds(small_shop):
    return read_dataset(small_shop)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return write_bundle(tmp_path_factory.mktemp("engine-bundle"))


@pytest.fixture
def engine(ds):
    online = OnlineFeatures(InProcessStore(), ds.items)
    online.apply(ds.events)
    items = ItemStore(ds.items)
    asyncio.run(items.ensure_embeddings(KEY, InProcessEncoder(HashEncoder()).encode_bulk, DIM))
    hits: list[tuple[str, bool]] = []
    eng = RankingEngine(items=items, online=online, clock=lambda: online.watermark + timedelta(hours=1),
                        on_cache=lambda name, hit: hits.append((name, hit)))
    eng.cache_hits = hits
    return eng


def engaged_user(ds) -> str:
    eng = ds.events.filter(pl.col("event") != "impression").group_by("user_id").len().sort(["len", "user_id"])
    return eng["user_id"][-1]


def rank(engine, rt, user, candidates, **kw):
    return asyncio.run(engine.rank(rt, user, candidates, **kw))


def test_every_candidate_comes_back_best_first_and_unknown_ids_are_reported(engine, bundle, ds):
    rt = BundleRuntime(bundle, KEY, InProcessEncoder(HashEncoder()))
    ids = ds.items["item_id"].head(12).to_list()
    cands = [Candidate(i) for i in ids] + [Candidate("inline-lamp", title="Brass desk lamp", category="Home"),
                                           Candidate("ghost")]
    out = rank(engine, rt, engaged_user(ds), cands)
    assert sorted(out.item_ids) == sorted([*ids, "inline-lamp", "ghost"])
    assert np.all(np.diff(out.scores) <= 0) and np.isfinite(out.scores).all()
    assert out.missing_ids == ["ghost"]  # no catalog entry and no title: ranked without item data
    assert not out.degraded and not out.cold_start_user


def test_the_scores_are_the_bundle_on_the_online_features_and_interest(engine, bundle, ds):
    enc = HashEncoder()
    rt = BundleRuntime(bundle, KEY, InProcessEncoder(enc))
    user, ids = engaged_user(ds), ds.items["item_id"].head(8).to_list()
    out = rank(engine, rt, user, [Candidate(i) for i in ids])
    t = engine.now()
    titles = [engine.items.title(i) for i in engine.online.history(user, t, rt.inputs.history_items)]
    u = enc.encode([rt.inputs.tower.user_text(titles)])[0]
    items = enc.encode([engine.items.texts[k] for k in engine.items.rows(ids)])
    X = rt.inputs.matrix(engine.online.features(user, ids, t, interest_score=items @ u))
    want = dict(zip(ids, bundle.score(X)))
    np.testing.assert_allclose(out.scores, [want[i] for i in out.item_ids], rtol=1e-6)


def test_a_user_without_history_is_a_cold_start_not_a_degraded_answer(engine, bundle, ds):
    rt = BundleRuntime(bundle, KEY, InProcessEncoder(HashEncoder()))
    out = rank(engine, rt, "never-seen-user", [Candidate(i) for i in ds.items["item_id"].head(5)])
    assert out.cold_start_user and not out.degraded and len(out.item_ids) == 5


def test_the_user_embedding_is_cached_until_the_history_changes(engine, bundle, ds):
    rt = BundleRuntime(bundle, KEY, InProcessEncoder(HashEncoder()))
    user, cands = engaged_user(ds), [Candidate(i) for i in ds.items["item_id"].head(5)]
    rank(engine, rt, user, cands)
    rank(engine, rt, user, cands)
    assert [h for name, h in engine.cache_hits if name == "user_embedding"] == [False, True]
    item = ds.items["item_id"][-1]
    engine.online.apply(pl.DataFrame({"ts": [engine.online.watermark + timedelta(seconds=1)], "user_id": [user],
                                      "item_id": [item], "event": ["purchase"]}))
    rank(engine, rt, user, cands)
    assert [h for name, h in engine.cache_hits if name == "user_embedding"] == [False, True, False]


def test_with_the_encoder_down_the_answer_is_degraded_and_says_why(engine, bundle, ds):
    down = FailingEncoderService()
    rt = BundleRuntime(bundle, KEY, down)
    ids = ds.items["item_id"].head(6).to_list()
    out = rank(engine, rt, engaged_user(ds), [Candidate(i) for i in ids] + [Candidate("inline-x", title="Oak chair")])
    assert down.calls == 1 and out.degraded
    assert out.degraded_reasons == ["encoder_unavailable: ranked without text features (fault injection: the encoder is down)"]
    assert degraded_code(out.degraded_reasons[0]) == "encoder_unavailable"
    assert sorted(out.item_ids) == sorted([*ids, "inline-x"]) and np.isfinite(out.scores).all()


def test_with_the_encoder_down_a_cached_user_embedding_is_used_and_flagged(engine, bundle, ds):
    user, cands = engaged_user(ds), [Candidate(i) for i in ds.items["item_id"].head(6)]
    up = BundleRuntime(bundle, KEY, InProcessEncoder(HashEncoder()))
    fresh = rank(engine, up, user, cands)
    engine.online.apply(pl.DataFrame({"ts": [engine.online.watermark + timedelta(seconds=1)], "user_id": [user],
                                      "item_id": [ds.items["item_id"][-1]], "event": ["click"]}))
    out = rank(engine, BundleRuntime(bundle, KEY, FailingEncoderService()), user, cands)
    assert out.degraded and "user embedding from an older history" in out.degraded_reasons[0]
    assert set(out.item_ids) == set(fresh.item_ids)


def test_now_is_never_before_the_latest_applied_event(ds):
    online = OnlineFeatures(InProcessStore(), ds.items)
    online.apply(ds.events)
    engine = RankingEngine(items=ItemStore(ds.items), online=online, clock=lambda: online.watermark - timedelta(days=1))
    assert engine.now() == online.watermark + timedelta(microseconds=1)


def test_explanations_sum_to_the_score(engine, bundle, ds):
    rt = BundleRuntime(bundle, KEY, InProcessEncoder(HashEncoder()))
    out = rank(engine, rt, engaged_user(ds), [Candidate(i) for i in ds.items["item_id"].head(7)], explain=True)
    np.testing.assert_allclose(out.contributions.sum(axis=1) + out.bias, out.scores, rtol=1e-6, atol=1e-9)


def test_a_holdout_keeps_the_callers_order_unscored():
    out = holdout([Candidate("b"), Candidate("a"), Candidate("c")])
    assert out.item_ids == ["b", "a", "c"] and not out.scores.any() and not out.degraded


def test_inline_texts_one_request_may_embed_are_bounded(ds, bundle):
    """Issue 14, problem 6: per-request encoding work is bounded; the items over the limit rank without text."""
    online = OnlineFeatures(InProcessStore(), ds.items)
    online.apply(ds.events)
    items = ItemStore(ds.items)
    asyncio.run(items.ensure_embeddings(KEY, InProcessEncoder(HashEncoder()).encode_bulk, DIM))
    engine = RankingEngine(items=items, online=online, max_inline_encodes=3)
    counting = CountingEncoderService()
    rt = BundleRuntime(bundle, KEY, counting)
    cands = [Candidate(f"inline-{k}", title=f"Inline item number {k}") for k in range(8)]
    out = rank(engine, rt, engaged_user(ds), cands)
    assert counting.texts == 1 + 3  # the user's history text, then three of the eight items
    assert out.degraded and degraded_code(out.degraded_reasons[0]) == "inline_item_limit"
    assert "5 item(s) over the 3" in out.degraded_reasons[0] and len(out.item_ids) == 8


class CountingEncoderService(InProcessEncoder):
    def __init__(self):
        super().__init__(HashEncoder())
        self.texts = 0

    async def encode(self, texts, timeout_s=None):
        self.texts += len(texts)
        return await super().encode(texts, timeout_s)


def test_answers_during_a_store_rebuild_are_marked(engine, bundle, ds):
    engine.store_rebuilding = True
    out = rank(engine, BundleRuntime(bundle, KEY, InProcessEncoder(HashEncoder())), engaged_user(ds),
               [Candidate(i) for i in ds.items["item_id"].head(4)])
    assert out.degraded and [degraded_code(r) for r in out.degraded_reasons] == ["online_store_rebuilding"]


class ApplyingWhileEncoding(InProcessEncoder):
    """Fault injection: while the Rank awaits the user's embedding, events newer than the Rank's
    start are applied (as a LogEvents or the JetStream fold does on the same loop)."""

    def __init__(self, online, events):
        super().__init__(HashEncoder())
        self.online, self.events = online, events

    async def encode(self, texts, timeout_s=None):
        if self.events is not None:
            self.online.apply(self.events)
            self.events = None
        return await super().encode(texts, timeout_s)


def test_events_applied_while_a_rank_awaits_the_encoder_never_fail_it(ds, bundle):
    """Found by the bench's mixed phase: the Rank took its instant, awaited Triton, and the events
    applied meanwhile (stamped later) made the feature read raise StaleQueryError:
    FAILED_PRECONDITION for the caller. The read now happens at the newest of both."""
    online = OnlineFeatures(InProcessStore(), ds.items)
    online.apply(ds.events)
    items = ItemStore(ds.items)
    asyncio.run(items.ensure_embeddings(KEY, InProcessEncoder(HashEncoder()).encode_bulk, DIM))
    clock = {"t": online.watermark + timedelta(seconds=1)}
    engine = RankingEngine(items=items, online=online, clock=lambda: clock["t"])
    user, item = engaged_user(ds), ds.items["item_id"][-1]
    newer = pl.DataFrame({"ts": [clock["t"] + timedelta(seconds=5)], "user_id": [user], "item_id": [item],
                          "event": ["purchase"]})
    rt = BundleRuntime(bundle, KEY, ApplyingWhileEncoding(online, newer))
    out = rank(engine, rt, user, [Candidate(i) for i in ds.items["item_id"].head(5)])
    assert len(out.item_ids) == 5 and not out.degraded


# --------------------------------------------------------------------------- the pooled user tower


@pytest.fixture(scope="module")
def pooled_bundle(tmp_path_factory):
    return write_bundle(tmp_path_factory.mktemp("pooled-bundle"), tower=UserTower.pooled(10, 0.5))


def counting_engine(ds, **kw):
    """An engine like `engine`'s with the encode and skipped-history callbacks recorded."""
    online = OnlineFeatures(InProcessStore(), ds.items)
    online.apply(ds.events)
    items = ItemStore(ds.items)
    asyncio.run(items.ensure_embeddings(KEY, InProcessEncoder(HashEncoder()).encode_bulk, DIM))
    calls, skipped = [], []
    eng = RankingEngine(items=items, online=online, clock=lambda: online.watermark + timedelta(hours=1),
                        on_encode=lambda cause, n: calls.append((cause, n)), on_history_skipped=skipped.append, **kw)
    eng.encode_calls, eng.skipped = calls, skipped
    return eng


def test_pooled_tower_scores_over_item_vectors_with_no_encoder_call(ds, pooled_bundle):
    engine = counting_engine(ds)
    counting = CountingEncoderService()
    rt = BundleRuntime(pooled_bundle, KEY, counting)
    user, ids = engaged_user(ds), ds.items["item_id"].head(8).to_list()
    out = rank(engine, rt, user, [Candidate(i) for i in ids])
    assert counting.texts == 0 and engine.encode_calls == [] and not out.degraded
    t = engine.now()
    table, _ = engine.items.embeddings(KEY)
    hist = engine.items.rows(engine.online.history(user, t, 10))
    u = pooled_bundle.tower.pool(table[hist][None])[0]
    X = rt.inputs.matrix(engine.online.features(user, ids, t, interest_score=table[engine.items.rows(ids)] @ u))
    want = dict(zip(ids, pooled_bundle.score(X)))
    np.testing.assert_allclose(out.scores, [want[i] for i in out.item_ids], rtol=1e-6)


def test_pooled_tower_follows_an_event_at_once(ds, pooled_bundle):
    """The next Rank after an event has the event in its user vector: the text family's contribution moves."""
    engine = counting_engine(ds)
    rt = BundleRuntime(pooled_bundle, KEY, CountingEncoderService())
    user, cands = engaged_user(ds), [Candidate(i) for i in ds.items["item_id"].head(6)]
    before = rank(engine, rt, user, cands, explain=True)
    item = ds.items["item_id"][-1]
    engine.online.apply(pl.DataFrame({"ts": [engine.online.watermark + timedelta(seconds=1)], "user_id": [user],
                                      "item_id": [item], "event": ["purchase"]}))
    after = rank(engine, rt, user, cands, explain=True)
    text = FAMILIES.index("text")
    b = dict(zip(before.item_ids, before.contributions[:, text]))
    a = dict(zip(after.item_ids, after.contributions[:, text]))
    assert any(abs(a[i] - b[i]) > 1e-9 for i in a), "the event did not reach the user vector"
    assert engine.encode_calls == []


def test_pooled_tower_with_the_encoder_down_is_not_degraded_for_known_items(ds, pooled_bundle):
    engine = counting_engine(ds)
    down = FailingEncoderService()
    rt = BundleRuntime(pooled_bundle, KEY, down)
    ids = ds.items["item_id"].head(6).to_list()
    out = rank(engine, rt, engaged_user(ds), [Candidate(i) for i in ids])
    assert down.calls == 0 and not out.degraded and np.isfinite(out.scores).all()
    # an inline item the store does not know still needs the encoder: that answer says so
    out = rank(engine, rt, engaged_user(ds), [Candidate(i) for i in ids] + [Candidate("inline-x", title="Oak chair")])
    assert down.calls == 1 and [degraded_code(r) for r in out.degraded_reasons] == ["encoder_unavailable"]
    assert engine.encode_calls == [("inline_item", 1)]


def test_pooled_tower_counts_encoder_calls_by_cause_and_skipped_history(ds, pooled_bundle):
    engine = counting_engine(ds)
    rt = BundleRuntime(pooled_bundle, KEY, CountingEncoderService())
    user = engaged_user(ds)
    hist = engine.online.history(user, engine.now(), 10)
    stale = hist[0]  # the user's latest item gets a new title: its vector is stale until re-embedded
    engine.items.upsert(pl.DataFrame({"item_id": [stale], "title": ["A title never embedded"]}))
    cands = [Candidate(i) for i in [stale, *ds.items["item_id"].head(3)]] + [Candidate("inline-y", title="Teak desk")]
    out = rank(engine, rt, user, cands)
    assert sorted(engine.encode_calls) == [("inline_item", 1), ("stale_item", 1)] and not out.degraded
    assert engine.skipped == [1]  # the stale history item was left out of the user vector
    engine.encode_calls.clear()
    rank(engine, rt, user, cands)  # both texts' vectors are cached now
    assert engine.encode_calls == []


def test_user_vectors_are_cached_per_tower(ds, bundle, pooled_bundle):
    """Two bundles with other towers never share a cached user vector (A/B arms)."""
    engine = counting_engine(ds)
    user, cands = engaged_user(ds), [Candidate(i) for i in ds.items["item_id"].head(4)]
    rank(engine, BundleRuntime(pooled_bundle, KEY, CountingEncoderService()), user, cands)
    text = CountingEncoderService()
    rank(engine, BundleRuntime(bundle, KEY, text), user, cands)
    assert text.texts == 1 and engine.encode_calls == [("user_text", 1)]  # the pooled entry was not taken


def test_an_unseen_inline_items_price_feeds_its_price_features(ds, small_bundle):
    """Issue 30: the proto promises that an unseen item's inline data is used; its price now feeds
    item_price and item_price_rel_user_all (it was NaN), and so the score, as its category feeds the
    user's category share. A known item keeps its catalog price whatever the request says."""
    online = OnlineFeatures(InProcessStore(), ds.items)
    online.apply(ds.events)
    items = ItemStore(ds.items)
    asyncio.run(items.ensure_embeddings(KEY, InProcessEncoder(HashEncoder()).encode_bulk, DIM))
    seen = []
    engine = RankingEngine(items=items, online=online, clock=lambda: online.watermark + timedelta(hours=1))
    features = online.features
    online.features = lambda *a, **kw: (seen.append(features(*a, **kw)), seen[-1])[1]  # a spy
    rt = BundleRuntime(load_bundle(small_bundle[0]), KEY, InProcessEncoder(HashEncoder()))  # trained on these features
    user, known = engaged_user(ds), ds.items["item_id"][0]
    category = ds.items["category"].drop_nulls()[0]
    col = {n: NAMES.index(n) for n in ("item_price", "item_price_rel_user_all", "user_category_share_all")}
    scores = {}
    for price in (5.0, 500.0, None):
        new = Candidate("inline-new", title="Walnut serving board", category=category, price=price)
        out = rank(engine, rt, user, [new, Candidate(known, price=123.0)])
        X = seen[-1]
        if price is None:
            assert np.isnan(X[0, col["item_price"]])
        else:
            assert X[0, col["item_price"]] == price and np.isfinite(X[0, col["item_price_rel_user_all"]])
        assert X[1, col["item_price"]] == ds.items["price"][0]  # the catalog's, not the request's
        assert np.isfinite(X[0, col["user_category_share_all"]])
        scores[price] = dict(zip(out.item_ids, out.scores))["inline-new"]
    assert len({scores[5.0], scores[500.0], scores[None]}) > 1, scores  # the price moves the score


def test_the_pooled_user_vector_is_cached_until_the_history_or_an_item_vector_changes(ds, pooled_bundle):
    """Issue 29: the pooled vector is kept per user with the history and the item store's
    `vectors_version` it came from; a Rank with neither changed reuses it, an event or a
    re-embedded history item computes it again (and the score follows)."""
    engine = counting_engine(ds)
    rt = BundleRuntime(pooled_bundle, KEY, CountingEncoderService())
    engine.cache_hits = []
    engine.on_cache = lambda name, hit: engine.cache_hits.append(hit) if name == "user_embedding" else None
    user, cands = engaged_user(ds), [Candidate(i) for i in ds.items["item_id"].head(6)]
    first = rank(engine, rt, user, cands)
    again = rank(engine, rt, user, cands)
    assert engine.cache_hits == [False, True] and again.scores == pytest.approx(first.scores)

    latest = engine.online.history(user, engine.now(), 10)[0]  # its text changes and is embedded again
    engine.items.upsert(pl.DataFrame({"item_id": [latest], "title": ["A brand new title for this item"]}))
    asyncio.run(engine.items.ensure_embeddings(KEY, InProcessEncoder(HashEncoder()).encode_bulk, DIM))
    t = engine.now()
    table, _ = engine.items.embeddings(KEY)
    want = pooled_bundle.tower.pool(table[engine.items.rows(engine.online.history(user, t, 10))][None])[0]
    got = asyncio.run(engine.user_embedding(rt, user, t, None, []))
    assert engine.cache_hits == [False, True, False]
    np.testing.assert_allclose(got, want, rtol=1e-6)

    engine.online.apply(pl.DataFrame({"ts": [engine.online.watermark + timedelta(seconds=1)], "user_id": [user],
                                      "item_id": [ds.items["item_id"][-1]], "event": ["purchase"]}))
    asyncio.run(engine.user_embedding(rt, user, engine.now(), None, []))
    assert engine.cache_hits == [False, True, False, False]
