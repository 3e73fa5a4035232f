"""One contract for every OnlineStore backend: in-process (with a file) and Redis (real server on loopback)."""

from __future__ import annotations

import math
import struct
import uuid

import numpy as np
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from featurizer.store.base import OnlineStoreError, WriteConflict
from featurizer.store.config import (
    InProcessConfig,
    RedisConfig,
    StoreConfigError,
    store_config,
)
from featurizer.store.factory import store_from_config
from featurizer.store.in_process import InProcessStore
from featurizer.store.redis import RedisStore

REDIS_URL = "redis://127.0.0.1:6379/0"


def drop_namespace(namespace: str) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{namespace}:*", count=10_000))
    for k in range(0, len(keys), 5_000):
        client.delete(*keys[k : k + 5_000])
    client.close()


@pytest.fixture(scope="session")
def redis_up():
    try:
        redis.Redis.from_url(REDIS_URL, socket_timeout=2).ping()
    except redis.ConnectionError as e:  # a missing server is a failure, not a skip
        pytest.fail(f"these tests need the Redis server at {REDIS_URL} ({e}); start it with `redis-server`")


@pytest.fixture(params=["inprocess", "redis"])
def open_store(request, tmp_path, redis_up):
    """A function that opens a new store on the same data (a file, or a Redis namespace)."""
    if request.param == "inprocess":
        config = {"type": "inprocess", "path": str(tmp_path / "store.npz")}
    else:
        config = {"type": "redis", "url": REDIS_URL, "namespace": f"test-{uuid.uuid4().hex}"}
    opened = []

    def open_():
        store = store_from_config(config)
        opened.append(store)
        return store

    open_.kind = request.param
    yield open_
    for store in opened:
        store.close()
    if request.param == "redis":
        drop_namespace(config["namespace"])


def test_batch_write_read_in_key_order(open_store):
    s = open_store()
    s.write("item", {"a": {"x": 1}, "b": b"\x00\x01", "c": {"y": [1, 2]}})
    s.write("user", {"a": {"other": True}})
    assert s.read("item", ["c", "a", "b", "a"]) == [{"y": [1, 2]}, {"x": 1}, b"\x00\x01", {"x": 1}]
    assert s.read("user", ["a"]) == [{"other": True}]  # entities are separate key spaces


def test_missing_keys_read_as_none(open_store):
    s = open_store()
    s.write("item", {"a": {"x": 1}})
    assert s.read("item", ["nope", "a", "also-nope"]) == [None, {"x": 1}, None]
    assert s.read("never-written", ["a"]) == [None]
    assert s.read("item", []) == []
    s.write("item", {})  # an empty batch is fine


def test_overwrite_replaces_the_whole_value(open_store):
    s = open_store()
    s.write("item", {"a": {"x": 1, "y": 2}, "b": b"old"})
    s.write("item", {"a": {"x": 3}, "b": {"now": "json"}})
    assert s.read("item", ["a", "b"]) == [{"x": 3}, {"now": "json"}]


def test_delete(open_store):
    s = open_store()
    s.write("item", {"a": {"x": 1}, "b": {"x": 2}, "c": {"x": 3}})
    s.delete("item", ["a", "c", "missing"])
    assert s.read("item", ["a", "b", "c"]) == [None, {"x": 2}, None]
    s.delete("item", [])


def test_guarded_write_commits_only_on_the_expected_value(open_store):
    s = open_store()
    s.write_batch({"meta": {"seq": {"n": 1}}}, expect=("meta", "seq", None))  # None: the key must be absent
    with pytest.raises(WriteConflict, match="meta 'seq'"):
        s.write_batch({"item": {"a": {"x": 1}}, "meta": {"seq": {"n": 3}}}, expect=("meta", "seq", {"n": 2}))
    assert s.read("item", ["a"]) == [None] and s.read("meta", ["seq"]) == [{"n": 1}]  # nothing of it written
    s.write_batch({"item": {"a": {"x": 1}}, "meta": {"seq": {"n": 2}}}, expect=("meta", "seq", {"n": 1}))
    assert s.read("item", ["a"]) == [{"x": 1}] and s.read("meta", ["seq"]) == [{"n": 2}]
    assert isinstance(WriteConflict("x"), OnlineStoreError)


def test_redis_guarded_write_aborts_when_the_key_changes_after_the_check(open_store, monkeypatch):
    """The check and the commit are one WATCHed transaction: another writer in between aborts it."""
    if open_store.kind != "redis":
        pytest.skip("a Redis transaction property")
    s = open_store()
    s.write("meta", {"seq": {"n": 1}})
    other = redis.Redis.from_url(REDIS_URL)
    real_multi = redis.client.Pipeline.multi

    def multi_after_a_rival_write(pipe):  # fault injection: another writer lands between GET and MULTI
        other.set(f"{s.config.namespace}:meta:seq", b'j{"n":7}')
        return real_multi(pipe)

    monkeypatch.setattr(redis.client.Pipeline, "multi", multi_after_a_rival_write)
    with pytest.raises(WriteConflict, match="changed during the write"):
        s.write_batch({"item": {"a": {"x": 1}}, "meta": {"seq": {"n": 2}}}, expect=("meta", "seq", {"n": 1}))
    other.close()
    assert s.read("item", ["a"]) == [None] and s.read("meta", ["seq"]) == [{"n": 7}]


def test_values_round_trip_exactly(open_store):
    s = open_store()
    floats = [0.1, 1 / 3, -0.0, 5e-324, 1.7976931348623157e308, 2.0**-1074, 123456789.123456789, math.pi]
    packed = np.array(floats + [np.nan, np.inf], dtype="<f8").tobytes()
    value = {"f": floats, "i": [0, -1, 2**62, -(2**63)], "s": "ünïcødé \x1f:|", "nested": {"l": [[1.5], {"k": None}]}, "b": False}
    s.write("item", {"json": value, "bytes": packed, "all-bytes": bytes(range(256))})
    got_json, got_bytes, got_all = s.read("item", ["json", "bytes", "all-bytes"])
    assert got_json == value
    assert [struct.pack("<d", x) for x in got_json["f"]] == [struct.pack("<d", x) for x in floats]  # bit-exact, -0.0 too
    assert got_bytes == packed and got_all == bytes(range(256))


def test_reads_are_copies(open_store):
    s = open_store()
    value = {"l": [1, 2]}
    s.write("item", {"a": value})
    value["l"].append(3)
    got = s.read("item", ["a"])[0]
    got["l"].append(4)
    assert s.read("item", ["a"]) == [{"l": [1, 2]}]


def test_persistence(open_store):
    first = open_store()
    first.write("item", {"a": {"x": 1.25}, "b": b"\xff"})
    first.delete("item", ["b"])
    if open_store.kind == "inprocess":
        first.close()  # durable at close/flush; a new process reloads the file
    second = open_store()
    assert second.read("item", ["a", "b"]) == [{"x": 1.25}, None]


def test_large_batch(open_store):
    s = open_store()
    rows = {f"key-{k}": (struct.pack("<d", k / 7) if k % 2 else {"k": k}) for k in range(10_000)}
    s.write("item", rows)
    keys = list(rows)[::-1]
    assert s.read("item", keys) == [rows[k] for k in keys]
    s.delete("item", keys[:5_000])
    got = s.read("item", keys)
    assert got[:5_000] == [None] * 5_000 and got[5_000:] == [rows[k] for k in keys[5_000:]]


def test_closed_store_refuses(open_store):
    s = open_store()
    s.close()
    with pytest.raises(OnlineStoreError, match="closed"):
        s.read("item", ["a"])


def test_bad_values_and_names(open_store):
    s = open_store()
    with pytest.raises(TypeError, match="dict .* or bytes"):
        s.write("item", {"a": [1, 2]})
    with pytest.raises(ValueError, match="entity"):
        s.write("it:em", {"a": {}})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


keys = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=10)  # any valid unicode
values = st.dictionaries(st.text(max_size=6), json_values, max_size=4) | st.binary(max_size=40)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.dictionaries(keys, values, max_size=8))
def test_any_json_or_bytes_round_trips(open_store, rows):
    s = open_store()  # every example sees the data of earlier ones too; keys overwrite
    s.write("prop", rows)
    assert s.read("prop", list(rows)) == list(rows.values())


def test_non_finite_floats_and_int_keys_read_back_as_written(open_store):
    """The values go through orjson, which would write NaN and infinities as null: they must not."""
    import math

    s = open_store()
    s.write("prop", {"f": {"nan": float("nan"), "inf": [float("inf"), {"x": -float("inf")}], "none": None, "one": 1.5},
                     "k": {1: "a", "2": [None, 0.1]}})
    f, k = s.read("prop", ["f", "k"])
    assert math.isnan(f["nan"]) and f["inf"] == [float("inf"), {"x": -float("inf")}] and f["none"] is None
    assert f["one"] == 1.5 and k == {"1": "a", "2": [None, 0.1]}  # (non-string keys become strings, as in JSON)


# ---------------------------------------------------------------- configs and backend specifics


def test_config_factory_and_typos():
    assert isinstance(store_from_config({"type": "inprocess"}), InProcessStore)
    redis_store = store_from_config(RedisConfig(namespace="cfg-test"))
    assert isinstance(redis_store, RedisStore)
    redis_store.close()
    assert store_config({"type": "redis", "namespace": "x"}) == RedisConfig(namespace="x")
    with pytest.raises(StoreConfigError, match=r"unknown field\(s\) \['urll'\].*known fields: \['type', 'url'"):
        store_config({"type": "redis", "urll": "redis://x"})
    with pytest.raises(StoreConfigError, match="field 'batch_size' must be int, got '10'"):
        store_config({"type": "redis", "batch_size": "10"})
    with pytest.raises(StoreConfigError, match="field 'autoflush' must be bool"):
        store_config({"type": "inprocess", "autoflush": 1})
    with pytest.raises(StoreConfigError, match="type 'memcached' is not one of"):
        store_config({"type": "memcached"})
    with pytest.raises(StoreConfigError, match="InProcessConfig"):
        InProcessStore(RedisConfig())


def test_inprocess_memory_only_and_atomic_file(tmp_path):
    mem = InProcessStore(InProcessConfig())
    mem.write("item", {"a": {"x": 1}})
    mem.close()  # nothing to persist, no error
    path = tmp_path / "sub" / "store.npz"
    s = InProcessStore(InProcessConfig(path=str(path), autoflush=True))
    s.write("item", {"a": {"x": 1}})
    assert path.exists() and sorted(p.name for p in path.parent.iterdir()) == ["store.npz"]  # no temp files left
    assert InProcessStore(InProcessConfig(path=str(path))).read("item", ["a"]) == [{"x": 1}]
    path.write_bytes(b"not an npz")
    with pytest.raises(OnlineStoreError, match="delete it to start empty"):
        InProcessStore(InProcessConfig(path=str(path)))
