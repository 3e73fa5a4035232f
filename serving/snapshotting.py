"""The feature state's snapshots while a server runs (`serving.server`): the in-process store's
file, written every `--snapshot-interval-s`, in full after an erasure, and, with JetStream, shared
with the fleet when the shared one is old (`serving.ingest.snapshots`). Redis keeps its own state:
then there is no file, and the committed state is what the event log may be compacted up to.

    snapshots = FeatureSnapshots(path, cfg.events)      # path: None for Redis
    snapshots.bind(ingest, stream)                     # the ingest whose commits a snapshot holds
    await snapshots.share(first=True)                  # JetStream, at start-up: a new fleet's first
    task = asyncio.create_task(snapshots.run(30.0))    # the periodic snapshot (and share)
    await snapshots.persist(full=True)                 # an erasure's: nothing on disk from before it

A snapshot is taken under the ingest's apply lock (it never holds half a batch, nor a batch without
its seq) and written after the lock is released: a delta's handed-over values encoded on the loop
in the fold's slices and within its share of the loop, then the file on a thread.
"""

from __future__ import annotations

import asyncio
import logging
import random
from pathlib import Path

from featurizer.store import snapshot_files
from featurizer.store.snapshot_write import SnapshotWrite
from serving.config import JetStreamConfig
from serving.ingest.snapshots import due, share_snapshot, shared_info

log = logging.getLogger(__name__)


class FeatureSnapshots:
    def __init__(self, path: Path | None, events: JetStreamConfig | None):
        self.path = path  # the in-process store's snapshot file (None: Redis, or no state on disk)
        self.events = events
        self.persisted_seq = 0  # the last event seq the snapshot on disk holds (what retention may delete)
        self.ingest = None  # serving.ingest.apply.EventIngest, or the StreamIngest below
        self.stream = None  # serving.ingest.jetstream.StreamIngest, with JetStream
        self.erasure = None  # serving.ingest.live_erasure.LiveErasure: a state it has not finished is never shared

    def bind(self, ingest, stream=None) -> None:
        self.ingest, self.stream = ingest, stream

    async def run(self, every_s: float) -> None:
        """Persist and share every `every_s`. The first one after the interval plus a random part of
        it: the workers of one host (started together) then write and share theirs at different
        moments, not both at once on the same cores."""
        wait = every_s * random.uniform(1.0, 1.5)
        while True:
            await asyncio.sleep(wait)
            wait = every_s
            try:
                await self.persist()
                await self.share()
            except Exception:  # noqa: BLE001 - the event log (or stream) still holds everything
                log.exception("feature snapshot failed")

    async def persist(self, full: bool = False) -> None:
        """Snapshot the in-process store (nothing for Redis or memory only). Packing and fsyncing it
        (hundreds of ms for a large state) happen after the lock: a LogEvents, and a Rank waiting
        for its token, never wait for the disk. `full`: the whole state over the snapshot and its
        delta (an erasure: no file may hold the state from before it)."""
        async with self.ingest.applied_lock:
            write = await asyncio.to_thread(self.ingest.online.store.freeze, full)
            seq = self.ingest.committed_seq
        await self._write(write)  # (None: nothing changed since the last one, which holds seq)
        self.persisted_seq = seq

    def covered_seq(self) -> int:
        """The last event-log seq a persisted feature state holds: Redis's committed state, or the
        in-process store's last snapshot on disk (retention deletes no event after it)."""
        return self.ingest.committed_seq if self.ingest.online.store.remote else self.persisted_seq

    def _shares(self) -> bool:
        return self.stream is not None and self.path is not None and self.events.share_snapshot_s > 0

    async def share_now(self) -> None:
        """Share the snapshot just persisted (an erasure: the shared one holds the erased users)."""
        if self._shares() and self.path.exists():
            await share_snapshot(self.stream.js, self.events, self.path, self.persisted_seq)

    async def share(self, first: bool = False) -> None:
        """With JetStream and in-process features: share the snapshot when the shared one is old, so
        that a fresh replica folds only what follows it. What is shared is the store's files as
        written: its delta (a few MB), and its full snapshot only when the bucket holds another one,
        never a fresh copy of the whole state. `first` (at start-up, before serving): only when the
        bucket holds no snapshot at all and the state holds some of the stream, whatever the age,
        so that the full upload a new fleet needs happens before any Rank can wait for it; a state
        built at start-up, with no file yet, is written first."""
        stream = self.stream
        if not self._shares() or not stream.connected:
            return
        if self.erasure is not None and self.erasure.pending:
            return  # this state holds users the fleet erased: never shared
        if not first and not self.path.exists():
            return  # (`run` persists before it shares)
        shared = await shared_info(stream.js, self.events)
        if first:
            if shared is not None or stream.committed_seq == 0:
                return  # (a state of the data directory alone: every replica builds the same, as `due` has it)
        elif not due(shared, stream.committed_seq, self.events.share_snapshot_s,
                     (await asyncio.to_thread(snapshot_files.ids, self.path))[0]):
            return
        # The files as `persist` leaves them (the stream is this ingest): only `run` (which calls
        # this) and close write them, one at a time.
        await self.persist()
        await share_snapshot(stream.js, self.events, self.path, self.persisted_seq)

    async def _write(self, write) -> None:
        """Write what the store's `freeze` took: a delta's values encoded on the loop first, in the
        fold's slices and within its share of the loop (`SnapshotWrite.encode_slices`), then the file
        on a thread."""
        if write is None:
            return
        if isinstance(write, SnapshotWrite):  # the in-process store's
            slices = self.ingest.slices
            await write.encode_slices(slices.budget_s, slices.pace)
        await asyncio.to_thread(write)
