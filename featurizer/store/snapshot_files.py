"""The in-process store's files: a full snapshot and its delta (featurizer.store.in_process).

Both are uncompressed .npz files of byte arrays (no pickle), written atomically: a temp file beside
the target, fsync, rename, fsync of the directory. The layout is `FILE_FORMAT`, unchanged since
semrank's first state directories (tests/fixtures/compat_v1 holds one); per entity k: `e{k}_name`,
the keys and the values packed with their offsets. A full snapshot adds `base_id`; a delta
(`delta_path`) adds `delta_of` (the full snapshot it applies to) and per entity the deleted keys.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import time
from pathlib import Path

import numpy as np

from featurizer.store.base import OnlineStoreError, encode_value

log = logging.getLogger(__name__)

CHILD_TIMEOUT_S = 60.0  # a snapshot child's most time: a full snapshot of a large store writes in seconds

FILE_FORMAT = 1


def pack(blobs: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in blobs], out=offsets[1:])
    return np.frombuffer(b"".join(blobs), dtype=np.uint8), offsets


# Loads build their lists and dicts this many entries at a time: each C call (`tolist`, a dict
# update) holds the GIL, and one over a whole table (870k user x item states) kept another thread
# waiting 148 ms; a server loading a snapshot beside serving (an erasure's swap) then stalled Ranks.
LOAD_CHUNK = 32_768


def unpack(data: np.ndarray, offsets: np.ndarray) -> list[bytes]:
    raw = data.tobytes()
    out: list[bytes] = []
    for start in range(0, len(offsets) - 1, LOAD_CHUNK):
        o = offsets[start : start + LOAD_CHUNK + 1].tolist()
        out.extend([raw[o[k] : o[k + 1]] for k in range(len(o) - 1)])
    return out


def _table(keys: list[str], values: list[bytes]) -> dict[str, bytes]:
    table: dict[str, bytes] = {}
    for start in range(0, len(keys), LOAD_CHUNK):
        table.update(zip(keys[start : start + LOAD_CHUNK], values[start : start + LOAD_CHUNK]))
    return table


class ForkedWrite:
    """A child process writing a snapshot to `tmp`; `wait` puts it in place once the child is done."""

    def __init__(self, pid: int, tmp: Path, path: Path):
        self.pid, self.tmp, self.path = pid, tmp, path

    def _reap(self, timeout_s: float | None = None) -> int:
        """The child's exit code. A child still running after `timeout_s` (CHILD_TIMEOUT_S) is killed:
        one forked from a multi-threaded process can deadlock on a lock another thread held at the
        fork, and an unbounded wait then froze the server's stop (it reports -9; the store writes
        the snapshot again, in full, at the next flush)."""
        deadline = time.monotonic() + (CHILD_TIMEOUT_S if timeout_s is None else timeout_s)
        while True:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            if time.monotonic() > deadline:
                log.error("snapshot child %d still running after its time: killing it", self.pid)
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                _, status = os.waitpid(self.pid, 0)
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.005)

    def wait(self) -> None:
        code = self._reap()
        if code != 0:
            self.tmp.unlink(missing_ok=True)
            raise OnlineStoreError(f"the snapshot child process failed (exit code {code}); {self.path} is unchanged")
        replace_and_sync(self.tmp, self.path)

    def discard(self) -> None:
        self._reap()
        self.tmp.unlink(missing_ok=True)


def fork_save(path: Path, tag: str, base_id: str, data: dict) -> ForkedWrite | None:
    """A child process that writes `data` as the full snapshot `base_id` of the store at `path`
    (`save_atomic`: the child packs and encodes) to a temp file named with `tag` that
    `ForkedWrite.wait` puts in place; None when the fork fails. The child's memory is the snapshot:
    the caller forks under the lock that keeps it consistent."""
    tmp = path.with_name(f".{path.name}.{tag}.tmp")
    try:
        pid = os.fork()
    except OSError:
        return None
    if pid == 0:  # the child: write and leave without any cleanup
        code = 1
        try:
            save_atomic(path, data, tmp=tmp, replace=False, base_id=base_id)
            code = 0
        finally:
            os._exit(code)
    return ForkedWrite(pid, tmp, path)


def delta_path(path: Path) -> Path:
    """Where the store at `path` keeps its delta snapshot (a copy of the state is both files)."""
    return path.with_name(path.name + ".delta")


def save_delta(path: Path, delta: dict[str, dict[str, bytes | dict | None]], base_id: str) -> None:
    """The keys changed since the full snapshot `base_id` (None: deleted), atomically as `<path>.delta`."""
    upserts = {entity: {k: v for k, v in part.items() if v is not None} for entity, part in delta.items()}
    deleted = {entity: [k for k, v in part.items() if v is None] for entity, part in delta.items()}
    save_atomic(delta_path(path), upserts, delta_of=base_id, deleted=deleted)


def save_atomic(path: Path, data: dict[str, dict[str, bytes | dict]], tmp: Path | None = None, replace: bool = True, *,
                 base_id: str | None = None, delta_of: str | None = None,
                 deleted: dict[str, list[str]] | None = None) -> None:
    """Write to a temp file beside `path` (`tmp`, or a fresh name), fsync, and with `replace` rename
    it over `path` and fsync the directory. A full snapshot carries its `base_id`; a delta names
    the snapshot it applies to (`delta_of`) and its `deleted` keys per entity."""
    arrays: dict[str, np.ndarray] = {"format": np.array([FILE_FORMAT], dtype=np.int64)}
    if base_id is not None:
        arrays["base_id"] = np.frombuffer(base_id.encode(), dtype=np.uint8)
    if delta_of is not None:
        arrays["delta_of"] = np.frombuffer(delta_of.encode(), dtype=np.uint8)
    entities = sorted(set(data) | set(deleted or {}))
    for k, entity in enumerate(entities):
        table = data.get(entity, {})
        arrays[f"e{k}_name"] = np.frombuffer(entity.encode(), dtype=np.uint8)
        arrays[f"e{k}_keys"], arrays[f"e{k}_key_offsets"] = pack([key.encode() for key in table])
        arrays[f"e{k}_values"], arrays[f"e{k}_value_offsets"] = pack(  # (an `Owned` value is encoded here)
            [v if type(v) is bytes else encode_value(v) for v in table.values()])
        if deleted is not None:
            gone = [key.encode() for key in deleted.get(entity, [])]
            arrays[f"e{k}_deleted"], arrays[f"e{k}_deleted_offsets"] = pack(gone)
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
            replace_and_sync(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def replace_and_sync(tmp: Path, path: Path) -> None:
    """Rename a written and fsynced `tmp` over `path`, then fsync the directory so the rename is durable."""
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _tables(z, path: Path) -> dict[str, tuple[dict[str, bytes], list[str]]]:
    if int(z["format"][0]) != FILE_FORMAT:
        raise OnlineStoreError(f"{path}: store file format {int(z['format'][0])}, expected {FILE_FORMAT}")
    out: dict[str, tuple[dict[str, bytes], list[str]]] = {}
    k = 0
    while f"e{k}_name" in z.files:
        keys = [b.decode() for b in unpack(z[f"e{k}_keys"], z[f"e{k}_key_offsets"])]
        table = _table(keys, unpack(z[f"e{k}_values"], z[f"e{k}_value_offsets"]))
        deleted = ([b.decode() for b in unpack(z[f"e{k}_deleted"], z[f"e{k}_deleted_offsets"])]
                   if f"e{k}_deleted" in z.files else [])
        out[z[f"e{k}_name"].tobytes().decode()] = (table, deleted)
        k += 1
    return out


def load(path: Path) -> tuple[dict[str, dict[str, bytes]], str | None]:
    """A full snapshot: its tables and its id (None: a file from before delta snapshots)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            base_id = z["base_id"].tobytes().decode() if "base_id" in z.files else None
            return {entity: table for entity, (table, _) in _tables(z, path).items()}, base_id
    except (OSError, ValueError, KeyError) as e:
        raise OnlineStoreError(f"{path}: cannot load the in-process store file ({e}); delete it to start empty") from e


def load_delta(path: Path, base_id: str | None) -> dict[str, tuple[dict[str, bytes], list[str]]] | None:
    """The delta at `path` when it applies to the full snapshot `base_id`; None when there is none, or
    it belongs to another snapshot (older than the one loaded: a crash between the two renames)."""
    if base_id is None or not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if "delta_of" not in z.files or z["delta_of"].tobytes().decode() != base_id:
                return None
            return _tables(z, path)
    except (OSError, ValueError, KeyError) as e:
        raise OnlineStoreError(f"{path}: cannot load the in-process store's delta file ({e}); delete it to start "
                               "from the full snapshot (the event log or stream then folds what it held)") from e


def ids(file) -> tuple[str | None, str | None]:
    """(base_id, delta_of) of a snapshot file (a path or an open binary file, left at its start), read
    without loading its tables: a full snapshot has the first, a delta the second."""
    with np.load(file, allow_pickle=False) as z:
        found = tuple(z[name].tobytes().decode() if name in z.files else None for name in ("base_id", "delta_of"))
    if hasattr(file, "seek"):
        file.seek(0)
    return found
