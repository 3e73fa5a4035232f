"""The shared feature snapshot (serving.ingest.snapshots) on the machine's NATS: a replica shares
the in-process store's files as written, the full snapshot only when the bucket holds another one,
and a fresh replica that downloads them loads exactly the sharer's state."""

from __future__ import annotations

import asyncio
import time

import nats
import pytest

from featurizer.store import snapshot_files
from featurizer.store.config import InProcessConfig
from featurizer.store.in_process import InProcessStore
from serving.ingest.snapshots import (
    DELTA,
    FULL_SHARE_EVERY,
    OBJECT,
    bucket_name,
    due,
    fetch_snapshot,
    share_snapshot,
    shared_info,
)
from tests.serving.ingest.test_jetstream import stream_cfg  # noqa: F401 - the fixture


def _store(path, **kw) -> InProcessStore:
    return InProcessStore(InProcessConfig(path=str(path), fork_snapshots=False, **kw))


def _write(store: InProcessStore, n: int, tag: str) -> None:
    store.write_batch({"user": {f"u{k}": {"v": f"{tag}{k}" * 20} for k in range(n)}})


async def _share(cfg, store: InProcessStore, path, seq: int) -> int:
    write = store.freeze()
    if write is not None:
        write()
    nc = await nats.connect(cfg.url)
    try:
        return await share_snapshot(nc.jetstream(), cfg, path, seq)
    finally:
        await nc.close()


async def _info(cfg) -> dict | None:
    nc = await nats.connect(cfg.url)
    try:
        return await shared_info(nc.jetstream(), cfg)
    finally:
        await nc.close()


async def _object_digest(cfg, name: str) -> str | None:
    nc = await nats.connect(cfg.url)
    try:
        bucket = await nc.jetstream().object_store(bucket_name(cfg.stream))
        try:
            return (await bucket.get_info(name)).digest
        except nats.js.errors.ObjectNotFoundError:
            return None
    finally:
        await nc.close()


def _fetched(cfg, tmp_path, name: str) -> dict:
    path = tmp_path / name / "online-store.bin"
    assert asyncio.run(fetch_snapshot(cfg, path)) is not None
    return _store(path)._data


def test_a_replica_shares_its_delta_and_the_full_snapshot_only_when_it_changed(stream_cfg, tmp_path):  # noqa: F811
    cfg = stream_cfg
    path = tmp_path / "a" / "online-store.bin"
    store = _store(path, delta_max_fraction=0.5)
    _write(store, 1000, "x")
    sent = asyncio.run(_share(cfg, store, path, seq=10))  # the first snapshot is a full one
    full_digest = asyncio.run(_object_digest(cfg, OBJECT))
    info = asyncio.run(_info(cfg))
    assert info["seq"] == 10 and info["base_id"] == snapshot_files.ids(path)[0], info
    assert _fetched(cfg, tmp_path, "first") == store._data

    _write(store, 100, "y")  # 100 of 1000 keys changed: a delta
    delta_sent = asyncio.run(_share(cfg, store, path, seq=15))
    assert 0 < delta_sent < sent / 4, (delta_sent, sent)
    assert asyncio.run(_object_digest(cfg, OBJECT)) == full_digest  # the full snapshot was not sent again
    assert asyncio.run(_object_digest(cfg, DELTA)) is not None
    assert asyncio.run(_info(cfg))["seq"] == 15
    assert _fetched(cfg, tmp_path, "second") == store._data  # full + delta: the sharer's state

    _write(store, 800, "z")  # past half of the keys: a new full snapshot, which replaces the shared one
    asyncio.run(_share(cfg, store, path, seq=20))
    assert asyncio.run(_object_digest(cfg, OBJECT)) != full_digest
    info = asyncio.run(_info(cfg))
    assert info["seq"] == 20 and info["base_id"] == snapshot_files.ids(path)[0], info
    # The old delta (of the replaced full snapshot) is still in the bucket; it is not used.
    assert _fetched(cfg, tmp_path, "third") == store._data
    store.close()


def test_share_is_due_by_age_and_replaces_another_replicas_full_snapshot_only_when_old():
    now = time.time()
    mine, other, every = "base-a", "base-b", 300.0
    assert due(None, seq=5, every_s=every) and not due(None, seq=0, every_s=every)
    fresh = {"seq": 5, "shared_at": now - 10, "full_shared_at": now - 10, "base_id": mine}
    assert not due(fresh, seq=9, every_s=every, base_id=mine)  # shared 10 s ago
    old = {**fresh, "shared_at": now - 400}
    assert due(old, seq=9, every_s=every, base_id=mine)  # the same full snapshot: only a delta goes
    assert not due(old, seq=5, every_s=every, base_id=mine)  # nothing newer to share
    assert not due({**old, "base_id": other}, seq=9, every_s=every, base_id=mine)  # another's full, recent
    stale = {**old, "base_id": other, "full_shared_at": now - FULL_SHARE_EVERY * every - 1}
    assert due(stale, seq=9, every_s=every, base_id=mine)


def test_a_fresh_replica_reads_a_bucket_of_the_first_format(stream_cfg, tmp_path):  # noqa: F811
    """Buckets written before deltas hold one full object with {"seq", "stream", "format": 1}."""
    import json

    from nats.js.api import ObjectMeta

    cfg = stream_cfg
    path = tmp_path / "old" / "online-store.bin"
    store = _store(path)
    _write(store, 10, "o")
    store.flush()

    async def put_v1():
        nc = await nats.connect(cfg.url)
        try:
            js = nc.jetstream()
            bucket = await js.create_object_store(bucket_name(cfg.stream))
            with open(path, "rb") as f:
                await bucket.put(OBJECT, f, meta=ObjectMeta(name=OBJECT, description=json.dumps(
                    {"seq": 7, "stream": cfg.stream, "format": 1, "shared_at": time.time()})))
        finally:
            await nc.close()

    asyncio.run(put_v1())
    assert asyncio.run(_info(cfg))["seq"] == 7
    assert _fetched(cfg, tmp_path, "new") == store._data


@pytest.fixture(autouse=True)
def _drop_bucket(stream_cfg):  # noqa: F811
    yield

    async def drop():
        nc = await nats.connect(stream_cfg.url)
        try:
            await nc.jetstream().delete_object_store(bucket_name(stream_cfg.stream))
        except Exception:  # noqa: BLE001 - a test may not have made it
            pass
        await nc.close()

    asyncio.run(drop())
