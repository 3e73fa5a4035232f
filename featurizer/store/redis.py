"""The Redis online store: one Redis string per key, `{namespace}:{entity}:{key}`.

Reads and deletes are pipelines of MGET / DEL of `batch_size` keys, one round trip each. A
`write_batch` is one MULTI/EXEC transaction of MSETs, so other readers (and a crash of this
process) see every row of it or none: the online features of a batch of events and the event-log
sequence they were applied up to are committed together (`serving.ingest.apply`). A guarded write
(`expect`) WATCHes its key, checks it, then runs the transaction, which Redis aborts if the key
changed in between: a transaction sent on a connection that timed out and landed later (Redis was
stalled) can never commit on top of a newer write. Calls block up to `socket_timeout_s`: the store
is `remote`.

Redis errors (connection refused, timeouts, a server that answers errors) raise
`OnlineStoreError` (UNAVAILABLE); its message names the kind of failure, never the server's
address. The full error is logged here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TypeVar

from featurizer.store.base import (
    OnlineStore,
    OnlineStoreError,
    Expect,
    Value,
    WriteConflict,
    check_name,
    decode_value,
    encode_value,
)
from featurizer.store.config import RedisConfig, StoreConfigError

log = logging.getLogger(__name__)

T = TypeVar("T")


class RedisStore(OnlineStore):
    """Redis strings under `{namespace}:{entity}:{key}`; every batch is one pipelined round trip."""

    remote = True

    def __init__(self, config: RedisConfig = RedisConfig()):
        import redis

        if not isinstance(config, RedisConfig):
            raise StoreConfigError(f"RedisStore needs a RedisConfig, got {type(config).__name__}")
        check_name("namespace", config.namespace)
        if config.batch_size < 1:
            raise StoreConfigError(f"RedisConfig.batch_size must be >= 1, got {config.batch_size}")
        self.config = config
        self._redis_error = redis.RedisError
        self._watch_error = redis.WatchError
        self._client = redis.Redis.from_url(config.url, socket_timeout=config.socket_timeout_s)
        self._prefix = f"{config.namespace}:"
        self._closed = False

    def _keys(self, entity: str, keys: Iterable[str]) -> list[str]:
        if self._closed:
            raise OnlineStoreError("the Redis store is closed")
        check_name("entity", entity)
        p = f"{self._prefix}{entity}:"
        return [p + k for k in keys]

    def _chunks(self, seq: list) -> Iterable[list]:
        n = self.config.batch_size
        return (seq[i : i + n] for i in range(0, len(seq), n))

    def _run(self, what: str, call: Callable[[], T]) -> T:
        try:
            return call()
        except self._redis_error as e:
            log.warning("Redis %s failed: %s", what, e)
            raise OnlineStoreError(f"the online store (Redis) failed to {what} ({type(e).__name__}); "
                                   "check that Redis is up and reachable from the server") from e

    def write_batch(self, rows: Mapping[str, Mapping[str, Value]], expect: Expect | None = None) -> None:
        items: list[tuple[str, bytes]] = []
        for entity, part in rows.items():
            full = self._keys(entity, (str(k) for k in part))
            items.extend(zip(full, (encode_value(v) for v in part.values())))
        if not items:
            return
        if expect is None:
            pipe = self._client.pipeline(transaction=True)  # MULTI ... EXEC: all or nothing
            for chunk in self._chunks(items):
                pipe.mset(dict(chunk))
            self._run("write", pipe.execute)
            return
        entity, key, value = expect
        guard = self._keys(entity, [key])[0]

        def guarded() -> None:
            with self._client.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(guard)
                    held = pipe.get(guard)
                    if (None if held is None else decode_value(held)) != value:
                        raise WriteConflict(f"online store write refused: {entity} {key!r} no longer holds the expected value")
                    pipe.multi()
                    for chunk in self._chunks(items):
                        pipe.mset(dict(chunk))
                    pipe.execute()
                except self._watch_error as e:
                    raise WriteConflict(f"online store write refused: {entity} {key!r} changed during the write") from e

        self._run("write", guarded)

    def read(self, entity: str, keys: Sequence[str]) -> list[Value | None]:
        if not len(keys):
            return []
        full = self._keys(entity, keys)
        pipe = self._client.pipeline(transaction=False)
        for chunk in self._chunks(full):
            pipe.mget(chunk)
        blobs = [b for part in self._run("read", pipe.execute) for b in part]
        return [None if b is None else decode_value(b) for b in blobs]

    def delete(self, entity: str, keys: Iterable[str]) -> None:
        full = self._keys(entity, keys)
        if not full:
            return
        pipe = self._client.pipeline(transaction=False)
        for chunk in self._chunks(full):
            pipe.delete(*chunk)
        self._run("delete", pipe.execute)

    def drop_namespace(self) -> int:
        """Delete every key of this namespace (an erasure's rebuild: the next start refills it from
        the data and the event log); returns how many."""
        if self._closed:
            raise OnlineStoreError("the Redis store is closed")
        keys = self._run("scan", lambda: list(self._client.scan_iter(match=f"{self._prefix}*", count=1000)))
        pipe = self._client.pipeline(transaction=False)
        for chunk in self._chunks(keys):
            pipe.delete(*chunk)
        self._run("delete", pipe.execute)
        return len(keys)

    def adopt(self, other: RedisStore) -> int:
        """Take the state of `other` (a namespace built beside this one, on the same server) in
        place of this namespace's: this namespace's keys are deleted, then each of `other`'s is
        renamed into it, and `other` is closed. Not atomic for readers: a read in between sees part
        of either state (the server marks answers degraded meanwhile). Returns the keys moved."""
        if self._closed or other._closed:
            raise OnlineStoreError("the Redis store is closed")
        if other.config.url != self.config.url or other._prefix == self._prefix:
            raise OnlineStoreError("adopt takes another namespace of the same Redis server")
        self.drop_namespace()
        keys = self._run("scan", lambda: list(other._client.scan_iter(match=f"{other._prefix}*", count=1000)))
        pipe = self._client.pipeline(transaction=False)
        cut = len(other._prefix)
        for chunk in self._chunks(keys):
            for k in chunk:
                pipe.rename(k, self._prefix + k[cut:].decode())
            self._run("rename", pipe.execute)
        other.close()
        return len(keys)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._client.close()
