"""Online store: batch key-value reads and writes per entity, behind one small interface.

`OnlineStore` is the interface (after feast's OnlineStore): batch `write_batch` that commits the
rows of several entities as one atomic step (optionally only if one key still holds the value the
writer expects: a fence, so that a write reported failed that landed after all is never committed
twice), batch `read` that returns one entry per key (None when missing), `delete`, `flush`, `close`.
`remote` says whether a call may wait on the network (callers on an event loop then run it on a
thread: `serving.ranking.store_worker`). A value is a JSON-able dict or raw bytes; a read
returns a fresh copy of what was written. Backends take their typed config
(`featurizer.store.config`) as an argument, one module each:

- `featurizer.store.in_process.InProcessStore`: dicts in memory, the embedded default, optionally
  persisted atomically to a file;
- `featurizer.store.redis.RedisStore`: one Redis string per key, batched in pipelines, a
  `write_batch` in one MULTI/EXEC transaction.

`featurizer.store.factory.store_from_config` picks one from a config. Values are encoded as one
tag byte + payload: JSON (compact, floats round-trip exactly) or the bytes as given.

`changes(entity, since)` lets a reader keep decoded values between reads: the in-process store
counts its writes per entity and says which keys changed since a version (and `keys(entity)`
lists them all); Redis cannot know what other processes wrote, so it says "unknown" and readers
decode every time.
"""

from __future__ import annotations

import json
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Union

import orjson

from featurizer.errors import SemrankError

Value = Union[dict, bytes]
_TAG_JSON, _TAG_BYTES = b"j", b"b"
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]*$")
_TAG_BYTES_INT = _TAG_BYTES[0]


class OnlineStoreError(SemrankError, RuntimeError):
    """The store cannot serve the call (closed, unreachable, unreadable file, foreign data)."""

    grpc_code = "UNAVAILABLE"
    reason = "ONLINE_STORE_UNAVAILABLE"


class WriteConflict(OnlineStoreError):
    """A guarded `write_batch` found its guard key holding another value: nothing was written."""

    reason = "ONLINE_STORE_CONFLICT"


Expect = tuple[str, str, "Value | None"]  # (entity, key, the value it must hold; None: absent)


class Owned(dict):
    """A dict value handed over to the store by `write_batch`: the writer never changes it, nor
    anything inside it, afterwards. A store in this process may then keep it as it is and encode it
    only when it must (a read, a snapshot; `featurizer.store.in_process`); any other store encodes
    it at once, as any dict. The fold hands over copies of the states it changes, so a state
    rewritten by every event is encoded once per snapshot, not once per event."""

    __slots__ = ()


def encode_value(value: Value) -> bytes:
    """A store value as bytes: a dict as compact JSON (orjson: the fold encodes and decodes a few
    co-occurrence and user states per event, and the standard library's json took 60% of the event
    loop under bench/serve.py's write flood), bytes as they are. Non-string keys become strings, as
    json does. orjson writes a NaN or an infinity as null: a value holding one is written by json
    instead (NaN, Infinity), so every value reads back as it was written."""
    if isinstance(value, dict):
        out = orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)
        if b"null" in out and _non_finite(value):
            out = json.dumps(value, separators=(",", ":")).encode()
        return _TAG_JSON + out
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _TAG_BYTES + bytes(value)
    raise TypeError(f"online store values are dict (JSON) or bytes, got {type(value).__name__}")


def _non_finite(value) -> bool:
    """Whether a JSON-like value holds a float NaN or infinity anywhere."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_non_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_non_finite(v) for v in value)
    return False


def decode_value(blob: bytes) -> Value:
    if blob and blob[0] == _TAG_BYTES_INT:  # an int compare: this runs for every key read
        return blob[1:]
    tag, body = blob[:1], blob[1:]
    if tag == _TAG_JSON:
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:  # NaN or Infinity, written by json (see encode_value)
            return json.loads(body)
    raise OnlineStoreError(f"unknown value tag {tag!r}: the data was not written by this store")


def check_name(kind: str, name: str) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"{kind} {name!r} must start with a letter and use only letters, digits, '_' and '-'")


class OnlineStore(ABC):
    """Batch key-value access per entity (e.g. "item", "user"). Keys are str."""

    remote = False  # True: calls go over the network and may block up to the backend's timeout

    @abstractmethod
    def write_batch(self, rows: Mapping[str, Mapping[str, Value]], expect: Expect | None = None) -> None:
        """Insert or overwrite every key of every entity (entity -> key -> value) as one atomic
        step: readers, snapshots and a crash see all of it or none of it.

        `expect` (entity, key, value): commit only if that key holds `value` (None: is absent) at
        the commit, else raise WriteConflict and write nothing."""

    def write(self, entity: str, rows: Mapping[str, Value]) -> None:
        """Insert or overwrite every key of `rows` (one entity; atomic like `write_batch`)."""
        self.write_batch({entity: rows})

    @abstractmethod
    def read(self, entity: str, keys: Sequence[str]) -> list[Value | None]:
        """One entry per key, in order; None where the key is missing."""

    @abstractmethod
    def delete(self, entity: str, keys: Iterable[str]) -> None:
        """Remove keys; missing keys are ignored."""

    def flush(self) -> None:
        """Make writes durable (where the backend has a notion of it)."""

    def freeze(self, full: bool = False) -> Callable[[], None] | None:
        """`flush` in two steps: take a consistent copy now, return the function that persists it
        (None: nothing to persist). A caller holding a lock for consistency runs the function after
        releasing it. `full`: the whole state in one file, where a backend writes only changes
        otherwise. This default flushes at once and returns None; a backend whose flush is slow
        (the in-process store's file) overrides it."""
        self.flush()
        return None

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
