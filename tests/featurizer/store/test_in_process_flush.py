"""The in-process store's snapshot (`flush`) holds the store's lock only while it copies the data:
reads and writes on other threads go on while the copy is packed and fsynced (issue 13's p99
stall: bench/snapshot_stall.py measures it), and a write made meanwhile is in the next snapshot."""

from __future__ import annotations

import threading

import pytest

import featurizer.store.snapshot_files as snapshot_files
from featurizer.store.base import OnlineStoreError
from featurizer.store.config import InProcessConfig
from featurizer.store.in_process import InProcessStore


def test_reads_and_writes_go_on_while_a_snapshot_is_written(tmp_path, monkeypatch):
    path = tmp_path / "store.bin"
    store = InProcessStore(InProcessConfig(path=str(path), fork_snapshots=False))  # the copy path, in this process
    store.write_batch({"user": {"u1": {"n": 1}}})
    entered, release = threading.Event(), threading.Event()
    real_save = snapshot_files.save_atomic

    def blocking_save(p, data, **kw):  # fault injection: a slow disk, held until the test releases it
        entered.set()
        assert release.wait(30)
        real_save(p, data, **kw)

    monkeypatch.setattr(snapshot_files, "save_atomic", blocking_save)
    flusher = threading.Thread(target=store.flush)
    flusher.start()
    assert entered.wait(30)
    # The snapshot is being written: the store still answers, and takes writes.
    assert store.read("user", ["u1"]) == [{"n": 1}]
    store.write_batch({"user": {"u2": {"n": 2}}})
    release.set()
    flusher.join(30)
    monkeypatch.setattr(snapshot_files, "save_atomic", real_save)

    assert InProcessStore(InProcessConfig(path=str(path))).read("user", ["u1", "u2"]) == [{"n": 1}, None]
    store.flush()  # the write made during the first snapshot is in the next one
    assert InProcessStore(InProcessConfig(path=str(path))).read("user", ["u1", "u2"]) == [{"n": 1}, {"n": 2}]
    store.close()


@pytest.mark.parametrize("fork", [True, False])
def test_freeze_copies_now_and_writes_later_never_over_a_newer_copy(tmp_path, fork):
    """`freeze` is the snapshot in two steps (the server takes it under its apply lock and writes it
    after releasing it): what is written is the state of its moment (a forked child's memory, or a
    copy), and a write of an older state after a newer one leaves the newer on disk."""
    path = tmp_path / "store.bin"
    store = InProcessStore(InProcessConfig(path=str(path), fork_snapshots=fork))
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


@pytest.mark.parametrize("fork", [True, False])
def test_a_failed_write_of_a_frozen_copy_is_retried_by_the_next_flush(tmp_path, monkeypatch, fork):
    """Fault injection: the write fails (in the forked child, which inherits the patched function, or
    in this process); the state is dirty again and the next flush writes it."""
    path = tmp_path / "store.bin"
    store = InProcessStore(InProcessConfig(path=str(path), fork_snapshots=fork))
    store.write_batch({"user": {"u1": {"n": 1}}})

    def failing_save(p, data, **_):  # fault injection: a full disk
        raise OSError("no space left on device")

    monkeypatch.setattr(snapshot_files, "save_atomic", failing_save)  # (before the fork: the child runs it)
    write = store.freeze()
    with pytest.raises(OnlineStoreError if fork else OSError):  # the child's exit code, or the error itself
        write()
    monkeypatch.undo()
    assert not list(tmp_path.glob(".*.tmp")), "a temp file was left behind"
    store.flush()  # the state is dirty again, so this writes it
    assert InProcessStore(InProcessConfig(path=str(path))).read("user", ["u1"]) == [{"n": 1}]
    store.close()


_FORK_CHECK = """
import os, sys
if sys.argv[1] == "serving-first":
    import serving  # sets GRPC_ENABLE_FORK_SUPPORT=false while grpc is not loaded yet
import grpc
from featurizer.store.config import InProcessConfig
from featurizer.store.in_process import InProcessStore
from featurizer.store.snapshot_write import fork_is_safe

forks = []
real_fork = os.fork
os.fork = lambda: forks.append(1) or real_fork()
store = InProcessStore(InProcessConfig(path=sys.argv[2]))
store.write_batch({"user": {"u1": {"n": 1}}})
store.freeze()()
store.close()
print(os.environ.get("GRPC_ENABLE_FORK_SUPPORT"), fork_is_safe(), len(forks))
"""


@pytest.mark.parametrize("order, expected", [("serving-first", "false True 1"), ("grpc-first", "None False 0")])
def test_the_snapshot_writer_forks_only_where_grpc_runs_no_fork_handlers(tmp_path, order, expected):
    """gRPC's core fork handlers (on by default in grpcio's build) can write on the parent's
    connections from the child. Importing serving before grpc turns them off, and the store forks;
    where grpc came first with them on, the store copies in this process and still writes the file."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "GRPC_ENABLE_FORK_SUPPORT"}
    path = tmp_path / "store.bin"
    out = subprocess.run([sys.executable, "-c", _FORK_CHECK, order, str(path)], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[-2] == expected, out.stdout
    assert InProcessStore(InProcessConfig(path=str(path))).read("user", ["u1"]) == [{"n": 1}]
