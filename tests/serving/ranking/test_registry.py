"""The bundle registry (serving/ranking/registry.py) without gRPC or Triton: loading embeds the
catalog, broken bundles are rejected and change nothing, a reload swaps atomically and retires the
old runtime only after its last request, encoders are shared per encoder key."""

from __future__ import annotations

import asyncio
import re
import shutil

import numpy as np
import polars as pl
import pytest

from featurizer.contracts.schema import read_dataset
from featurizer.online.features import OnlineFeatures
from featurizer.store.in_process import InProcessStore
from ranker.bundle import MANIFEST
from serving.ranking.engine import RankingEngine
from serving.ranking.outcome import Candidate
from serving.ranking.item_store import ItemStore
from serving.ranking.registry import BundlePathRefused, BundleRegistry, BundleRejected, allowed_bundle_path
from tests.serving.ranking.ranking_kit import FEATURES, HashEncoderPool, write_bundle


@pytest.fixture(scope="module")
def ds(small_shop):
    return read_dataset(small_shop)


@pytest.fixture
def registry(ds):
    online = OnlineFeatures(InProcessStore(), ds.items)
    online.apply(ds.events)
    pool = HashEncoderPool()
    reloads: list[tuple[str, str]] = []
    reg = BundleRegistry(RankingEngine(items=ItemStore(ds.items), online=online), pool,
                         on_reload=lambda result, version: reloads.append((result, version)))
    reg.reloads = reloads
    return reg


def run(coro):
    return asyncio.run(coro)


def test_loading_a_bundle_starts_its_encoder_and_embeds_the_catalog(registry, tmp_path):
    bundle = write_bundle(tmp_path / "b1")
    run(registry.start(tmp_path / "b1"))
    loaded = registry.default
    assert loaded.runtime.version == bundle.version and registry.pool.started == 1
    table, current = registry.engine.items.embeddings(loaded.handle.key)
    assert current.all() and table.shape == (len(registry.engine.items), 16)


def test_a_bundle_without_text_features_needs_no_encoder(registry, tmp_path):
    write_bundle(tmp_path / "behavioural", feature_names=[f for f in FEATURES if f != "interest_score"])
    run(registry.start(tmp_path / "behavioural"))
    assert registry.default.handle is None and registry.pool.started == 0 and not registry.default.runtime.uses_text


@pytest.mark.parametrize("damage, message", [
    ("manifest_garbage", "not valid JSON"),
    ("model_missing", "ranker.txt"),
    ("unknown_feature", "cannot compute: \\['feature_from_the_future'\\]"),
    ("model_half_copied", "LightGBM can read: its parser aborted"),  # LightGBM alone would kill this process
])
def test_a_broken_bundle_is_rejected_and_the_serving_one_stays(registry, tmp_path, damage, message):
    good = write_bundle(tmp_path / "good")
    run(registry.start(tmp_path / "good"))
    bad = tmp_path / "bad"
    if damage == "unknown_feature":  # a bundle from a newer semrank
        write_bundle(bad, feature_names=[*FEATURES, "feature_from_the_future"])
    else:
        shutil.copytree(tmp_path / "good", bad)
        if damage == "manifest_garbage":
            (bad / MANIFEST).write_text("{ not json")
        elif damage == "model_half_copied":
            text = (bad / "ranker.txt").read_text()
            (bad / "ranker.txt").write_text(text[: len(text) // 2])
        else:
            (bad / "ranker.txt").unlink()
    with pytest.raises(BundleRejected, match=message):
        run(registry.load(bad))
    ok, version, why = run(registry.reload(bad))
    assert (ok, version) == (False, good.version) and re.search(message, why)
    assert registry.default.runtime.version == good.version and registry.reloads == [("rejected", "")]
    assert registry.pool.started == 1 and registry.pool.stopped == 0  # the rejected load released what it took


def test_a_bundle_with_a_sequence_model_ranks_with_its_score_cached_per_user_and_history(registry, ds, tmp_path):
    """The sequence model runs in this process over the user's sequence (no encoder for it), its
    score of a candidate follows the user's new engagements, and it is recomputed only after one."""
    hits = []
    registry.engine.on_cache = lambda cache, hit: hits.append(hit) if cache == "sequence_user" else None
    bundle = write_bundle(tmp_path / "seq", feature_names=[f for f in FEATURES if f != "interest_score"],
                          sequence_catalog=ds.items["item_id"].to_list())
    run(registry.start(tmp_path / "seq"))
    rt, engine = registry.default.runtime, registry.engine
    assert registry.default.handle is None and rt.bundle.sequence is not None
    engaged = ds.events.filter(pl.col("event") != "impression")
    user = engaged.group_by("user_id").len().sort(["len", "user_id"])["user_id"][-1]
    ids = ds.items["item_id"].to_list()[:30]
    rows = engine.items.rows(ids)

    def scores():
        return run(engine.sequence_scores(rt, user, rows, engine.now(), None, []))

    hits.clear()
    first = scores()
    assert np.isfinite(first).all() and hits == [False]  # the probe's unknown user ran before
    assert np.array_equal(scores(), first) and hits == [False, True]
    unknown = run(engine.sequence_scores(rt, "nobody", rows, engine.now(), None, []))
    assert np.isnan(unknown).all()  # no sequence: missing, as LightGBM was trained to route it
    new_item = next(i for i in ids if i not in set(engine.online.sequence(user, engine.now())))
    engine.online.apply(pl.DataFrame({"ts": [engine.now()], "user_id": [user], "item_id": [new_item],
                                      "event": ["click"]}).with_columns(pl.col("ts").cast(pl.Datetime("us", "UTC"))))
    after = scores()
    assert hits[-1] is False and not np.allclose(after, first)
    outcome = run(engine.rank(rt, user, [Candidate(item_id=i) for i in ids]))
    assert not outcome.degraded and bundle.version == rt.version


@pytest.mark.parametrize("damage, message", [
    ("weights_missing", "cannot load the sequence model"),
    ("outside", "outside the bundle"),
    ("catalog_missing", "names no catalog"),
])
def test_a_broken_sequence_model_is_rejected(registry, ds, tmp_path, damage, message):
    import json

    from ranker.sequence import CONFIG_FILE, MODEL_FILE

    path = tmp_path / "seq"
    write_bundle(path, sequence_catalog=ds.items["item_id"].to_list())
    if damage == "weights_missing":
        (path / "sequence" / MODEL_FILE).unlink()
    elif damage == "outside":
        manifest = json.loads((path / MANIFEST).read_text())
        shutil.copytree(path / "sequence", tmp_path / "elsewhere")
        (path / MANIFEST).write_text(json.dumps({**manifest, "sequence_model": "../elsewhere"}))
    else:
        meta = json.loads((path / "sequence" / CONFIG_FILE).read_text())
        (path / "sequence" / CONFIG_FILE).write_text(json.dumps({**meta, "item_ids": []}))
    with pytest.raises(BundleRejected, match=message):
        run(registry.load(path))


def test_a_sequence_bundle_is_refused_on_a_state_with_partial_sequences(registry, ds, tmp_path):
    write_bundle(tmp_path / "seq", sequence_catalog=ds.items["item_id"].to_list())
    registry.engine.online.sequence_complete = False  # a store written before semrank kept sequences
    with pytest.raises(BundleRejected, match="partial"):
        run(registry.load(tmp_path / "seq"))


def test_a_reload_swaps_and_retires_the_old_runtime_after_its_last_request(registry, tmp_path):
    old = write_bundle(tmp_path / "live", seed=1)

    async def scenario():
        await registry.start(tmp_path / "live")
        first = registry.default
        first.runtime.inflight = 1  # a request still ranking on the old bundle
        assert await registry.reload() == (False, old.version, "unchanged")
        new = write_bundle(tmp_path / "live", seed=2)  # same path, new files (what a deploy does)
        assert await registry.reload() == (True, new.version, "reloaded")
        assert registry.default.runtime.version == new.version
        await asyncio.sleep(0.05)
        shared = first.handle is registry.default.handle  # one encoder key: one encoder for both
        assert shared and first.handle.users == 2  # the old runtime still holds it
        first.runtime.inflight = 0
        await asyncio.sleep(0.05)
        assert first.handle.users == 1 and registry.pool.stopped == 0
        await registry.close()
        return new

    new = run(scenario())
    assert registry.reloads == [("ok", new.version)] and registry.pool.started == 1 and registry.pool.stopped == 1


def test_the_watcher_reloads_when_the_files_change(registry, tmp_path):
    write_bundle(tmp_path / "watched", seed=3)

    async def scenario():
        await registry.start(tmp_path / "watched")
        task = asyncio.create_task(registry.watch(0.01))
        new = write_bundle(tmp_path / "watched", seed=4)
        for _ in range(500):
            if registry.default.runtime.version == new.version:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        await registry.close()
        return new

    new = run(scenario())
    assert registry.default.runtime.version == new.version


def test_bundles_are_read_off_the_event_loop(registry, tmp_path, monkeypatch):
    """Issue 14, problem 1: reading and parsing a bundle ran on the event loop and stalled every Rank."""
    import threading

    import serving.ranking.registry as registry_module

    threads = []
    load = registry_module.load_bundle

    def recording_load(path, *args):  # a spy around the real loader
        threads.append(threading.current_thread())
        return load(path, *args)

    monkeypatch.setattr(registry_module, "load_bundle", recording_load)
    write_bundle(tmp_path / "b")
    run(registry.start(tmp_path / "b"))
    assert threads and all(t is not threading.main_thread() for t in threads)


@pytest.mark.parametrize("path", ["", "/etc", "a\0b", "x" * 5000, "{root}/missing", "{root}/b/manifest.json",
                                  "{root}/not-a-bundle", "{root}/../elsewhere"])
def test_only_bundle_directories_under_a_root_are_allowed(tmp_path, path):
    root = tmp_path / "bundles"
    write_bundle(root / "b")
    (root / "not-a-bundle").mkdir()
    (tmp_path / "elsewhere").mkdir()
    write_bundle(tmp_path / "elsewhere" / "x")
    with pytest.raises(BundlePathRefused) as e:
        allowed_bundle_path(path.format(root=root), [root])
    assert "is not a bundle directory under the server's allowed bundle roots" in str(e.value)
    assert allowed_bundle_path(str(root / "b"), [root]) == root / "b"


def test_a_symlink_into_a_root_is_allowed_and_kept_as_given(tmp_path):
    root = tmp_path / "bundles"
    write_bundle(root / "v1")
    (root / "current").symlink_to(root / "v1")
    assert allowed_bundle_path(str(root / "current"), [root]) == root / "current"  # the watcher follows the link
    (tmp_path / "outside").symlink_to(root / "v1")
    assert allowed_bundle_path(str(tmp_path / "outside"), [root]) == tmp_path / "outside"  # resolves inside the root
    write_bundle(tmp_path / "elsewhere")
    (root / "deployed").symlink_to(tmp_path / "elsewhere")  # an operator's link from the root to a bundle elsewhere
    assert allowed_bundle_path(str(root / "deployed"), [root]) == root / "deployed"
