"""The in-process feature snapshot, shared between replicas through JetStream's object store.

    seq = await fetch_snapshot(cfg, state_dir / "online-store.bin")   # a fresh replica, before it loads its store
    await share_snapshot(js, cfg, path, seq)                            # a running replica, after a local snapshot

With `--events jetstream` each replica folds the whole stream. A replica that starts with no
snapshot of its own would fold it from the first message (about 6,400 events/s here:
docs/scaling.md). Instead it downloads the newest snapshot any replica shared, and folds only what
follows its sequence (which the state itself holds: its meta row).

- Bucket `<stream>_SNAPSHOTS` (file storage, the stream's replica count), two objects: the store's
  full snapshot `online-store` and its delta `online-store.delta` (featurizer.store.in_process),
  each described in JSON: `{"seq", "stream", "format": 2, "shared_at"}` plus the full snapshot's
  `base_id`, or the delta's `delta_of`. A delta of another full snapshot is ignored (by the store,
  at load). Format 1 (one full object) is still read. The object store checks the SHA-256 digest
  of what it returns.
- A replica shares the files its store wrote (opened together right after the write, under no
  lock; the state and `seq` are taken together under the apply lock) when the shared snapshot is
  older than `JetStreamConfig.share_snapshot_s` and behind its own `seq` (`due`): the delta, a few
  MB, and the full snapshot only when the bucket holds another one. It never makes a fresh full
  copy of the state to share it: that was a fork and a 78 MB write and upload on the bench's state,
  two seconds of slower Ranks every interval (docs/scaling.md).
- The download goes to temporary files beside the targets, fsynced and renamed into place; a
  snapshot the replica cannot use (other feature definitions) is deleted by the server, which then
  starts from the data directory (serving.server).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import BinaryIO

import nats
import nats.js.errors
from nats.js.api import ObjectMeta, ObjectStoreConfig, StorageType

from featurizer.store import snapshot_files as files
from serving.config import JetStreamConfig
from serving.ingest.control import connect_once

log = logging.getLogger(__name__)

OBJECT = "online-store"  # the full snapshot
DELTA = "online-store.delta"  # the keys changed since it (featurizer.store.in_process's delta file)
FORMAT = 2  # 1: a full snapshot alone (still read)
FETCH_TIMEOUT_S = 120.0  # per object downloaded at start-up


def bucket_name(stream: str) -> str:
    return f"{stream}_SNAPSHOTS"


async def _bucket(js, cfg: JetStreamConfig, create: bool):
    try:
        return await js.object_store(bucket_name(cfg.stream))
    except nats.js.errors.BucketNotFoundError:
        if not create:
            return None
        return await js.create_object_store(bucket_name(cfg.stream), ObjectStoreConfig(
            description="semrank feature snapshots (docs/scaling.md)", storage=StorageType.FILE,
            replicas=cfg.replicas))


async def _description(bucket, name: str) -> dict | None:
    try:
        info = await bucket.get_info(name)
    except nats.js.errors.ObjectNotFoundError:
        return None
    try:
        meta = json.loads(info.description or "")
    except ValueError:
        return None
    return meta if isinstance(meta, dict) and meta.get("format") in (1, FORMAT) else None


async def _shared(bucket) -> tuple[dict | None, dict | None]:
    """The full snapshot's description, and the delta's when it applies to that full snapshot."""
    full = await _description(bucket, OBJECT)
    if full is None or full.get("base_id") is None:
        return full, None
    delta = await _description(bucket, DELTA)
    return full, delta if delta is not None and delta.get("delta_of") == full["base_id"] else None


async def shared_info(js, cfg: JetStreamConfig) -> dict | None:
    """What a fresh replica would download: {"seq", "shared_at", "base_id", "full_shared_at", ...}
    (seq: the stream seq its state holds, 0 when only an older full snapshot's is known; shared_at:
    of the newest object, the full snapshot or its delta), or None."""
    bucket = await _bucket(js, cfg, create=False)
    if bucket is None:
        return None
    full, delta = await _shared(bucket)
    if full is None:
        return None
    newest = delta or full
    return {"seq": int(newest.get("seq") or 0), "shared_at": float(newest.get("shared_at", 0)),
            "base_id": full.get("base_id"), "full_shared_at": float(full.get("shared_at", 0)),
            "stream": full.get("stream"), "format": newest["format"]}


async def fetch_snapshot(cfg: JetStreamConfig, path: Path) -> int | None:
    """Download the newest shared snapshot to `path` (which must not exist); returns its seq, or
    None when there is none (or NATS cannot be reached: the replica then folds from the start)."""
    nc = await connect_once(cfg, "no shared snapshot")
    if nc is None:
        return None
    try:
        js = nc.jetstream(timeout=30.0)
        meta = await shared_info(js, cfg)
        if meta is None:
            log.info("no shared snapshot for stream %s: folding it from the start", cfg.stream)
            return None
        bucket = await _bucket(js, cfg, create=False)
        t0 = time.monotonic()
        # The delta first (its own name, ignored at load unless it applies to the full snapshot
        # downloaded after it), then the full one: the store file appears last, complete. A read of
        # an object another replica replaces meanwhile can wait for chunks that are gone (nats-py):
        # bounded, and then the replica folds from the start.
        delta = files.delta_path(path)
        try:
            if meta["format"] == FORMAT and await _description(bucket, DELTA) is not None:
                await asyncio.wait_for(_download(bucket, DELTA, delta), FETCH_TIMEOUT_S)
            await asyncio.wait_for(_download(bucket, OBJECT, path), FETCH_TIMEOUT_S)
        except asyncio.TimeoutError:
            delta.unlink(missing_ok=True)
            path.unlink(missing_ok=True)
            log.warning("the shared snapshot of stream %s did not download within %.0f s (replaced meanwhile?): "
                        "folding the stream from the start", cfg.stream, FETCH_TIMEOUT_S)
            return None
        got = path.stat().st_size + (delta.stat().st_size if delta.exists() else 0)
        log.info("downloaded the shared snapshot of stream %s (seq %d, %.1f MB) in %.1f s", cfg.stream, meta["seq"],
                 got / 1e6, time.monotonic() - t0)
        return int(meta["seq"])
    finally:
        await nc.close()


FULL_SHARE_EVERY = 6  # a replica replaces another's full snapshot after this many share intervals


def due(meta: dict | None, seq: int, every_s: float, base_id: str | None = None) -> bool:
    """Whether a replica holding `seq`, on the full snapshot `base_id`, should share its snapshot,
    given the shared one's `meta` (`shared_info`). When the shared one is behind `seq` and older than
    `every_s`: at once when it is on the same full snapshot (only the delta is sent, a few MB), else
    once the shared full snapshot is FULL_SHARE_EVERY intervals old. Replicas each write their own
    full snapshots; without the wait they would replace each other's, the whole state every interval."""
    if meta is None:
        return seq > 0
    now = time.time()
    if int(meta["seq"]) >= seq or now - float(meta.get("shared_at", 0)) < every_s:
        return False
    if base_id is not None and meta.get("base_id") == base_id:
        return True
    return now - float(meta.get("full_shared_at", meta.get("shared_at", 0))) >= FULL_SHARE_EVERY * every_s


async def _download(bucket, name: str, path: Path) -> None:
    """Object `name` into `path`, through a temporary file beside it, fsynced and renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".download")
    try:
        with os.fdopen(fd, "wb") as f:
            await bucket.get(name, writeinto=f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _open_snapshot(path: Path) -> tuple[BinaryIO, BinaryIO | None]:
    """The store's full snapshot file and its delta (None: none, or one of another snapshot), opened
    together, so that later snapshots replacing the files do not change what is shared."""
    full = open(path, "rb")  # noqa: SIM115 - share_snapshot closes both
    try:
        delta = open(files.delta_path(path), "rb")  # noqa: SIM115
    except FileNotFoundError:
        return full, None
    if files.ids(delta)[1] != files.ids(full)[0]:
        delta.close()
        return full, None
    return full, delta


async def share_snapshot(js, cfg: JetStreamConfig, path: Path, seq: int) -> int:
    """Share the store's snapshot at `path` (the full file and its delta), which holds stream seq
    `seq`: called right after the store wrote them, and opened here before anything is awaited, so
    a later snapshot replacing the files changes nothing that is sent. The full file only when the
    bucket holds another one (a new full snapshot is rare: the store writes deltas while few keys
    change), then the delta. Returns the bytes sent."""
    full, delta = _open_snapshot(path)
    try:
        return await _upload(js, cfg, full, delta, seq)
    finally:
        full.close()
        if delta is not None:
            delta.close()


async def _upload(js, cfg: JetStreamConfig, full: BinaryIO, delta: BinaryIO | None, seq: int) -> int:
    bucket = await _bucket(js, cfg, create=True)
    base_id = files.ids(full)[0]
    shared_full, _ = await _shared(bucket)
    now = time.time()
    t0 = time.monotonic()
    sent = 0
    if base_id is None or shared_full is None or shared_full.get("base_id") != base_id:
        # Its own seq is `seq` only without a delta; with one it is older and not known here (0).
        description = {"seq": seq if delta is None else 0, "base_id": base_id, "stream": cfg.stream,
                       "format": FORMAT, "shared_at": now}
        info = await bucket.put(OBJECT, full, meta=ObjectMeta(name=OBJECT, description=json.dumps(description)))
        sent += int(info.size or 0)
    if delta is not None:
        description = {"seq": seq, "delta_of": base_id, "stream": cfg.stream, "format": FORMAT, "shared_at": now}
        info = await bucket.put(DELTA, delta, meta=ObjectMeta(name=DELTA, description=json.dumps(description)))
        sent += int(info.size or 0)
    log.info("shared the feature snapshot (stream seq %d, %.1f MB%s) in %.1f s", seq, sent / 1e6,
             "" if delta is None else ", a delta", time.monotonic() - t0)
    return sent
