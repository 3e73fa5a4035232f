"""The features and the applied event-log seq are committed in one atomic step, on both store
backends: a process killed at any point of LogEvents' append -> apply, then restored, counts
every logged event exactly once (tests/serving/ingest/apply_crash_child.py does the killing).

The restored online features are compared with a reference that applies every logged event once
to a fresh store. A control run with the order before the fix (features, then the seq in a second
write, killed between) must differ from it: the comparison can see double counting.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import uuid
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import redis

from featurizer.online.features import OnlineFeatures
from featurizer.store.factory import store_from_config
from featurizer.store.in_process import InProcessStore
from serving.ingest.apply import applied_seq
from serving.ingest.event_log import EventLog
from serving.ingest.log_format import events_frame, read_log
from serving.ingest.restore import restore_online
from tests.serving.ingest.apply_crash_child import BATCH, ITEMS

REPO = Path(__file__).resolve().parents[3]
REDIS_URL = "redis://127.0.0.1:6379/0"
BATCHES = 6


@pytest.fixture(params=["inprocess", "redis"])
def store_config(request, tmp_path):
    if request.param == "inprocess":
        yield {"type": "inprocess", "path": str(tmp_path / "online-store.bin"), "autoflush": True}
        return
    try:
        redis.Redis.from_url(REDIS_URL, socket_timeout=2).ping()
    except redis.ConnectionError as e:  # a missing server is a failure, not a skip
        pytest.fail(f"this test needs the Redis server at {REDIS_URL} ({e})")
    namespace = f"test-apply-{uuid.uuid4().hex}"
    yield {"type": "redis", "url": REDIS_URL, "namespace": namespace}
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{namespace}:*", count=10_000))
    if keys:
        client.delete(*keys)
    client.close()


def crash(state_dir: Path, config: dict, kill_at: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.serving.ingest.apply_crash_child", str(state_dir), json.dumps(config), kill_at,
         str(BATCHES)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, f"the child did not die at {kill_at}: {proc.returncode}\n{proc.stderr}"


def restore(state_dir: Path, config: dict) -> tuple[OnlineFeatures, int, int]:
    """(restored features, the applied seq the store held before the replay, the log's last seq)."""
    store = store_from_config(config)
    before = applied_seq(OnlineFeatures(store, ITEMS))
    log = EventLog(state_dir / "events")
    try:
        online = restore_online(store, ITEMS, events_frame([]), log.replay)
        return online, before, log.last_seq
    finally:
        log.close()


def snapshot(online: OnlineFeatures, at) -> np.ndarray:
    """Every user's features for every item at `at`: counts, recencies, co-occurrence."""
    users = [f"u{k}" for k in range(5)]
    return np.stack([online.features(u, ITEMS["item_id"].to_list(), at) for u in users])


def reference(state_dir: Path) -> OnlineFeatures:
    events = [e for _, e in read_log(state_dir / "events")]
    assert len(events) == BATCHES * BATCH
    online = OnlineFeatures(InProcessStore(), ITEMS)
    online.apply(events_frame(events))
    return online


def end_of(online: OnlineFeatures):
    return online.watermark + timedelta(seconds=1)


@pytest.mark.parametrize("kill_at, committed", [("after_append", False), ("mid_commit", False), ("after_commit", True)])
def test_replay_after_a_kill_counts_nothing_twice(tmp_path, store_config, kill_at, committed):
    crash(tmp_path, store_config, kill_at)
    online, before, last = restore(tmp_path, store_config)
    assert last == BATCHES * BATCH
    # features and seq were committed together: the killed batch is in the store entirely or not at all
    assert before == (last if committed else last - BATCH)
    assert applied_seq(online) == last
    want = reference(tmp_path)
    assert online.watermark == want.watermark
    np.testing.assert_array_equal(snapshot(online, end_of(want)), snapshot(want, end_of(want)))


def test_the_check_sees_double_counting(tmp_path, store_config):
    """Control: the non-atomic order (features committed, seq written after, killed between) replays
    the last batch on top of itself, and the comparison above catches it."""
    crash(tmp_path, store_config, "nonatomic_between")
    online, before, last = restore(tmp_path, store_config)
    assert before == last - BATCH  # the seq was never written ...
    want = reference(tmp_path)
    got, expected = snapshot(online, end_of(want)), snapshot(want, end_of(want))
    assert not np.array_equal(got, expected, equal_nan=True)  # ... so the batch was counted twice
