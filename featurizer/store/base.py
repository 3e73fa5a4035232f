"""Online store: batch key-value reads and writes per entity, behind one small interface.

`OnlineStore` is the interface (after feast's OnlineStore): batch `write`, batch
`read` that returns one entry per key (None when missing), `delete`, `flush`,
`close`. A value is a JSON-able dict or raw bytes; a read returns a fresh copy
of what was written. Backends take their typed config as an argument:

- `InProcessStore(InProcessConfig(path=...))`: dicts in memory, the embedded
  default. With a path it loads the file on start and persists atomically
  (temp file, fsync, rename) at `flush()` / `close()`, or on every write with
  `autoflush=True`. The file is an uncompressed .npz of byte arrays (no pickle).
- `RedisStore(RedisConfig(url=..., namespace=...))`: one Redis string per key,
  `{namespace}:{entity}:{key}`, batched in pipelines of MSET / MGET / DEL.

Values are encoded as one tag byte + payload: JSON (compact, floats round-trip
exactly) or the bytes as given.

`changes(entity, since)` lets a reader keep decoded values between reads: the
in-process store counts its writes per entity and says which keys changed since
a version (and `keys(entity)` lists them all); Redis cannot know what other
processes wrote, so it says "unknown" and readers decode every time.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np

Value = Union[dict, bytes]
_TAG_JSON, _TAG_BYTES = b"j", b"b"
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]*$")
_FILE_FORMAT = 1
_TAG_BYTES_INT = _TAG_BYTES[0]


class OnlineStoreError(RuntimeError):
    """The store cannot serve the call (closed, unreadable file, bad name)."""


class StoreConfigError(ValueError):
    """A store config is malformed; the message names the field and the choices."""


def encode_value(value: Value) -> bytes:
    if isinstance(value, dict):
        return _TAG_JSON + json.dumps(value, separators=(",", ":")).encode()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _TAG_BYTES + bytes(value)
    raise TypeError(f"online store values are dict (JSON) or bytes, got {type(value).__name__}")


def decode_value(blob: bytes) -> Value:
    if blob and blob[0] == _TAG_BYTES_INT:  # an int compare: this runs for every key read
        return blob[1:]
    tag, body = blob[:1], blob[1:]
    if tag == _TAG_JSON:
        return json.loads(body)
    raise OnlineStoreError(f"unknown value tag {tag!r}: the data was not written by this store")


def _check_name(kind: str, name: str) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"{kind} {name!r} must start with a letter and use only letters, digits, '_' and '-'")


class OnlineStore(ABC):
    """Batch key-value access per entity (e.g. "item", "user"). Keys are str."""

    @abstractmethod
    def write(self, entity: str, rows: Mapping[str, Value]) -> None:
        """Insert or overwrite every key of `rows`."""

    @abstractmethod
    def read(self, entity: str, keys: Sequence[str]) -> list[Value | None]:
        """One entry per key, in order; None where the key is missing."""

    @abstractmethod
    def delete(self, entity: str, keys: Iterable[str]) -> None:
        """Remove keys; missing keys are ignored."""

    def flush(self) -> None:
        """Make writes durable (where the backend has a notion of it)."""

    def changes(self, entity: str, since: int | None) -> tuple[int | None, frozenset[str] | None]:
        """(version of `entity` now, keys written or deleted after version `since`).

        For caches of decoded values. The keys are None when the store cannot tell (since is
        None or too old): then everything may have changed. The version is None when the
        backend cannot version at all (other processes may write to it): cache nothing."""
        return None, None

    def keys(self, entity: str) -> list[str] | None:
        """Every key of `entity`, or None when the backend does not list keys (with `changes`,
        for readers that index keys)."""
        return None

    @abstractmethod
    def close(self) -> None:
        """Flush and release resources; the store is unusable afterwards."""

    def __enter__(self) -> OnlineStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------- configs


@dataclass(frozen=True)
class InProcessConfig:
    type: Literal["inprocess"] = "inprocess"
    path: str | None = None  # None: memory only
    autoflush: bool = False  # persist after every write/delete (else at flush/close)


@dataclass(frozen=True)
class RedisConfig:
    type: Literal["redis"] = "redis"
    url: str = "redis://127.0.0.1:6379/0"
    namespace: str = "semrank"
    batch_size: int = 1000  # keys per MSET/MGET/DEL command inside one pipeline
    socket_timeout_s: float = 5.0


StoreConfig = Union[InProcessConfig, RedisConfig]
_CONFIGS: dict[str, type] = {"inprocess": InProcessConfig, "redis": RedisConfig}
_FIELD_TYPES: dict[str, dict[str, tuple[type, ...]]] = {
    "inprocess": {"path": (str, type(None)), "autoflush": (bool,)},
    "redis": {"url": (str,), "namespace": (str,), "batch_size": (int,), "socket_timeout_s": (int, float)},
}


def store_config(raw: Mapping[str, Any] | StoreConfig) -> StoreConfig:
    """A typed config from a mapping such as {"type": "redis", "url": ...}; unknown fields are errors."""
    if isinstance(raw, (InProcessConfig, RedisConfig)):
        return raw
    if not isinstance(raw, Mapping):
        raise StoreConfigError(f"online store config must be a mapping, got {type(raw).__name__}")
    kind = raw.get("type")
    if kind not in _CONFIGS:
        raise StoreConfigError(f"online store config: type {kind!r} is not one of {sorted(_CONFIGS)}")
    cls = _CONFIGS[kind]
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise StoreConfigError(f"online store config ({kind}): unknown field(s) {unknown}; known fields: {known}")
    for name, value in raw.items():
        expected = _FIELD_TYPES[kind].get(name)
        if expected and not (isinstance(value, expected) and not (isinstance(value, bool) and bool not in expected)):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in expected)
            raise StoreConfigError(f"online store config ({kind}): field '{name}' must be {names}, got {value!r}")
    return cls(**raw)


def store_from_config(config: Mapping[str, Any] | StoreConfig) -> OnlineStore:
    cfg = store_config(config)
    return InProcessStore(cfg) if isinstance(cfg, InProcessConfig) else RedisStore(cfg)


# ---------------------------------------------------------------- in-process


class InProcessStore(OnlineStore):
    """Dicts in memory (encoded values, so reads never alias writes); optionally persisted to `path`."""

    def __init__(self, config: InProcessConfig = InProcessConfig()):
        if not isinstance(config, InProcessConfig):
            raise StoreConfigError(f"InProcessStore needs an InProcessConfig, got {type(config).__name__}")
        self.config = config
        self._path = Path(config.path) if config.path else None
        self._data: dict[str, dict[str, bytes]] = {}
        self._lock = threading.RLock()
        # Per entity: a write counter and, once a reader asked for `changes`, the keys of the
        # latest writes (None for a write too large to list: readers then drop everything).
        self._versions: dict[str, int] = {}
        self._written: dict[str, deque[tuple[int, frozenset[str] | None]]] = {}
        self._written_keys: dict[str, int] = {}  # keys listed in _written[entity], all writes together
        self._dirty = False
        self._closed = False
        if self._path is not None and self._path.exists():
            self._data = _load(self._path)

    def _table(self, entity: str) -> dict[str, bytes]:
        if self._closed:
            raise OnlineStoreError("the in-process store is closed")
        _check_name("entity", entity)
        return self._data.setdefault(entity, {})

    def write(self, entity: str, rows: Mapping[str, Value]) -> None:
        encoded = {str(k): encode_value(v) for k, v in rows.items()}
        with self._lock:
            self._table(entity).update(encoded)
            self._bump(entity, encoded.keys())
            self._changed()

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
            self._changed()

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

    def _changed(self) -> None:
        self._dirty = True
        if self.config.autoflush:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            if self._path is not None and self._dirty and not self._closed:
                _save_atomic(self._path, self._data)
            self._dirty = False

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self.flush()
                self._closed = True


def _pack(blobs: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in blobs], out=offsets[1:])
    return np.frombuffer(b"".join(blobs), dtype=np.uint8), offsets


def _unpack(data: np.ndarray, offsets: np.ndarray) -> list[bytes]:
    raw = data.tobytes()
    o = offsets.tolist()
    return [raw[o[k] : o[k + 1]] for k in range(len(o) - 1)]


def _save_atomic(path: Path, data: dict[str, dict[str, bytes]]) -> None:
    """Write to a temp file beside `path`, fsync, rename over it, fsync the directory."""
    arrays: dict[str, np.ndarray] = {"format": np.array([_FILE_FORMAT], dtype=np.int64)}
    for k, (entity, table) in enumerate(sorted(data.items())):
        arrays[f"e{k}_name"] = np.frombuffer(entity.encode(), dtype=np.uint8)
        arrays[f"e{k}_keys"], arrays[f"e{k}_key_offsets"] = _pack([key.encode() for key in table])
        arrays[f"e{k}_values"], arrays[f"e{k}_value_offsets"] = _pack(list(table.values()))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
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


# ---------------------------------------------------------------- redis


class RedisStore(OnlineStore):
    """Redis strings under `{namespace}:{entity}:{key}`; every batch is one pipelined round trip."""

    def __init__(self, config: RedisConfig = RedisConfig()):
        import redis

        if not isinstance(config, RedisConfig):
            raise StoreConfigError(f"RedisStore needs a RedisConfig, got {type(config).__name__}")
        _check_name("namespace", config.namespace)
        if config.batch_size < 1:
            raise StoreConfigError(f"RedisConfig.batch_size must be >= 1, got {config.batch_size}")
        self.config = config
        self._client = redis.Redis.from_url(config.url, socket_timeout=config.socket_timeout_s)
        self._prefix = f"{config.namespace}:"
        self._closed = False

    def _keys(self, entity: str, keys: Iterable[str]) -> list[str]:
        if self._closed:
            raise OnlineStoreError("the Redis store is closed")
        _check_name("entity", entity)
        p = f"{self._prefix}{entity}:"
        return [p + k for k in keys]

    def _chunks(self, seq: list) -> Iterable[list]:
        n = self.config.batch_size
        return (seq[i : i + n] for i in range(0, len(seq), n))

    def write(self, entity: str, rows: Mapping[str, Value]) -> None:
        if not rows:
            return
        full = self._keys(entity, (str(k) for k in rows))
        mapping = dict(zip(full, (encode_value(v) for v in rows.values())))
        items = list(mapping.items())
        pipe = self._client.pipeline(transaction=False)
        for chunk in self._chunks(items):
            pipe.mset(dict(chunk))
        pipe.execute()

    def read(self, entity: str, keys: Sequence[str]) -> list[Value | None]:
        if not len(keys):
            return []
        full = self._keys(entity, keys)
        pipe = self._client.pipeline(transaction=False)
        for chunk in self._chunks(full):
            pipe.mget(chunk)
        blobs = [b for part in pipe.execute() for b in part]
        return [None if b is None else decode_value(b) for b in blobs]

    def delete(self, entity: str, keys: Iterable[str]) -> None:
        full = self._keys(entity, keys)
        if not full:
            return
        pipe = self._client.pipeline(transaction=False)
        for chunk in self._chunks(full):
            pipe.delete(*chunk)
        pipe.execute()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._client.close()
