"""The embedded online store: dicts in memory, optionally persisted to one file.

With a path it loads the file on start and persists atomically (temp file, fsync, rename, fsync
of the directory) at `flush()` / `close()`, or after every write with `autoflush=True`. The file
is an uncompressed .npz of byte arrays (no pickle); its layout is `_FILE_FORMAT`, unchanged since
semrank's first state directories (tests/fixtures/compat_v1 holds one). A snapshot is taken under
the same lock as writes, so it never holds part of a `write_batch`; `freeze` takes it in a forked
child (copy-on-write pages), which then packs and writes it, so this process does not spend the
GIL on packing while it serves (`InProcessConfig.fork_snapshots`).
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from featurizer.store.base import (
    Expect,
    OnlineStore,
    OnlineStoreError,
    Value,
    WriteConflict,
    check_name,
    decode_value,
    encode_value,
)
from featurizer.store.config import InProcessConfig, StoreConfigError

_FILE_FORMAT = 1


class InProcessStore(OnlineStore):
    """Dicts in memory (encoded values, so reads never alias writes); optionally persisted to `path`."""

    def __init__(self, config: InProcessConfig = InProcessConfig()):
        if not isinstance(config, InProcessConfig):
            raise StoreConfigError(f"InProcessStore needs an InProcessConfig, got {type(config).__name__}")
        self.config = config
        self._path = Path(config.path) if config.path else None
        self._data: dict[str, dict[str, bytes]] = {}
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
        if self._path is not None and self._path.exists():
            self._data = _load(self._path)

    def _table(self, entity: str) -> dict[str, bytes]:
        if self._closed:
            raise OnlineStoreError("the in-process store is closed")
        check_name("entity", entity)
        return self._data.setdefault(entity, {})

    def write_batch(self, rows: Mapping[str, Mapping[str, Value]], expect: Expect | None = None) -> None:
        encoded = {entity: {str(k): encode_value(v) for k, v in part.items()} for entity, part in rows.items() if part}
        if not encoded:
            return
        with self._lock:  # one critical section: a read or a snapshot sees every entity's rows or none
            if expect is not None:
                entity, key, value = expect
                held = self._table(entity).get(key)
                if (None if held is None else decode_value(held)) != value:
                    raise WriteConflict(f"online store write refused: {entity} {key!r} no longer holds the expected value")
            tables = {entity: self._table(entity) for entity in encoded}
            for entity, part in encoded.items():
                tables[entity].update(part)
                self._bump(entity, part.keys())
            self._dirty = True
        self._autoflush()

    def read(self, entity: str, keys: Sequence[str]) -> list[Value | None]:
        with self._lock:
            table = self._table(entity)
            blobs = [table.get(k) for k in keys]
        return [None if b is None else decode_value(b) for b in blobs]

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

    def _copy_if_dirty(self) -> dict[str, dict[str, bytes]] | None:
        """Under the lock: a consistent copy of the data to persist (values are immutable bytes, so
        copying the dicts is enough), or None when there is nothing to write."""
        if self._path is None or not self._dirty or self._closed:
            self._dirty = False
            return None
        self._dirty = False
        return {entity: dict(table) for entity, table in self._data.items()}

    def flush(self) -> None:
        """Persist atomically (`freeze` and its write at once)."""
        write = self.freeze()
        if write is not None:
            write()

    def freeze(self) -> Callable[[], None] | None:
        """Take what to persist now and return the function that writes it (the slow part), to run
        later, outside the caller's locks; None when nothing changed. So a caller that must snapshot
        a consistent state (the server, under its apply lock) holds its lock only for the taking, and
        writes never wait for the disk (bench/snapshot_stall.py). Writes run one at a time; one
        whose state is older than the state on disk writes nothing.

        Taking it: with `fork_snapshots` (where os.fork exists), a forked child holds the state in
        its copy-on-write pages and writes it; the parent pays the fork and never the packing, which
        would otherwise hold the GIL for hundreds of ms and slow every other thread (the event
        loop's requests) while it runs. Else a copy of the dicts (milliseconds under the lock)."""
        with self._lock:
            if self._path is None or not self._dirty or self._closed:
                return None
            self._frozen += 1
            generation = self._frozen
            child = self._fork_writer() if self.config.fork_snapshots and hasattr(os, "fork") else None
            data = None if child is not None else self._copy_if_dirty()
            self._dirty = False

        def write() -> None:
            with self._flush_lock:
                if generation <= self._saved:
                    if child is not None:
                        child.discard()
                    return  # a newer state is on disk already
                try:
                    if child is not None:
                        child.wait()
                    else:
                        _save_atomic(self._path, data)
                except BaseException:
                    with self._lock:
                        self._dirty = True  # the next flush writes it again
                    raise
                self._saved = generation

        return write

    def _fork_writer(self) -> _ForkedWrite | None:
        """Under the lock: a child process that writes the state as it is now (None: fork failed)."""
        tmp = self._path.with_name(f".{self._path.name}.{os.getpid()}.{self._frozen}.tmp")
        try:
            pid = os.fork()
        except OSError:
            return None
        if pid == 0:  # the child: its memory is the snapshot; write it and leave without any cleanup
            code = 1
            try:
                _save_atomic(self._path, self._data, tmp=tmp, replace=False)
                code = 0
            finally:
                os._exit(code)
        return _ForkedWrite(pid, tmp, self._path)

    def close(self) -> None:
        with self._flush_lock:
            with self._lock:
                if self._closed:
                    return
                data = self._copy_if_dirty()
                if data is None and self._saved < self._frozen and self._path is not None:
                    data = {entity: dict(table) for entity, table in self._data.items()}  # a copy not written yet
                self._closed = True
                self._frozen += 1
                self._saved = self._frozen  # an older frozen copy never writes over this one
            if data is not None:
                _save_atomic(self._path, data)


def _pack(blobs: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in blobs], out=offsets[1:])
    return np.frombuffer(b"".join(blobs), dtype=np.uint8), offsets


def _unpack(data: np.ndarray, offsets: np.ndarray) -> list[bytes]:
    raw = data.tobytes()
    o = offsets.tolist()
    return [raw[o[k] : o[k + 1]] for k in range(len(o) - 1)]


class _ForkedWrite:
    """A child process writing a snapshot to `tmp`; `wait` puts it in place once the child is done."""

    def __init__(self, pid: int, tmp: Path, path: Path):
        self.pid, self.tmp, self.path = pid, tmp, path

    def _reap(self) -> int:
        _, status = os.waitpid(self.pid, 0)
        return os.waitstatus_to_exitcode(status)

    def wait(self) -> None:
        code = self._reap()
        if code != 0:
            self.tmp.unlink(missing_ok=True)
            raise OnlineStoreError(f"the snapshot child process failed (exit code {code}); {self.path} is unchanged")
        _replace_and_sync(self.tmp, self.path)

    def discard(self) -> None:
        self._reap()
        self.tmp.unlink(missing_ok=True)


def _save_atomic(path: Path, data: dict[str, dict[str, bytes]], tmp: Path | None = None, replace: bool = True) -> None:
    """Write to a temp file beside `path` (`tmp`, or a fresh name), fsync, and with `replace` rename
    it over `path` and fsync the directory."""
    arrays: dict[str, np.ndarray] = {"format": np.array([_FILE_FORMAT], dtype=np.int64)}
    for k, (entity, table) in enumerate(sorted(data.items())):
        arrays[f"e{k}_name"] = np.frombuffer(entity.encode(), dtype=np.uint8)
        arrays[f"e{k}_keys"], arrays[f"e{k}_key_offsets"] = _pack([key.encode() for key in table])
        arrays[f"e{k}_values"], arrays[f"e{k}_value_offsets"] = _pack(list(table.values()))
    path.parent.mkdir(parents=True, exist_ok=True)
    if tmp is None:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        tmp = Path(name)
    else:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        if replace:
            _replace_and_sync(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _replace_and_sync(tmp: Path, path: Path) -> None:
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _load(path: Path) -> dict[str, dict[str, bytes]]:
    try:
        with np.load(path, allow_pickle=False) as z:
            if int(z["format"][0]) != _FILE_FORMAT:
                raise OnlineStoreError(f"{path}: store file format {int(z['format'][0])}, expected {_FILE_FORMAT}")
            out: dict[str, dict[str, bytes]] = {}
            k = 0
            while f"e{k}_name" in z.files:
                keys = [b.decode() for b in _unpack(z[f"e{k}_keys"], z[f"e{k}_key_offsets"])]
                out[z[f"e{k}_name"].tobytes().decode()] = dict(zip(keys, _unpack(z[f"e{k}_values"], z[f"e{k}_value_offsets"])))
                k += 1
            return out
    except (OSError, ValueError, KeyError) as e:
        raise OnlineStoreError(f"{path}: cannot load the in-process store file ({e}); delete it to start empty") from e
