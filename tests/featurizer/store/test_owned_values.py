"""`Owned` values: the fold hands copies of the states it changes to the in-process store, which holds
them as they are until the next snapshot encodes them. Reads, snapshots (full, forked or copied, and
delta), fences and restarts see exactly what plain dicts would give; the store never hands out an
object it holds; a value written again while a snapshot encodes keeps its newer value."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import featurizer.store.in_process as in_process
import featurizer.store.snapshot_write as snapshot_write
from featurizer.contracts.schema import EVENT_TYPES
from featurizer.definitions import EVENT_CODE
from featurizer.online.features import OnlineFeatures, to_us
from featurizer.online.user_state import CoocState
from featurizer.store.base import Owned, WriteConflict, encode_value
from featurizer.store.config import InProcessConfig
from featurizer.store.in_process import InProcessStore
from tests.featurizer.online.test_user_history import ITEMS, T0

EVENTS = st.lists(st.tuples(st.integers(0, 30), st.sampled_from(["u0", "u1", "u2"]),
                            st.sampled_from(["i0", "i1", "i2", "i3", "i4"]), st.sampled_from(EVENT_TYPES)),
                  min_size=1, max_size=40)


def _apply(online: OnlineFeatures, rows) -> None:
    online.apply_columns([to_us(T0 + timedelta(minutes=m)) for m, *_ in rows], [r[1] for r in rows],
                         [r[2] for r in rows], [EVENT_CODE[r[3]] for r in rows])


@pytest.mark.parametrize("fork", [True, False])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(batches=st.lists(EVENTS, min_size=1, max_size=4), snapshot_after=st.lists(st.booleans(), min_size=4, max_size=4))
def test_a_store_holding_handed_over_states_reads_snapshots_and_reloads_as_plain_dicts_would(
        tmp_path_factory, fork, batches, snapshot_after):
    path = tmp_path_factory.mktemp("owned") / "store.bin"
    store = InProcessStore(InProcessConfig(path=str(path), fork_snapshots=fork))
    plain = InProcessStore()  # no file: every value is encoded at once
    online, reference = OnlineFeatures(store, ITEMS), OnlineFeatures(plain, ITEMS)
    for rows, snap in zip(batches, snapshot_after):
        _apply(online, rows)
        _apply(reference, rows)
        if snap:
            store.flush()  # a delta or a full snapshot, then the values written before it are encoded
    for entity in ("user", "cooc", "item", "ui", "meta"):
        keys = plain.keys(entity)
        assert sorted(store.keys(entity)) == sorted(keys)
        assert store.read(entity, keys) == plain.read(entity, keys)
    store.close()
    reloaded = InProcessStore(InProcessConfig(path=str(path)))
    for entity in ("user", "cooc", "item", "ui", "meta"):
        keys = plain.keys(entity)
        assert reloaded.read(entity, keys) == plain.read(entity, keys)
    assert all(type(v) is bytes for table in plain._data.values() for v in table.values())


@settings(max_examples=40, deadline=None)
@given(rows=EVENTS, more=EVENTS)
def test_a_handed_over_copy_encodes_as_the_state_and_shares_nothing_it_changes(rows, more):
    store = InProcessStore()
    online = OnlineFeatures(store, ITEMS)
    _apply(online, rows)
    states = [CoocState.from_dict(v) for v in store.read("cooc", store.keys("cooc"))]
    copies = [(s.to_owned(), encode_value(s.to_dict())) for s in states]
    for (owned, encoded), s in zip(copies, states):
        assert encode_value(owned) == encoded
    for (m, _, item, _), s in zip(more * len(states), states):  # change every state
        s.add(item, to_us(T0 + timedelta(minutes=31 + m)))
    for owned, encoded in copies:
        assert encode_value(owned) == encoded  # the copy did not change with its state


def test_reads_never_return_a_held_object_and_fences_compare_values(tmp_path):
    store = InProcessStore(InProcessConfig(path=str(tmp_path / "s.bin")))
    value = Owned(n={"a": 1}, last=3, d={})
    store.write_batch({"cooc": {"i0": value}})
    assert store._data["cooc"]["i0"] is value  # held as handed over
    got = store.read("cooc", ["i0"])[0]
    assert got == {"n": {"a": 1}, "last": 3, "d": {}} and got is not value and got["n"] is not value["n"]
    got["n"]["a"] = 99
    assert store.read("cooc", ["i0"])[0]["n"] == {"a": 1}
    store.write_batch({"cooc": {"i1": {"n": {}}}}, expect=("cooc", "i0", {"n": {"a": 1}, "last": 3, "d": {}}))
    with pytest.raises(WriteConflict):
        store.write_batch({"cooc": {"i1": {"n": {}}}}, expect=("cooc", "i0", {"n": {"a": 2}, "last": 3, "d": {}}))


def _patch_encode(monkeypatch, fn) -> None:
    """`fn` for encode_value where the store and its snapshot's writer call it."""
    for module in (in_process, snapshot_write):
        monkeypatch.setattr(module, "encode_value", fn)


def test_without_a_file_handed_over_values_are_encoded_at_once():
    store = InProcessStore()
    store.write_batch({"cooc": {"i0": Owned(n={"a": 1}, last=3, d={})}})
    assert type(store._data["cooc"]["i0"]) is bytes


def test_a_snapshot_encodes_what_was_handed_over_before_it_and_keeps_what_is_written_during_it(tmp_path, monkeypatch):
    store = InProcessStore(InProcessConfig(path=str(tmp_path / "s.bin"), fork_snapshots=False))
    store.write_batch({"cooc": {"i0": Owned(n={"a": 1}, last=1, d={}), "i1": Owned(n={"b": 1}, last=1, d={})}})
    newer = Owned(n={"a": 2}, last=2, d={})
    real = encode_value
    calls = []

    def racing_encode(v):  # fault injection: a write lands while the snapshot's thread encodes
        if not calls:
            store.write_batch({"cooc": {"i0": newer}})
        calls.append(v)
        return real(v)

    _patch_encode(monkeypatch, racing_encode)
    store.flush()
    _patch_encode(monkeypatch, real)
    assert type(store._data["cooc"]["i1"]) is bytes  # settled
    assert store._data["cooc"]["i0"] is newer  # the newer write is kept, not the older value's bytes
    assert store.read("cooc", ["i0", "i1"]) == [{"n": {"a": 2}, "last": 2, "d": {}}, {"n": {"b": 1}, "last": 1, "d": {}}]
    store.flush()  # the newer one goes out with the next snapshot, and is settled after it
    assert type(store._data["cooc"]["i0"]) is bytes
    store.close()
    assert InProcessStore(InProcessConfig(path=str(tmp_path / "s.bin"))).read("cooc", ["i0"])[0]["n"] == {"a": 2}


def test_a_delta_snapshot_encodes_each_handed_over_value_once(tmp_path, monkeypatch):
    store = InProcessStore(InProcessConfig(path=str(tmp_path / "s.bin"), fork_snapshots=False))
    store.write_batch({"cooc": {"i0": Owned(n={"a": 1}, last=1, d={})}, "ui": {f"k{j}": b"x" for j in range(40)}})
    store.flush()  # the full snapshot
    calls = []
    real = encode_value
    _patch_encode(monkeypatch, lambda v: calls.append(v) or real(v))
    store.write_batch({"cooc": {"i1": Owned(n={"b": 1}, last=2, d={}), "i2": Owned(n={"c": 1}, last=2, d={})}})
    store.flush()  # a delta: it encodes the two values for its file, and the store keeps those bytes
    assert (tmp_path / "s.bin.delta").exists()
    assert len(calls) == 2 and all(type(v) is bytes for v in store._data["cooc"].values())
    store.close()
    reloaded = InProcessStore(InProcessConfig(path=str(tmp_path / "s.bin")))
    assert [v["n"] for v in reloaded.read("cooc", ["i0", "i1", "i2"])] == [{"a": 1}, {"b": 1}, {"c": 1}]


@pytest.mark.parametrize("fork", [True, False])
def test_a_delta_encoded_in_slices_on_the_loop_writes_what_it_took_and_keeps_newer_writes(tmp_path, monkeypatch, fork):
    """The JSON of handed-over values is the slow part of a delta under a write flood: the server
    encodes them a slice at a time on its loop (`SnapshotWrite.encode_slices`), paced between slices,
    while the fold goes on writing; then the file is written. Each value is encoded once (for the file
    and for the store), a key written again meanwhile keeps its newer value, and the file holds the
    values as the snapshot took them (a forked store forks its full snapshots only)."""
    store = InProcessStore(InProcessConfig(path=str(tmp_path / "s.bin"), fork_snapshots=fork))
    store.write_batch({"cooc": {"i0": Owned(n={"a": 1}, last=1, d={})}, "ui": {f"k{j}": b"x" for j in range(400)}})
    store.flush()  # the full snapshot
    store.write_batch({"cooc": {f"i{k}": Owned(n={"b": k}, last=2, d={}) for k in range(1, 41)}})
    calls = []
    real = encode_value
    _patch_encode(monkeypatch, lambda v: calls.append(v) or real(v))
    write = store.freeze()
    paced: list[float] = []

    async def pace(seconds: float) -> None:
        paced.append(seconds)
        if len(paced) == 1:  # the fold writes between two slices
            store.write_batch({"cooc": {"i1": Owned(n={"b": 100}, last=3, d={})}})

    asyncio.run(write.encode_slices(0.0, pace))  # a zero budget: one value per slice
    assert len(paced) == 40 and len(calls) == 40 and len(write.encoded) == 40  # (a last slice finds none left)
    write()
    # The write encoded none of the snapshot's values again; the settle after it encoded the newer i1
    # (written before it) and kept it, not the snapshot's bytes of the older one.
    assert len(calls) == 41 and calls[-1]["n"] == {"b": 100}
    held = store._data["cooc"]
    assert held["i1"] == encode_value({"n": {"b": 100}, "last": 3, "d": {}})
    assert held["i2"] == encode_value({"n": {"b": 2}, "last": 2, "d": {}})  # settled with the slices' bytes
    reloaded = InProcessStore(InProcessConfig(path=str(tmp_path / "s.bin")))
    assert [v["n"] for v in reloaded.read("cooc", ["i0", "i1", "i40"])] == [{"a": 1}, {"b": 1}, {"b": 40}]
    store.close()
    assert InProcessStore(InProcessConfig(path=str(tmp_path / "s.bin"))).read("cooc", ["i1"])[0]["n"] == {"b": 100}


def test_without_snapshots_at_most_max_owned_values_stay_decoded(tmp_path):
    """A store with a file whose snapshots never come (the server's interval at 0) still holds at
    most `max_owned` handed-over values decoded: each write past it encodes the oldest."""
    store = InProcessStore(InProcessConfig(path=str(tmp_path / "s.bin"), max_owned=2))
    for k in range(5):
        store.write_batch({"cooc": {f"i{k}": Owned(n={"a": k}, last=k, d={})}})
    store.write_batch({"cooc": {"i3": Owned(n={"a": 33}, last=3, d={})}})  # rewritten: the newest again
    held = {k for k, v in store._data["cooc"].items() if type(v) is Owned}
    assert held == {"i4", "i3"}
    assert [v["n"]["a"] for v in store.read("cooc", [f"i{k}" for k in range(5)])] == [0, 1, 2, 33, 4]
    with pytest.raises(Exception, match="max_owned"):
        InProcessConfig(max_owned=-1)
