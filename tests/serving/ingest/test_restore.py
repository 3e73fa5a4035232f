"""serving.ingest.restore: the engine builder shared by the server and batch jobs; the lock-free log reader."""

from __future__ import annotations

import os
from datetime import timedelta

import numpy as np
import pytest

from featurizer.contracts.schema import read_dataset
from featurizer.store.config import RedisConfig
from serving.ingest.apply import apply_logged
from serving.ingest.event_log import EventLog
from serving.ingest.log_format import EventLogCorrupt, LoggedEvent, read_log
from serving.ingest.restore import ReadOnlyStateError, build_engine

T0_US = 1_767_225_600_000_000  # 2026-01-01 UTC


def ev(k: int, ts_us: int = T0_US) -> LoggedEvent:
    return LoggedEvent(ts_us=ts_us + k, user_id=f"u{k % 3}", item_id=f"i{k}", event="click")


def test_read_log_beside_a_live_writer(tmp_path):
    assert list(read_log(tmp_path / "none")) == []
    with EventLog(tmp_path / "ev", segment_bytes=300) as w:  # holds the writer lock; small segments
        for k in range(12):
            w.append([ev(k)])
        assert [e for _, e in read_log(tmp_path / "ev")] == [ev(k) for k in range(12)]
        assert [s for s, _ in read_log(tmp_path / "ev", after_seq=9)] == [10, 11, 12]
        last = max((tmp_path / "ev").glob("events-*.log"))
        with open(last, "ab") as fh:  # a record still being written: a partial header
            fh.write(b"\x10\x00")
        assert len(list(read_log(tmp_path / "ev"))) == 12


def test_read_log_raises_on_damage_before_the_tail(tmp_path):
    with EventLog(tmp_path / "ev", segment_bytes=300) as w:
        for k in range(12):
            w.append([ev(k)])
    first = min((tmp_path / "ev").glob("events-*.log"))
    data = bytearray(first.read_bytes())
    data[-3] ^= 0xFF
    first.write_bytes(bytes(data))
    with pytest.raises(EventLogCorrupt):
        list(read_log(tmp_path / "ev"))


def test_read_only_build_sees_the_log_and_writes_nothing(small_shop, tmp_path):
    state = tmp_path / "state"
    shop = read_dataset(small_shop)
    users, items = shop.events["user_id"].unique().sort().to_list()[:3], shop.items["item_id"].to_list()
    last_us = int(shop.events["ts"].max().timestamp() * 1e6)
    built = build_engine(small_shop, state)
    seq = built.event_log.append([LoggedEvent(last_us + 10_000_000, users[0], items[0], "purchase")])
    apply_logged(built.engine.online, [LoggedEvent(last_us + 10_000_000, users[0], items[0], "purchase")], seq, seq - 1)
    built.close()  # snapshot: data + one logged event
    with EventLog(state / "events") as w:  # logged after the snapshot; a live writer holds the lock
        w.append([LoggedEvent(last_us + 20_000_000, users[1], items[1], "click")])
        snap = state / "online-store.bin"
        before = (snap.stat().st_mtime_ns, snap.read_bytes())
        ro = build_engine(small_shop, state, read_only=True)
        mark = ro.engine.online.watermark
        assert int(mark.timestamp() * 1e6) == last_us + 20_000_000
        t = mark + timedelta(hours=1)
        got = ro.engine.online.features(users[1], items[:20], t)
        ro.close()
        assert (snap.stat().st_mtime_ns, snap.read_bytes()) == before
    writer = build_engine(small_shop, state)  # the server's way: replays the same log
    try:
        np.testing.assert_array_equal(writer.engine.online.features(users[1], items[:20], t), got)
    finally:
        writer.close()


def test_read_only_refuses_a_live_redis_store(small_shop, tmp_path):
    with pytest.raises(ReadOnlyStateError, match="redis"):
        build_engine(small_shop, tmp_path, RedisConfig(), read_only=True)
    assert not os.path.exists(tmp_path / "events")
