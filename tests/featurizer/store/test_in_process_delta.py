"""Delta snapshots of the in-process store: while few keys changed since the last full snapshot,
`freeze` writes only them (`<path>.delta`); loading applies the delta that names the full snapshot
on disk and ignores any other. The full snapshot of the bench's state is about 100 MB and a fork
(docs/scaling.md, issue 28's mixed phase); a delta is the keys the events touched."""

from __future__ import annotations

import random
import shutil

import pytest

import featurizer.store.snapshot_files as snapshot_files
from featurizer.store.base import OnlineStoreError
from featurizer.store.config import InProcessConfig, StoreConfigError, store_config
from featurizer.store.in_process import InProcessStore


def _store(path, **kw) -> InProcessStore:
    return InProcessStore(InProcessConfig(path=str(path), **kw))


def _seeded(path, n=100, **kw) -> InProcessStore:
    store = _store(path, **kw)
    store.write_batch({"user": {f"u{i}": {"n": i} for i in range(n)}, "item": {f"i{i}": {"c": i} for i in range(n)}})
    store.flush()  # the first snapshot is a full one
    return store


@pytest.mark.parametrize("fork", [True, False])
def test_a_few_changes_go_to_a_delta_and_load_back_with_the_full_snapshot(tmp_path, fork):
    path = tmp_path / "store.bin"
    store = _seeded(path, n=2000, fork_snapshots=fork)
    full_bytes = path.read_bytes()
    assert not (tmp_path / "store.bin.delta").exists()

    store.write_batch({"user": {"u1": {"n": -1}, "new": {"n": 7}}})
    store.delete("item", ["i3"])
    store.flush()
    assert path.read_bytes() == full_bytes, "a delta snapshot rewrote the full one"
    assert (tmp_path / "store.bin.delta").stat().st_size < len(full_bytes) / 4

    again = _store(path)
    assert again.read("user", ["u1", "new", "u2"]) == [{"n": -1}, {"n": 7}, {"n": 2}]
    assert again.read("item", ["i3", "i4"]) == [None, {"c": 4}]
    assert len(again.keys("user")) == 2001 and len(again.keys("item")) == 1999
    again.close()

    # The delta is cumulative: a second one holds the first one's keys too, and replaces it.
    store.write_batch({"user": {"u2": {"n": -2}}})
    store.flush()
    assert path.read_bytes() == full_bytes
    assert _store(path).read("user", ["u1", "u2", "new"]) == [{"n": -1}, {"n": -2}, {"n": 7}]
    store.close()


def test_past_the_fraction_the_snapshot_is_full_again_and_the_delta_goes(tmp_path):
    path = tmp_path / "store.bin"
    store = _seeded(path, delta_max_fraction=0.1)  # 200 keys: a delta holds at most 20
    store.write_batch({"user": {f"u{i}": {"n": -i} for i in range(10)}})
    store.flush()
    assert (tmp_path / "store.bin.delta").exists()
    full_bytes = path.read_bytes()
    store.write_batch({"user": {f"u{i}": {"n": -i} for i in range(10, 40)}})  # 40 changed keys in all
    store.flush()
    assert path.read_bytes() != full_bytes and not (tmp_path / "store.bin.delta").exists()
    assert _store(path).read("user", ["u5", "u30", "u50"]) == [{"n": -5}, {"n": -30}, {"n": 50}]
    # Counting starts again from the new full snapshot.
    store.write_batch({"user": {"u60": {"n": 0}}})
    store.flush()
    assert (tmp_path / "store.bin.delta").exists()
    store.close()


def test_a_fraction_of_zero_always_writes_the_full_state(tmp_path):
    path = tmp_path / "store.bin"
    store = _seeded(path, delta_max_fraction=0)
    store.write_batch({"user": {"u1": {"n": -1}}})
    store.flush()
    assert not (tmp_path / "store.bin.delta").exists()
    assert _store(path).read("user", ["u1"]) == [{"n": -1}]
    store.close()


def test_a_delta_of_another_full_snapshot_is_ignored(tmp_path):
    """A crash between a full snapshot's rename and the old delta's removal leaves a delta that is
    older than the full snapshot: loading must not apply it over newer values."""
    path = tmp_path / "store.bin"
    store = _seeded(path)
    store.write_batch({"user": {"u1": {"n": "old delta"}}})
    store.flush()
    shutil.copy(tmp_path / "store.bin.delta", tmp_path / "stale")
    store.write_batch({"user": {"u1": {"n": "newer"}}})
    store.freeze(full=True)()  # a full snapshot on demand
    assert not (tmp_path / "store.bin.delta").exists()
    shutil.copy(tmp_path / "stale", tmp_path / "store.bin.delta")  # the crash's leftover
    assert _store(path).read("user", ["u1"]) == [{"n": "newer"}]
    store.close()


def test_full_freeze_folds_a_delta_on_disk_even_when_nothing_changed_since(tmp_path):
    path = tmp_path / "store.bin"
    store = _seeded(path)
    store.write_batch({"user": {"u1": {"n": -1}}})
    store.flush()
    assert store.freeze() is None  # nothing changed since the delta
    write = store.freeze(full=True)
    assert write is not None
    write()
    assert not (tmp_path / "store.bin.delta").exists()
    assert store.freeze(full=True) is None  # the full snapshot holds everything now
    assert _store(path).read("user", ["u1"]) == [{"n": -1}]
    store.close()


def test_close_writes_a_delta_when_one_is_due(tmp_path):
    path = tmp_path / "store.bin"
    store = _seeded(path)
    full_bytes = path.read_bytes()
    store.write_batch({"user": {"u1": {"n": -1}}})
    store.close()
    assert path.read_bytes() == full_bytes and (tmp_path / "store.bin.delta").exists()
    reopened = _store(path)
    assert reopened.read("user", ["u1", "u2"]) == [{"n": -1}, {"n": 2}]
    # The delta loaded counts as changed: the next delta still holds it.
    reopened.write_batch({"user": {"u2": {"n": -2}}})
    reopened.close()
    assert path.read_bytes() == full_bytes
    assert _store(path).read("user", ["u1", "u2"]) == [{"n": -1}, {"n": -2}]


def test_a_failed_delta_write_leaves_the_disk_consistent_and_the_next_snapshot_is_full(tmp_path, monkeypatch):
    path = tmp_path / "store.bin"
    store = _seeded(path)  # (its full snapshot by a forked child where fork is safe; a delta never is)
    store.write_batch({"user": {"u1": {"n": -1}}})

    def failing_save(p, data, **_):  # fault injection: a full disk
        raise OSError("no space left on device")

    monkeypatch.setattr(snapshot_files, "save_atomic", failing_save)
    write = store.freeze()
    with pytest.raises(OSError):
        write()
    assert not list(tmp_path.glob(".*.tmp"))
    monkeypatch.undo()
    assert _store(path).read("user", ["u1"]) == [{"n": 1}]  # the last snapshot that landed
    full_bytes = path.read_bytes()
    store.flush()
    assert path.read_bytes() != full_bytes and not (tmp_path / "store.bin.delta").exists()
    assert _store(path).read("user", ["u1"]) == [{"n": -1}]
    store.close()


def test_a_file_from_before_delta_snapshots_loads_and_its_next_snapshot_is_full(tmp_path, monkeypatch):
    path = tmp_path / "store.bin"
    real_save = snapshot_files.save_atomic
    monkeypatch.setattr(snapshot_files, "save_atomic",  # the file as earlier versions wrote it: no base id
                        lambda p, data, tmp=None, replace=True, **_: real_save(p, data, tmp, replace))
    old = _store(path, fork_snapshots=False)
    old.write_batch({"user": {"u1": {"n": 1}}})
    old.close()
    monkeypatch.undo()
    store = _store(path, delta_max_fraction=1.0)  # (a store this small: any change is a large share)
    assert store.read("user", ["u1"]) == [{"n": 1}]
    store.write_batch({"user": {"u2": {"n": 2}}})
    store.flush()
    assert not (tmp_path / "store.bin.delta").exists()  # no id to name: a full snapshot
    store.write_batch({"user": {"u3": {"n": 3}}})
    store.flush()
    assert (tmp_path / "store.bin.delta").exists()
    assert _store(path).read("user", ["u1", "u2", "u3"]) == [{"n": 1}, {"n": 2}, {"n": 3}]
    store.close()


def test_random_writes_deletes_snapshots_and_restarts_match_a_dict(tmp_path):
    """A model check: after any sequence of writes, deletes, snapshots (delta or full) and restarts
    from the files, the store holds what a plain dict holds at its last snapshot."""
    rng = random.Random(0)
    path = tmp_path / "store.bin"
    store = _store(path, fork_snapshots=False, delta_max_fraction=0.3)
    live: dict[str, dict] = {}
    persisted: dict[str, dict] = {}
    for step in range(400):
        op = rng.random()
        key = f"k{rng.randrange(60)}"
        if op < 0.55:
            live[key] = {"v": step}
            store.write_batch({"e": {key: {"v": step}}})
        elif op < 0.75:
            live.pop(key, None)
            store.delete("e", [key])
        elif op < 0.9:
            write = store.freeze(full=rng.random() < 0.2)
            if write is not None:
                write()
            persisted = dict(live)
        else:  # a crash: whatever was not snapshotted is lost
            store = _store(path, fork_snapshots=False, delta_max_fraction=0.3)
            live = dict(persisted)
        got = dict(zip(store.keys("e"), store.read("e", store.keys("e"))))
        assert got == live, f"step {step}"
    store.close()


def test_delta_max_fraction_is_checked():
    with pytest.raises(StoreConfigError, match=r"delta_max_fraction=1.5 must be in \[0, 1\]"):
        InProcessConfig(delta_max_fraction=1.5)
    with pytest.raises(StoreConfigError, match="field 'delta_max_fraction' must be int or float"):
        store_config({"type": "inprocess", "delta_max_fraction": "0.1"})


def test_a_snapshot_child_that_never_finishes_is_killed_not_waited_for_forever(tmp_path):
    """A forked child can deadlock on a lock another thread held at the fork; the parent's wait is bounded.
    Fault injection: a child that sleeps instead of writing."""
    import os
    import time

    from featurizer.store.base import OnlineStoreError
    from featurizer.store.snapshot_files import ForkedWrite

    pid = os.fork()
    if pid == 0:  # the hung child
        time.sleep(60)
        os._exit(0)
    child = ForkedWrite(pid, tmp_path / ".snap.tmp", tmp_path / "snap")
    t0 = time.monotonic()
    assert child._reap(timeout_s=0.3) == -9
    assert time.monotonic() - t0 < 10
    pid = os.fork()
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    import featurizer.store.snapshot_files as files

    old, files.CHILD_TIMEOUT_S = files.CHILD_TIMEOUT_S, 0.3
    try:
        with pytest.raises(OnlineStoreError, match="exit code -9"):
            ForkedWrite(pid, tmp_path / ".snap.tmp", tmp_path / "snap").wait()
    finally:
        files.CHILD_TIMEOUT_S = old
    assert not (tmp_path / "snap").exists()


def test_a_snapshot_loads_the_same_in_chunks(tmp_path, monkeypatch):
    """Loads build their tables a chunk at a time (GIL holds stay short): the chunk size never
    changes what is loaded, across chunk edges too."""
    files = snapshot_files
    data = {"user": {f"u{k}": f"value-{k}".encode() * (k % 3 + 1) for k in range(11)}, "meta": {"m": b"x"}}
    files.save_atomic(tmp_path / "s.bin", data, base_id="b")
    whole = files.load(tmp_path / "s.bin")
    monkeypatch.setattr(files, "LOAD_CHUNK", 3)
    assert files.load(tmp_path / "s.bin") == whole == (data, "b")
