"""EventLog: round trip, segments, torn-tail recovery, corruption, group commit, the writer lock,
OnlineFeatures on its frame, and SIGKILL of a real writer process."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import polars as pl
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from featurizer.contracts.schema import validate_events, validate_items
from featurizer.online.features import OnlineFeatures
from featurizer.store.in_process import InProcessStore
from serving.ingest.event_log import EventLog
from serving.ingest.log_format import (
    SEGMENT_HEADER,
    EventLogCorrupt,
    EventLogError,
    EventLogLocked,
    LoggedEvent,
    events_frame,
)
from tests.serving.ingest.event_log_crash_writer import event_for

REPO = Path(__file__).resolve().parents[3]
T0_US = 1_767_225_600_000_000  # 2026-01-01 UTC


def events(n: int, start: int = 0) -> list[LoggedEvent]:
    return [event_for(f"e{k}") for k in range(start, start + n)]


def segments(d: Path) -> list[Path]:
    return sorted(d.glob("events-*.log"))


def test_round_trip_and_reopen(tmp_path):
    batch = events(3) + [LoggedEvent(T0_US, "ü", "i1", "purchase")]  # defaults, non-ASCII
    with EventLog(tmp_path) as log:
        assert log.last_seq == 0 and list(log.replay()) == []
        assert log.append(batch) == 4
        assert log.append(events(2, start=10)) == 6
        assert log.append([]) == 6
        assert list(log.replay()) == list(enumerate(batch + events(2, start=10), start=1))
        assert [s for s, _ in log.replay(after_seq=4)] == [5, 6]
    with EventLog(tmp_path) as log:
        assert log.last_seq == 6
        assert log.append(events(1, start=20)) == 7
        assert [e for _, e in log.replay(after_seq=6)] == events(1, start=20)
    assert [p.name for p in segments(tmp_path)] == ["events-00000000000000000001.log"]


def test_bad_events_are_refused_before_writing(tmp_path):
    with EventLog(tmp_path) as log:
        with pytest.raises(ValueError, match=r"events\[1\]\.event 'view'"):
            log.append([events(1)[0], LoggedEvent(T0_US, "u", "i", "view")])
        with pytest.raises(ValueError, match="must not be empty"):
            log.append([LoggedEvent(T0_US, "", "i", "click")])
        with pytest.raises(TypeError, match="LoggedEvent"):
            log.append([{"user_id": "u"}])
        assert log.last_seq == 0


def test_rotation_and_replay_across_segments(tmp_path):
    batches = [events(3, start=3 * k) for k in range(40)]
    with EventLog(tmp_path, segment_bytes=1024) as log:
        for b in batches:
            log.append(b)
        assert log.last_seq == 120
        want = list(enumerate([e for b in batches for e in b], start=1))
        firsts = [int(p.name[7:27]) for p in segments(tmp_path)]
        assert len(firsts) > 4 and firsts[0] == 1
        for after in [0, 1, firsts[2] - 2, firsts[2] - 1, firsts[2], 119, 120, 500]:
            assert list(log.replay(after_seq=after)) == want[after:]
    for p in segments(tmp_path)[:-1]:  # rotation happens once a segment passes segment_bytes
        assert p.stat().st_size >= 1024
    with EventLog(tmp_path, segment_bytes=1024) as log:
        assert list(log.replay()) == want
        assert log.append(events(1, start=999)) == 121


@pytest.mark.parametrize("damage", ["cut_record", "cut_header", "garbage", "zeros", "bad_crc_last"])
def test_torn_tail_is_truncated(tmp_path, caplog, damage):
    with EventLog(tmp_path) as log:
        log.append(events(5))
        log.append(events(5, start=5))
    seg = segments(tmp_path)[-1]
    good = seg.read_bytes()
    with EventLog(tmp_path) as log:
        log.append(events(5, start=10))
    full = seg.read_bytes()
    tail = {
        "cut_record": full[: len(full) - 7],
        "cut_header": full[: len(good) + 9],
        "garbage": good + b"\xde\xad\xbe\xef" * 8,
        "zeros": good + bytes(64),
        "bad_crc_last": full[:-1] + bytes([full[-1] ^ 0xFF]),
    }[damage]
    seg.write_bytes(tail)
    with caplog.at_level(logging.WARNING, logger="serving.ingest.event_log"):
        log = EventLog(tmp_path)
    assert f"torn tail of {len(tail) - len(good)} bytes" in caplog.text
    assert seg.read_bytes() == good
    assert log.last_seq == 10 and [e for _, e in log.replay()] == events(10)
    assert log.append(events(1, start=50)) == 11
    log.close()
    with EventLog(tmp_path) as log:
        assert [e for _, e in log.replay()] == events(10) + events(1, start=50)


def test_corruption_in_the_middle_raises(tmp_path):
    with EventLog(tmp_path) as log:
        for k in range(3):
            log.append(events(4, start=4 * k))
    seg = segments(tmp_path)[-1]
    data = bytearray(seg.read_bytes())
    offset = SEGMENT_HEADER.size + 30  # inside the first record's payload
    data[offset] ^= 0x01
    seg.write_bytes(bytes(data))
    with pytest.raises(EventLogCorrupt, match=rf"{seg.name}: byte {SEGMENT_HEADER.size}: bad record CRC") as e:
        EventLog(tmp_path)
    assert e.value.path == seg and e.value.offset == SEGMENT_HEADER.size
    assert seg.read_bytes() == data  # nothing truncated
    with pytest.raises(EventLogCorrupt):  # not EventLogLocked: the failed open released its lock
        EventLog(tmp_path)


def test_damage_in_an_earlier_segment_raises_even_at_its_end(tmp_path):
    with EventLog(tmp_path, segment_bytes=512) as log:
        for k in range(20):
            log.append(events(2, start=2 * k))
    first, second, third = segments(tmp_path)[:3]
    data = first.read_bytes()
    first.write_bytes(data[:-3])  # a cut record, but not in the last segment
    with pytest.raises(EventLogCorrupt, match=rf"{first.name}: byte \d+: record of \d+ bytes runs past"):
        EventLog(tmp_path, segment_bytes=512)
    first.write_bytes(data)
    second.unlink()
    with pytest.raises(EventLogCorrupt, match=rf"{third.name}: byte 0: segment starts at seq \d+, expected \d+ \(a segment is missing\)"):
        EventLog(tmp_path, segment_bytes=512)


def test_group_commit_shares_fsyncs(tmp_path):
    calls = [events(1 + k % 3, start=10 * k) for k in range(64)]
    with EventLog(tmp_path) as log:
        before = log.fsync_count

        async def run() -> list[int]:
            return await asyncio.gather(*(log.append_async(b) for b in calls))

        lasts = asyncio.run(run())
        fsyncs = log.fsync_count - before
        got = dict(log.replay())
    assert 1 <= fsyncs < len(calls)
    assert len(got) == sum(map(len, calls)) == max(lasts)
    for last, batch in zip(lasts, calls):  # each call's events are contiguous at the seqs it was told
        assert [got[s] for s in range(last - len(batch) + 1, last + 1)] == batch


def test_concurrent_threads_get_disjoint_seqs(tmp_path):
    calls = [events(2, start=10 * k) for k in range(40)]
    with EventLog(tmp_path) as log, ThreadPoolExecutor(8) as pool:
        lasts = list(pool.map(log.append, calls))
        got = dict(log.replay())
    assert sorted(lasts) == list(range(2, 81, 2))
    for last, batch in zip(lasts, calls):
        assert [got[last - 1], got[last]] == batch


def test_frame_feeds_online_features(tmp_path):
    items = validate_items(pl.DataFrame({"item_id": ["i1", "i2"], "title": ["a", "b"], "price": [5.0, 8.0]}))
    batch = [
        LoggedEvent(T0_US, "u1", "i1", "impression", request_id="r1", position=1),
        LoggedEvent(T0_US, "u1", "i2", "impression", request_id="r1", position=2),
        LoggedEvent(T0_US + 5_000_000, "u1", "i2", "click", request_id="r1", position=2, event_id="c1"),
        LoggedEvent(T0_US + 9_000_000, "u2", "i1", "purchase"),
    ]
    with EventLog(tmp_path) as log:
        log.append(batch)
        frame, tail = log.frame(), log.frame(after_seq=3)
        assert log.frame(after_seq=4).height == 0
    assert frame.schema == pl.Schema(
        {"ts": pl.Datetime("us", "UTC"), "user_id": pl.Utf8, "item_id": pl.Utf8, "event": pl.Enum(["impression", "click", "add_to_cart", "purchase"]),
         "request_id": pl.Utf8, "position": pl.Int64}
    )
    assert frame["request_id"].to_list() == ["r1", "r1", "r1", None]
    assert frame["position"].to_list() == [0, 1, 1, None]  # wire slots 1, 2 are the contract's 0, 1
    assert frame["ts"].dt.epoch("us").to_list() == [e.ts_us for e in batch]
    assert validate_events(frame).drop("seq_pos").with_columns(pl.col("position").cast(pl.Int64)).equals(frame)
    assert tail["user_id"].to_list() == ["u2"]
    assert events_frame(batch).equals(frame) and events_frame([]).schema == frame.schema

    online = OnlineFeatures(InProcessStore(), items)
    online.apply(frame)
    assert online.watermark == frame["ts"].max()
    assert online.history("u1", online.watermark, 5) == ["i2"]


def test_second_writer_is_refused(tmp_path):
    with EventLog(tmp_path) as log:
        log.append(events(1))
        with pytest.raises(EventLogLocked, match=rf"another EventLog \(pid {os.getpid()}\)"):
            EventLog(tmp_path)
        other = subprocess.run(
            [sys.executable, "-c", f"from serving.ingest.event_log import EventLog; EventLog({str(tmp_path)!r})"],
            cwd=REPO, capture_output=True, text=True, timeout=60,
        )
        assert other.returncode != 0 and "EventLogLocked" in other.stderr, other.stderr
    with EventLog(tmp_path) as log:  # released on close
        assert log.last_seq == 1


def test_closed_log_refuses_appends(tmp_path):
    log = EventLog(tmp_path)
    log.close()
    log.close()
    with pytest.raises(EventLogError, match="closed"):
        log.append(events(1))


@pytest.mark.parametrize("seed,mode", [(1, "sync"), (2, "async"), (3, "sync")])
def test_sigkill_loses_no_acknowledged_event(tmp_path, seed, mode):
    rng = random.Random(seed)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.serving.ingest.event_log_crash_writer", str(tmp_path), str(seed), mode],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    watchdog = threading.Timer(120, proc.kill)
    watchdog.start()
    lines = []
    try:
        for _ in range(rng.randint(5, 60)):
            lines.append(proc.stdout.readline())
            assert lines[-1], proc.stderr.read()
        time.sleep(rng.uniform(0, 0.05))
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
    finally:
        watchdog.cancel()
    assert proc.returncode == -signal.SIGKILL, err
    lines += out.splitlines(keepends=True)
    acks = [line.split() for line in lines if line.endswith("\n")]  # a line cut by the kill is not checked

    with EventLog(tmp_path) as log:
        got = dict(log.replay())
        assert sorted(got) == list(range(1, log.last_seq + 1))
    assert acks
    for last, ids in acks:
        ids = ids.split(",")
        seqs = range(int(last) - len(ids) + 1, int(last) + 1)
        assert [got.get(s) for s in seqs] == [event_for(i) for i in ids]


def test_a_logged_position_means_the_same_slot_as_in_a_data_file():
    """Issue 14, problem 12: Event.position is 1-based on the wire (0 = not shown); the data contract,
    which training reads, is 0-based (null = not shown). The conversion happens in events_frame."""
    from semrank.ranking.v1 import ranking_service_pb2 as pb
    from serving.api.convert import to_logged

    wire = [pb.Event(ts=Timestamp(seconds=1_767_225_600 + k), user_id="u1", item_id=f"i{k}", type=pb.EVENT_TYPE_IMPRESSION,
                     request_id="r1", position=p) for k, p in enumerate((1, 2, 3, 0))]
    frame = events_frame([to_logged(e) for e in wire])
    assert frame["position"].to_list() == [0, 1, 2, None]  # the first slot of list r1 is position 0, as in synth data
    validate_events(frame, "logged events")
