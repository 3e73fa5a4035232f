"""Erasure on a running server's state (issue 18 item 3; serving/ingest/live_erasure.py): the
features are rebuilt beside the live ones in a child process, caught up with the events logged
meanwhile and swapped in; afterwards every other user's features equal those of data that never
held the erased users, with the in-process store (whose snapshot on disk is rewritten) and with
Redis (whose namespace is replaced), and the erased users read as cold; a restart and a replay
without the snapshot read the same."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from featurizer.contracts.schema import read_dataset
from featurizer.online.features import OnlineFeatures
from featurizer.privacy import Pseudonyms
from featurizer.store.config import InProcessConfig, RedisConfig
from featurizer.store.in_process import InProcessStore
from featurizer.store.redis import RedisStore
from serving.config import Limits
from serving.experiments.exposure_log import Exposure, ExposureLog
from serving.ingest.apply import EventIngest
from serving.ingest.live_erasure import LiveErasure, run_rebuild
from serving.ingest.log_format import LoggedEvent, events_frame
from serving.ingest.restore import SNAPSHOT_FILE, build_engine


def _events(t_end_us: int, users: list[str], items: list[str], prefix: str, start: int = 0) -> list[LoggedEvent]:
    return [LoggedEvent(t_end_us + (start + k) * 1_000_000, user, items[(start + k) % len(items)], "purchase",
                        event_id=f"{prefix}{k}") for k, user in enumerate(users)]


async def _erase_on_a_live_state(shop: Path, state: Path, store_cfg, names: Pseudonyms) -> dict:
    """A state with a data-directory user and a log user to erase, an erasure, events logged by
    another user while it rebuilds; returns what the test compares."""
    ds = read_dataset(shop)
    data_user = ds.events.group_by("user_id").len().sort(["len", "user_id"])["user_id"][-1]  # the busiest
    items = ds.items["item_id"].to_list()
    t_end = int(ds.events["ts"].max().timestamp() * 1e6)
    before = _events(t_end, ["log-user", "keeper", "log-user", names(data_user), "keeper"], items, "b")
    during = _events(t_end, ["keeper", "late-user", "log-user"], items, "d", start=len(before))
    built = build_engine(shop, state, store_cfg, pseudonyms=names)
    engine = built.engine
    ingest = EventIngest(built.event_log, engine.online, worker=engine.store_worker)
    exposures = ExposureLog(state / "exposures")
    try:
        await ingest.log_events(before)
        exposures.record(Exposure(request_id="r", user_id="log-user", experiment="", variant="", bundle_version="v",
                                  item_ids=("a",)))
        engine._users.put(("enc", "tower", "log-user"), ((), None))  # a cached user vector of an erased user

        async def persist() -> None:
            write = engine.online.store.freeze(True)
            if write is not None:
                write()

        stored_during = []

        async def rebuild_then_write(spec: dict) -> dict:
            """The real child; then, before the swap, writes land in the live state and the log (the
            erased user's too: the API refuses it, this is the ingest path behind it)."""
            answer = await run_rebuild(spec)
            stored_during.append((await ingest.log_events(during)).stored)
            return answer

        erasure = LiveErasure(state_dir=state, data_dir=shop, store_cfg=store_cfg, engine=engine, ingest=ingest,
                              exposures=exposures, pseudonyms=names, rules=Limits().event_rules,
                              erasures=built.erasures, persist=persist,
                              forget=lambda users: engine.forget_users(users, []), rebuild=rebuild_then_write)
        out = await erasure.erase([names(data_user), "log-user"], "ticket-7")
        assert stored_during == [3]
        return {"out": out, "ds": ds, "data_user": data_user, "items": items, "online": engine.online,
                "kept_events": [e for e in before + during if e.user_id not in (names(data_user), "log-user")],
                "cached": len(engine._users), "built": built, "exposures": exposures}
    except BaseException:
        exposures.close()
        built.close()
        raise


def _check_equal_to_a_log_without_them(r: dict, names: Pseudonyms) -> None:
    ds, data_user, items, online = r["ds"], r["data_user"], r["items"], r["online"]
    reference = OnlineFeatures(InProcessStore(), ds.items)
    reference.apply(names.events(ds.events.filter(pl.col("user_id") != data_user)))
    reference.apply(events_frame(r["kept_events"]))
    t = reference.watermark + timedelta(seconds=1)
    assert online.watermark == reference.watermark
    others = [names(u) for u in ds.events["user_id"].unique(maintain_order=True).to_list()[:30] if u != data_user]
    for user in [*others, "keeper", "late-user"]:
        np.testing.assert_array_equal(online.features(user, items[:40], t), reference.features(user, items[:40], t))
    cold = reference.features("never-seen", items[:40], t)
    for user in (names(data_user), "log-user"):
        np.testing.assert_array_equal(online.features(user, items[:40], t), cold)
        assert online.sequence(user, t) == []


def test_a_live_erasure_rebuilds_beside_catches_up_and_rewrites_the_snapshot(small_shop, tmp_path):
    names = Pseudonyms(b"k" * 32)
    state = tmp_path / "state"
    cfg = InProcessConfig(path=str(state / SNAPSHOT_FILE))
    r = asyncio.run(_erase_on_a_live_state(small_shop, state, cfg, names))
    try:
        out = r["out"]
        assert out["users"] == 2 and out["events"] == 4 and out["exposures"] == 1  # 3 before, 1 logged during
        assert out["caught_up"] == 2 and out["data_events"] > 0  # keeper's and late-user's, not log-user's
        _check_equal_to_a_log_without_them(r, names)
        assert r["cached"] == 0  # the erased user's cached vector went
        blobs = b"".join(p.read_bytes() for p in state.rglob("*") if p.is_file() and "embeddings" not in p.parts)
        for gone in (names(r["data_user"]), "log-user"):
            assert gone.encode() not in blobs
        assert not (state / "privacy" / "rebuild").exists()
        assert r["data_user"] not in blobs.decode(errors="replace")
    finally:
        r["exposures"].close()
        r["built"].close()
    # a restart (as `semrank serve` and `semrank score` build it) gives the same features, and so does a
    # replay of the data directory and the event log without the snapshot
    for replay in (False, True):
        if replay:
            (state / SNAPSHOT_FILE).unlink()
        again = build_engine(small_shop, state, None, read_only=True, pseudonyms=names)
        try:
            r["online"] = again.engine.online
            _check_equal_to_a_log_without_them(r, names)
        finally:
            again.close()


def test_a_live_erasure_with_redis_replaces_the_namespace(small_shop, tmp_path):
    names = Pseudonyms()
    cfg = RedisConfig(namespace=f"test-live-erase-{uuid.uuid4().hex[:8]}")
    try:
        r = asyncio.run(_erase_on_a_live_state(small_shop, tmp_path / "state", cfg, names))
        try:
            _check_equal_to_a_log_without_them(r, names)
            assert r["out"]["events"] == 4
        finally:
            r["exposures"].close()
            r["built"].close()
        leftover = RedisStore(RedisConfig(namespace=f"{cfg.namespace}-erasure"))
        try:
            assert leftover.drop_namespace() == 0  # the rebuilt namespace was moved, not copied
        finally:
            leftover.close()
    finally:
        store = RedisStore(cfg)
        store.drop_namespace()
        store.close()


@pytest.mark.parametrize("bad", ["in-process", "same-namespace"])
def test_adopt_refuses_what_it_cannot_take(tmp_path, bad):
    from featurizer.store.base import OnlineStoreError

    if bad == "in-process":
        with InProcessStore(InProcessConfig(path=str(tmp_path / "a.bin"))) as live, \
                InProcessStore(InProcessConfig(path=str(tmp_path / "b.bin"))) as other:
            with pytest.raises(OnlineStoreError, match="detached"):
                live.adopt(other)
    else:
        cfg = RedisConfig(namespace=f"test-adopt-{uuid.uuid4().hex[:8]}")
        a, b = RedisStore(cfg), RedisStore(cfg)
        try:
            with pytest.raises(OnlineStoreError, match="another namespace"):
                a.adopt(b)
        finally:
            a.close()
            b.close()


def test_adopt_keeps_the_adopted_stores_readers_and_forces_a_full_snapshot(tmp_path):
    path = tmp_path / "live.bin"
    live = InProcessStore(InProcessConfig(path=str(path)))
    live.write("user", {"gone": {"n": 1}, "stays": {"n": 2}})
    live.flush()
    live.write("user", {"stays": {"n": 3}})
    live.flush()  # a delta on disk
    rebuilt = InProcessStore(InProcessConfig(path=str(tmp_path / "rebuilt.bin")))
    rebuilt.write("user", {"stays": {"n": 3}})
    rebuilt.close()
    beside = InProcessStore.detached(tmp_path / "rebuilt.bin")
    version, _ = beside.changes("user", None)  # a reader of the rebuilt state (its caches as of `version`)
    beside.write("user", {"late": {"n": 4}})
    live.adopt(beside)
    assert live.read("user", ["gone", "stays", "late"]) == [None, {"n": 3}, {"n": 4}]
    assert live.changes("user", version)[1] == {"late"}  # it goes on with the adopted store's record
    live.flush()
    assert not Path(str(path) + ".delta").exists() and b"gone" not in path.read_bytes()
    live.close()
    assert InProcessStore(InProcessConfig(path=str(path))).read("user", ["gone", "stays"]) == [None, {"n": 3}]


def test_a_purge_the_stream_refuses_fails_the_erasure_with_its_reason_and_erases_nothing(tmp_path):
    """Fault injection: a JetStream ingest whose purge fails (as a replica without the purge
    permission sees it: the request times out). DeleteUser's erasure answers ERASURE_INCOMPLETE
    naming the permissions, and suppresses nobody."""
    import nats.errors

    from featurizer.erasure import Erasures
    from serving.config import JetStreamConfig
    from serving.ingest.live_erasure import ErasureFailed, StreamSide

    class PurgeDeniedIngest:  # fault injection: only what the erasure calls before its rebuild
        js = None
        erasures = None

        async def purge_subjects(self, subjects):
            raise nats.errors.TimeoutError

    names = Pseudonyms(b"k" * 32)
    erasures = Erasures.open(tmp_path, names)

    async def nothing() -> None:
        return None

    erasure = LiveErasure(state_dir=tmp_path, data_dir=tmp_path, store_cfg=InProcessConfig(), engine=None,
                          ingest=PurgeDeniedIngest(), exposures=None, pseudonyms=names, rules=Limits().event_rules,
                          erasures=erasures, persist=nothing, forget=lambda users: None,
                          stream=StreamSide(JetStreamConfig(), 3600, Limits().item_rules, nothing))
    assert erasure.refusal() is None
    with pytest.raises(ErasureFailed, match="permissions"):
        asyncio.run(erasure.erase([names("u1")], "ticket"))
    assert len(erasures) == 0 and erasure.rebuilds == 0
