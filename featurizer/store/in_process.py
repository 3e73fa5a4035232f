"""The embedded online store: dicts in memory, optionally persisted to one file.

With a path it loads the file on start and persists atomically at `flush()` / `close()`, or after
every write with `autoflush=True` (the files: featurizer.store.snapshot_files). A snapshot is taken
under the same lock as writes, so it never holds part of a `write_batch`.

Two kinds of snapshot (`freeze`):
- **full**: the whole state, written by a forked child (copy-on-write pages), which packs and
  writes it, so this process does not spend the GIL on packing while it serves
  (`InProcessConfig.fork_snapshots`); it carries a fresh id (`base_id`) and drops the delta;
- **delta**: only the keys written or deleted since the last full one (`<path>.delta`, naming the
  id of the full snapshot it applies to, replaced by each newer delta). It is taken while those
  keys are at most `InProcessConfig.delta_max_fraction` of the state: kilobytes every 30 s while
  shoppers act, where a full snapshot of the bench's state is about 100 MB. Its handed-over values
  (`Owned`, JSON of co-occurrence counts: 100-200 ms of the GIL under a write flood) are encoded in
  this process, once, for the file and for the store: a slice at a time on the caller's event loop
  (`SnapshotWrite.encode_slices`), or on the writing thread. (A forked child wrote deltas before:
  the fork and the reading back of its encodings held the GIL for longer than the encoding.)
Loading reads the full snapshot, then the delta when it names that snapshot (a delta of another,
left by a crash between the two renames, is older than the snapshot and ignored).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from itertools import islice
from pathlib import Path

from featurizer.store import snapshot_files as files
from featurizer.store.base import (
    Expect,
    OnlineStore,
    OnlineStoreError,
    Owned,
    Value,
    WriteConflict,
    check_name,
    decode_value,
    encode_value,
)
from featurizer.store.config import InProcessConfig, StoreConfigError
from featurizer.store.snapshot_write import GRPC_FORK_ENV, SnapshotWrite, fork_is_safe

log = logging.getLogger(__name__)

def _fresh(value: bytes | Owned) -> Value:
    """What a read returns for a held value: decoded, never an object the store holds."""
    return decode_value(value if type(value) is bytes else encode_value(value))


class InProcessStore(OnlineStore):
    """Dicts in memory, optionally persisted to `path`. Values are held encoded (so reads never alias
    writes), except, with a path, `Owned` ones, which the writer handed over: those are held as they
    are until the next snapshot is written, which encodes them (`_settle`), so a key rewritten by
    every event of a flood is encoded once per snapshot instead of once per write."""

    def __init__(self, config: InProcessConfig = InProcessConfig()):
        if not isinstance(config, InProcessConfig):
            raise StoreConfigError(f"InProcessStore needs an InProcessConfig, got {type(config).__name__}")
        self.config = config
        self._path = Path(config.path) if config.path else None
        self._data: dict[str, dict[str, bytes | Owned]] = {}
        # (entity, key) of each value written as Owned since the last settle, oldest first
        self._owned: dict[tuple[str, str], None] = {}
        self._lock = threading.RLock()
        self._flush_lock = threading.Lock()  # one flush at a time (taken before _lock, never inside it)
        # Per entity: a write counter and, once a reader asked for `changes`, the keys of the
        # latest writes (None for a write too large to list: readers then drop everything).
        self._versions: dict[str, int] = {}
        self._written: dict[str, deque[tuple[int, frozenset[str] | None]]] = {}
        self._written_keys: dict[str, int] = {}  # keys listed in _written[entity], all writes together
        self._dirty = False
        self._closed = False
        self._frozen = 0  # copies taken by `freeze`
        self._saved = 0  # the newest of them on disk
        # Delta snapshots: the id of the newest full snapshot taken (on disk once its write is done),
        # and the keys written or deleted since it, per entity (None: unknown or too many, so the
        # next snapshot is a full one).
        self._base_id: str | None = None
        # (dicts of None, not sets: a set stays tracked by the collector, which walks its 10^4-10^5 keys)
        self._changed: dict[str, dict[str, None]] | None = None
        self._n_changed = 0
        self._delta_on_disk = False
        self._disk_base_id: str | None = None  # the full snapshot on disk
        self._fork_refused = False  # fork_snapshots asked for, fork_is_safe said no (warned once)
        if self._path is not None and self._path.exists():
            self._data, self._base_id = files.load(self._path)
            self._disk_base_id = self._base_id
            delta = files.load_delta(files.delta_path(self._path), self._base_id)
            if delta is not None:
                self._changed = {}
                for entity, (upserts, deleted) in delta.items():
                    table = self._data.setdefault(entity, {})
                    table.update(upserts)
                    for k in deleted:
                        table.pop(k, None)
                    self._changed[entity] = dict.fromkeys([*upserts, *deleted])
                self._n_changed = sum(len(keys) for keys in self._changed.values())
                self._delta_on_disk = True
            elif self._base_id is not None:
                self._changed = {}

    @classmethod
    def detached(cls, path: str | Path) -> InProcessStore:
        """A memory-only store holding the state of the snapshot at `path` (and its delta): a state
        built beside a live one, to catch up and then hand over with `adopt`."""
        store = cls(InProcessConfig(path=str(path), autoflush=False))
        store._path = None  # never written back: every later write is encoded as it comes
        store._changed, store._base_id, store._disk_base_id = None, None, None  # (a load holds no Owned value)
        return store

    def adopt(self, other: InProcessStore) -> None:
        """Take `other`'s whole state in place of this one's, atomically for readers (a read sees
        the old state or the new one), with its record of changes: readers built over `other`
        (`OnlineFeatures.rebind`) go on reading this store with their caches as they are, and
        readers of this store from before must not be used again. `other` (a detached store) is
        closed. The next snapshot is a full one that drops the delta: the state this one held
        leaves the disk with it (an erasure's rebuild, serving.ingest.live_erasure)."""
        if other._path is not None:
            raise OnlineStoreError("adopt takes a detached store (InProcessStore.detached)")
        with other._lock:
            taken = other._data, other._versions, other._written, other._written_keys
            other._data, other._closed = {}, True
        with self._lock:
            if self._closed:
                raise OnlineStoreError("the in-process store is closed")
            self._data, self._versions, self._written, self._written_keys = taken
            self._owned = {}
            self._changed, self._n_changed = None, 0
            self._dirty = True

    def _table(self, entity: str) -> dict[str, bytes]:
        if self._closed:
            raise OnlineStoreError("the in-process store is closed")
        check_name("entity", entity)
        return self._data.setdefault(entity, {})

    def write_batch(self, rows: Mapping[str, Mapping[str, Value]], expect: Expect | None = None) -> None:
        # Owned values are held until a snapshot settles them: only with a file, and at most max_owned
        keep = self._path is not None and self.config.max_owned > 0
        encoded = {entity: {str(k): v if keep and type(v) is Owned else encode_value(v) for k, v in part.items()}
                   for entity, part in rows.items() if part}
        if not encoded:
            return
        owned = {entity: [k for k, v in part.items() if type(v) is Owned] for entity, part in encoded.items()} if keep else {}
        with self._lock:  # one critical section: a read or a snapshot sees every entity's rows or none
            if expect is not None:
                entity, key, value = expect
                held = self._table(entity).get(key)
                if (None if held is None else _fresh(held)) != value:
                    raise WriteConflict(f"online store write refused: {entity} {key!r} no longer holds the expected value")
            tables = {entity: self._table(entity) for entity in encoded}
            for entity, part in encoded.items():
                tables[entity].update(part)
                self._bump(entity, part.keys())
                for k in owned.get(entity, ()):  # to the end: the newest
                    self._owned.pop((entity, k), None)
                    self._owned[(entity, k)] = None
            self._dirty = True
            over = len(self._owned) - self.config.max_owned
        if over > 0:
            self._settle({}, oldest=over)
        self._autoflush()

    def read(self, entity: str, keys: Sequence[str]) -> list[Value | None]:
        with self._lock:
            table = self._table(entity)
            blobs = [table.get(k) for k in keys]
        return [None if b is None else decode_value(b) if type(b) is bytes else _fresh(b) for b in blobs]

    def keys(self, entity: str) -> list[str]:
        with self._lock:
            return list(self._table(entity))

    def delete(self, entity: str, keys: Iterable[str]) -> None:
        with self._lock:
            table = self._table(entity)
            keys = list(keys)
            for k in keys:
                table.pop(k, None)
            self._bump(entity, keys)
            self._dirty = True
        self._autoflush()

    # How far back `changes` can list keys, per entity: the latest writes, up to these many writes
    # and keys. A reader further behind sees "everything may have changed" (and rebuilds what it
    # keeps), as it does after a single write of more than _CHANGE_KEYS keys.
    _CHANGE_LOG = 4096
    _CHANGE_LOG_KEYS = 500_000
    _CHANGE_KEYS = 100_000

    def _bump(self, entity: str, keys) -> None:
        if self._changed is not None:
            changed = self._changed.setdefault(entity, {})
            before = len(changed)
            changed.update(dict.fromkeys(keys))
            self._n_changed += len(changed) - before
            if self._n_changed > self._delta_limit():  # the next snapshot is a full one: stop listing
                self._changed, self._n_changed = None, 0
        version = self._versions.get(entity, 0) + 1
        self._versions[entity] = version
        log = self._written.get(entity)
        if log is None:
            return
        listed = frozenset(keys) if len(keys) <= self._CHANGE_KEYS else None
        log.append((version, listed))
        total = self._written_keys[entity] + (len(listed) if listed is not None else 0)
        while len(log) > self._CHANGE_LOG or total > self._CHANGE_LOG_KEYS:
            _, dropped = log.popleft()
            total -= len(dropped) if dropped is not None else 0
        self._written_keys[entity] = total

    def changes(self, entity: str, since: int | None) -> tuple[int | None, frozenset[str] | None]:
        with self._lock:
            version = self._versions.get(entity, 0)
            log = self._written.get(entity)
            if log is None:  # first question about this entity: start listing its writes
                log = self._written[entity] = deque()
                self._written_keys[entity] = 0
            if since == version:
                return version, frozenset()
            if since is None or since > version or not log or log[0][0] > since + 1:
                return version, None
            keys: set[str] = set()
            for v, written in reversed(log):
                if v <= since:
                    break
                if written is None:
                    return version, None
                keys |= written
            return version, frozenset(keys)

    def _autoflush(self) -> None:
        """With autoflush, persist before the write returns (after the store's lock is released:
        flush takes its own lock first)."""
        if self.config.autoflush:
            self.flush()

    def flush(self) -> None:
        """Persist atomically (`freeze` and its write at once)."""
        write = self.freeze()
        if write is not None:
            write()

    def _delta_limit(self) -> float:
        """Changed keys past which the next snapshot is a full one (none: no path, or deltas off)."""
        if self._path is None or self.config.delta_max_fraction <= 0:
            return -1
        return self.config.delta_max_fraction * sum(len(t) for t in self._data.values())

    def _delta_copy(self, base_on_disk: bool) -> dict[str, dict[str, bytes | None]] | None:
        """Under the lock: the current value of every key changed since the last full snapshot (None:
        deleted), when a delta is due (the changes are known and within `_delta_limit`; with
        `base_on_disk`, that full snapshot's write has landed too); else None: a full one is due."""
        if self._changed is None or self._base_id is None or self._n_changed > self._delta_limit():
            return None
        if base_on_disk and self._base_id != self._disk_base_id:
            return None
        return {entity: {k: self._data.get(entity, {}).get(k) for k in keys}
                for entity, keys in self._changed.items() if keys}

    def freeze(self, full: bool = False) -> SnapshotWrite | None:
        """Take what to persist now and return the `SnapshotWrite` that writes it (the slow part), to
        call later, outside the caller's locks; None when nothing changed. So a caller that must
        snapshot a consistent state (the server, under its apply lock) holds its lock only for the
        taking, and writes never wait for the disk (bench/snapshot_stall.py). Writes run one at a
        time; one whose state is older than the state on disk writes nothing.

        Taking it: a delta (the keys changed since the last full snapshot; a copy of them, under the
        lock) while there are few enough of them and `full` is False; else the whole state. `full`
        also folds a delta on disk into a full snapshot when nothing changed since (a caller that
        needs the state in one file, such as a backup). A delta's handed-over values are encoded in
        this process, once for the file and for the store (`_settle`): by the write, or before it, a
        slice at a time between other work on the caller's event loop (`SnapshotWrite.encode_slices`;
        bench/delta_stall.py). A full snapshot, with `fork_snapshots` (where `fork_is_safe`), is
        written by a forked child, which holds the state in its copy-on-write pages: this process
        pays the fork and never the packing or the encoding of the whole state, which would hold the
        GIL for hundreds of ms; else a copy of the dicts (milliseconds under the lock)."""
        with self._lock:
            if self._path is None or self._closed or not (self._dirty or (full and self._delta_on_disk)):
                return None
            locked = time.monotonic()
            self._frozen += 1
            generation = self._frozen
            self._dirty = False
            delta = None if full else self._delta_copy(base_on_disk=False)
            if delta is not None:
                base_id = self._base_id
            else:
                base_id = uuid.uuid4().hex
                self._base_id, self._changed, self._n_changed = base_id, {}, 0
            child = data = None
            if delta is None and self.config.fork_snapshots and self._may_fork():
                # the child's copy-on-write pages, taken under the lock, are the snapshot
                child = files.fork_save(self._path, f"{os.getpid()}.{self._frozen}", base_id, self._data)
            if delta is None and child is None:
                data = {entity: dict(table) for entity, table in self._data.items()}
            held_ms = (time.monotonic() - locked) * 1000  # what the lock's other users waited (and, forking, all threads)
        snap = SnapshotWrite(delta)

        def write() -> None:
            with self._flush_lock:
                if generation <= self._saved:
                    if child is not None:
                        child.discard()
                    return  # a newer state is on disk already
                t_write = time.monotonic()
                try:
                    if delta is not None:
                        if self._disk_base_id != base_id:  # its full snapshot never landed: write a full one next
                            raise OnlineStoreError(f"{self._path}: the delta's full snapshot is not on disk")
                        sliced = len(snap.encoded)  # what `encode_slices` encoded before the write
                        snap.encode_some(float("inf"))  # what it left, if anything
                        files.save_delta(self._path, delta, base_id)
                    elif child is not None:
                        child.wait()
                    else:
                        files.save_atomic(self._path, data, base_id=base_id)
                except BaseException:
                    with self._lock:  # the next flush writes it again, as a full snapshot
                        self._dirty = True
                        self._changed, self._n_changed = None, 0
                    raise
                self._saved = generation
                if delta is None:
                    self._disk_base_id = base_id
                    files.delta_path(self._path).unlink(missing_ok=True)  # (a stale one is ignored at load anyway)
                self._delta_on_disk = delta is not None
                t_settle = time.monotonic()
                settled = self._settle(snap.encoded)
                settle_ms = (time.monotonic() - t_settle) * 1000
                how = [f"{sum(map(len, delta.values()))} keys changed"] if delta is not None else []
                if child is not None:
                    how.append("by a forked child")
                elif delta is None:
                    how.append("copied in process")
                how.append(f"taken in {held_ms:.1f} ms under the lock")
                if delta is not None:
                    how.append(f"{sliced} value(s) encoded in {snap.slices} slice(s) before the write")
                how.append(f"{settled} handed-over value(s) settled in {settle_ms:.1f} ms")
                log.info("%s: %s snapshot written in %.0f ms (%s)", self._path.name,
                         "full" if delta is None else "delta", (time.monotonic() - t_write) * 1000, ", ".join(how))

        snap.write = write
        return snap

    def _settle(self, known: Mapping[tuple[str, str], tuple[Owned, bytes]], oldest: int | None = None) -> int:
        """Encode the `Owned` values written before now and hold their bytes instead (a dict of a few
        hundred entries takes several times the memory of its JSON), so that only values written
        since the last snapshot are held decoded. `known`: (entity, key) -> (value, its encoding)
        that the snapshot made already (a delta holds every value written since the last settle; after a forked
        full snapshot they are encoded here). The encoding runs outside the lock (after a
        snapshot, on the snapshot's thread); a key written again meanwhile keeps its newer value.
        `oldest`: only that many, the oldest (a store past `max_owned`). Returns how many it settled."""
        with self._lock:
            if oldest is None:
                keys, self._owned = list(self._owned), {}
            else:
                keys = list(islice(self._owned, oldest))
                for key in keys:
                    del self._owned[key]
            taken = [(entity, k, self._data.get(entity, {}).get(k)) for entity, k in keys]
        encoded = []
        for entity, k, v in taken:
            if type(v) is Owned:
                done = known.get((entity, k))
                encoded.append((entity, k, v, done[1] if done is not None and done[0] is v else encode_value(v)))
        with self._lock:
            for entity, k, v, blob in encoded:
                table = self._data.get(entity)
                if table is not None and table.get(k) is v:  # the same value, encoded: not a change
                    table[k] = blob
        return len(encoded)

    def _may_fork(self) -> bool:
        if fork_is_safe():
            return True
        if not self._fork_refused:
            self._fork_refused = True
            log.warning("%s: full snapshots are copied in this process, not written by a forked child: grpc was "
                        "imported with its fork handlers on (set %s=false before importing it)", self._path,
                        GRPC_FORK_ENV)
        return False

    def close(self) -> None:
        """Persist what is not on disk yet (a delta when one is due, else the whole state), then
        refuse every call."""
        with self._flush_lock:
            with self._lock:
                if self._closed:
                    return
                pending = self._path is not None and (self._dirty or self._saved < self._frozen)
                delta = self._delta_copy(base_on_disk=True) if pending else None
                data = None
                if pending and delta is None:
                    data = {entity: dict(table) for entity, table in self._data.items()}
                self._closed = True
                self._frozen += 1
                self._saved = self._frozen  # an older frozen copy never writes over this one
            if delta is not None:
                files.save_delta(self._path, delta, self._base_id)
            elif data is not None:
                files.save_atomic(self._path, data, base_id=uuid.uuid4().hex)
                files.delta_path(self._path).unlink(missing_ok=True)
