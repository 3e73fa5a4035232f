"""The in-process feature snapshot, shared between replicas through JetStream's object store.

    seq = await fetch_snapshot(cfg, state_dir / "online-store.bin")   # a fresh replica, before it loads its store
    await share_snapshot(js, cfg, path, seq)                            # a running replica, after a local snapshot

With `--events jetstream` each replica folds the whole stream. A replica that starts with no
snapshot of its own would fold it from the first message (about 6,400 events/s here:
docs/scaling.md). Instead it downloads the newest snapshot any replica shared, and folds only what
follows its sequence.

- Bucket `<stream>_SNAPSHOTS` (file storage, the stream's replica count), one object,
  `online-store`, whose description is JSON: `{"seq": N, "stream": NAME, "format": 1}`; the object
  store checks the SHA-256 digest of what it returns.
- A replica shares its local snapshot (`InProcessStore`'s file, written and opened under the
  apply lock, so it holds exactly the events up to `seq`) when the shared one is older than
  `JetStreamConfig.share_snapshot_s` and behind its own `seq` (`due`): with N replicas about one
  upload per interval, not N.
- The download goes to a temporary file beside the target, fsynced and renamed into place; a
  snapshot the replica cannot use (other feature definitions) is deleted by the server, which then
  starts from the data directory (serving.server).
"""

from __future__ import annotations

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

from serving.config import JetStreamConfig

log = logging.getLogger(__name__)

OBJECT = "online-store"
FORMAT = 1


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


async def shared_info(js, cfg: JetStreamConfig) -> dict | None:
    """The shared snapshot's description ({"seq", "stream", "format", "shared_at"}), or None."""
    bucket = await _bucket(js, cfg, create=False)
    if bucket is None:
        return None
    try:
        info = await bucket.get_info(OBJECT)
    except nats.js.errors.ObjectNotFoundError:
        return None
    try:
        meta = json.loads(info.description or "")
    except ValueError:
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


async def fetch_snapshot(cfg: JetStreamConfig, path: Path) -> int | None:
    """Download the newest shared snapshot to `path` (which must not exist); returns its seq, or
    None when there is none (or NATS cannot be reached: the replica then folds from the start)."""
    try:
        nc = await nats.connect(servers=[u.strip() for u in cfg.url.split(",") if u.strip()],
                                connect_timeout=cfg.connect_timeout_s, max_reconnect_attempts=0)
    except Exception as e:  # noqa: BLE001 - the stream's own connection reports NATS problems clearly
        log.warning("no shared snapshot: cannot reach NATS (%s)", type(e).__name__)
        return None
    try:
        js = nc.jetstream(timeout=30.0)
        meta = await shared_info(js, cfg)
        if meta is None:
            log.info("no shared snapshot for stream %s: folding it from the start", cfg.stream)
            return None
        bucket = await _bucket(js, cfg, create=False)
        t0 = time.monotonic()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".download")
        try:
            with os.fdopen(fd, "wb") as f:
                await bucket.get(OBJECT, writeinto=f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        log.info("downloaded the shared snapshot of stream %s (seq %d, %.1f MB) in %.1f s", cfg.stream, meta["seq"],
                 path.stat().st_size / 1e6, time.monotonic() - t0)
        return int(meta["seq"])
    finally:
        await nc.close()


def due(meta: dict | None, seq: int, every_s: float) -> bool:
    """Whether a replica holding `seq` should share its snapshot, given the shared one's `meta`."""
    if meta is None:
        return seq > 0
    return int(meta["seq"]) < seq and time.time() - float(meta.get("shared_at", 0)) >= every_s


async def share_snapshot(js, cfg: JetStreamConfig, snapshot: BinaryIO, seq: int) -> int:
    """Upload `snapshot` (the local snapshot file, opened right after it was written: it holds
    stream seq `seq`, whatever later snapshots replace the file with); returns the bytes sent."""
    bucket = await _bucket(js, cfg, create=True)
    description = json.dumps({"seq": seq, "stream": cfg.stream, "format": FORMAT, "shared_at": time.time()})
    t0 = time.monotonic()
    info = await bucket.put(OBJECT, snapshot, meta=ObjectMeta(name=OBJECT, description=description))
    log.info("shared the feature snapshot (stream seq %d, %.1f MB) in %.1f s", seq, (info.size or 0) / 1e6,
             time.monotonic() - t0)
    return int(info.size or 0)
