"""The in-process store's snapshot (`flush`) holds the store's lock only while it copies the data:
reads and writes on other threads go on while the copy is packed and fsynced (issue 13's p99
stall: bench/snapshot_stall.py measures it), and a write made meanwhile is in the next snapshot."""

from __future__ import annotations

import threading

import featurizer.store.in_process as in_process
from featurizer.store.config import InProcessConfig
from featurizer.store.in_process import InProcessStore


def test_reads_and_writes_go_on_while_a_snapshot_is_written(tmp_path, monkeypatch):
    path = tmp_path / "store.bin"
    store = InProcessStore(InProcessConfig(path=str(path)))
    store.write_batch({"user": {"u1": {"n": 1}}})
    entered, release = threading.Event(), threading.Event()
    real_save = in_process._save_atomic

    def blocking_save(p, data):  # fault injection: a slow disk, held until the test releases it
        entered.set()
        assert release.wait(30)
        real_save(p, data)

    monkeypatch.setattr(in_process, "_save_atomic", blocking_save)
    flusher = threading.Thread(target=store.flush)
    flusher.start()
    assert entered.wait(30)
    # The snapshot is being written: the store still answers, and takes writes.
    assert store.read("user", ["u1"]) == [{"n": 1}]
    store.write_batch({"user": {"u2": {"n": 2}}})
    release.set()
    flusher.join(30)
    monkeypatch.setattr(in_process, "_save_atomic", real_save)

    assert InProcessStore(InProcessConfig(path=str(path))).read("user", ["u1", "u2"]) == [{"n": 1}, None]
    store.flush()  # the write made during the first snapshot is in the next one
    assert InProcessStore(InProcessConfig(path=str(path))).read("user", ["u1", "u2"]) == [{"n": 1}, {"n": 2}]
    store.close()


def test_freeze_copies_now_and_writes_later_never_over_a_newer_copy(tmp_path):
    """`freeze` is the snapshot in two steps (the server copies under its apply lock and writes after
    releasing it): the copy holds the state of its moment, and a write of an older copy after a newer
    one leaves the newer on disk."""
    path = tmp_path / "store.bin"
    store = InProcessStore(InProcessConfig(path=str(path)))
    on_disk = lambda: InProcessStore(InProcessConfig(path=str(path))).read("user", ["u1", "u2"])  # noqa: E731
    store.write_batch({"user": {"u1": {"n": 1}}})
    older = store.freeze()
    store.write_batch({"user": {"u2": {"n": 2}}})
    assert not path.exists()  # nothing written by the copy itself
    newer = store.freeze()
    assert store.freeze() is None  # nothing changed since the last copy
    newer()
    assert on_disk() == [{"n": 1}, {"n": 2}]
    older()  # late: skipped
    assert on_disk() == [{"n": 1}, {"n": 2}]
    store.write_batch({"user": {"u1": {"n": 3}}})
    late = store.freeze()
    store.close()  # close writes the newest state; the copy taken before it never lands over it
    late()
    assert on_disk() == [{"n": 3}, {"n": 2}]


def test_a_failed_write_of_a_frozen_copy_is_retried_by_the_next_flush(tmp_path, monkeypatch):
    path = tmp_path / "store.bin"
    store = InProcessStore(InProcessConfig(path=str(path)))
    store.write_batch({"user": {"u1": {"n": 1}}})
    write = store.freeze()

    def failing_save(p, data):  # fault injection: a full disk
        raise OSError("no space left on device")

    monkeypatch.setattr(in_process, "_save_atomic", failing_save)
    try:
        write()
    except OSError:
        pass
    else:
        raise AssertionError("the failed write was swallowed")
    monkeypatch.undo()
    store.flush()  # the state is dirty again, so this writes it
    assert InProcessStore(InProcessConfig(path=str(path))).read("user", ["u1"]) == [{"n": 1}]
    store.close()
