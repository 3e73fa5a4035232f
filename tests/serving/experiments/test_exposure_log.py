import json
import logging
import re
import threading
import time
from datetime import datetime, timezone

import polars as pl
import pytest

from featurizer.contracts.exposures import KEYS, read_exposures, read_exposures_report
from serving.experiments.exposure_log import Exposure, ExposureLog

TS = datetime(2026, 12, 1, 10, 0, 0, 123456, tzinfo=timezone.utc)
NAME = re.compile(r"exposures-\d{8}T\d{6}-\d{6}\.jsonl")


def exposure(i, **kw):
    base = dict(request_id=f"r{i}", user_id=f"u{i}", experiment="exp", variant="control", bundle_version="b1",
                item_ids=[f"i{i}", "x"], ts=TS)
    return Exposure(**{**base, **kw})


def files(d):
    return sorted(d.glob("exposures-*.jsonl"))


def wait_for(predicate, timeout_s=30.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_records_round_trip_in_the_exact_format(tmp_path):
    recorded = [
        exposure(0),
        exposure(1, experiment="", variant="", item_ids=[]),
        exposure(2, user_id="ü-ser \"quoted\"", ts=datetime(2026, 12, 1, 11, 0, tzinfo=timezone.utc)),
    ]
    with ExposureLog(tmp_path) as log:
        for e in recorded:
            log.record(e)
    (f,) = files(tmp_path)
    assert NAME.fullmatch(f.name)
    first = f.read_text(encoding="utf-8").splitlines()[0]
    assert list(json.loads(first)) == list(KEYS)
    assert json.loads(first)["ts"] == "2026-12-01T10:00:00.123456Z"
    assert json.loads(f.read_text(encoding="utf-8").splitlines()[2])["ts"] == "2026-12-01T11:00:00.000000Z"

    df = read_exposures(tmp_path)
    assert df.schema == pl.Schema({"ts": pl.Datetime("us", "UTC"), "request_id": pl.String, "user_id": pl.String,
                                   "experiment": pl.String, "variant": pl.String, "bundle_version": pl.String,
                                   "item_ids": pl.List(pl.String), "teams": pl.List(pl.String)})
    assert df.to_dicts() == [
        {"ts": e.ts, "request_id": e.request_id, "user_id": e.user_id, "experiment": e.experiment,
         "variant": e.variant, "bundle_version": e.bundle_version, "item_ids": list(e.item_ids), "teams": []}
        for e in recorded
    ]
    assert read_exposures(f).equals(df)


def test_an_interleaved_line_carries_each_items_team_and_a_bad_one_is_refused(tmp_path):
    from featurizer.contracts.exposures import ExposureLogError

    with ExposureLog(tmp_path) as log:
        log.record(exposure(0, variant="interleaved", item_ids=["a", "b", "c"], teams=["A", "B", "A"]))
        log.record(exposure(1))
    (f,) = files(tmp_path)
    lines = f.read_text().splitlines()
    assert list(json.loads(lines[0])) == [*KEYS, "teams"] and "teams" not in json.loads(lines[1])
    assert read_exposures(tmp_path)["teams"].to_list() == [["A", "B", "A"], []]
    with pytest.raises(ValueError, match="teams has 2 entries for 3 items"):
        exposure(2, item_ids=["a", "b", "c"], teams=["A", "B"])
    bad = json.loads(lines[0])
    bad["teams"] = ["A", "C", "A"]
    f.write_text(json.dumps(bad) + "\n")
    with pytest.raises(ExposureLogError, match="teams must be a list"):
        read_exposures(tmp_path)


def test_default_ts_is_now_in_utc_and_naive_ts_is_rejected():
    before = datetime.now(timezone.utc)
    assert before <= exposure(0, ts=datetime.now(timezone.utc)).ts
    e = Exposure(request_id="r", user_id="u", experiment="", variant="", bundle_version="b", item_ids=["a"])
    assert e.ts.tzinfo is not None and before <= e.ts and e.item_ids == ("a",)
    with pytest.raises(ValueError, match="timezone-aware"):
        exposure(0, ts=datetime(2026, 12, 1))


def test_close_flushes_and_is_idempotent(tmp_path):
    log = ExposureLog(tmp_path, flush_interval_s=3600, max_buffer=10_000)
    for i in range(50):
        log.record(exposure(i))
    assert files(tmp_path) == []  # nothing written yet: neither the interval nor the size threshold passed
    log.close()
    log.close()
    assert read_exposures(tmp_path)["request_id"].to_list() == [f"r{i}" for i in range(50)]
    log.record(exposure(99))  # after close: dropped and counted, never raised on the request path
    assert log.dropped == 1


def test_flush_writes_without_closing(tmp_path):
    with ExposureLog(tmp_path, flush_interval_s=3600, max_buffer=10_000) as log:
        log.record(exposure(0))
        log.flush()
        assert read_exposures(tmp_path).height == 1
        log.record(exposure(1))
    assert read_exposures(tmp_path).height == 2


def test_buffer_size_triggers_a_write(tmp_path):
    with ExposureLog(tmp_path, flush_interval_s=3600, max_buffer=10) as log:
        for i in range(10):
            log.record(exposure(i))
        wait_for(lambda: log.written == 10)
        assert read_exposures(tmp_path).height == 10


def test_interval_triggers_a_write(tmp_path):
    with ExposureLog(tmp_path, flush_interval_s=0.05, max_buffer=10_000) as log:
        log.record(exposure(0))
        wait_for(lambda: log.written == 1)


def test_rotates_by_size(tmp_path):
    line_bytes = len(exposure(0, request_id="r000").to_json().encode()) + 1  # every line has this length
    with ExposureLog(tmp_path, flush_interval_s=3600, max_buffer=7, segment_bytes=10 * line_bytes) as log:
        for i in range(100):
            log.record(exposure(0, request_id=f"r{i:03d}"))
    written = files(tmp_path)
    assert len(written) == 10 and all(NAME.fullmatch(f.name) for f in written)
    assert all(f.stat().st_size <= 10 * line_bytes for f in written)
    assert read_exposures(tmp_path)["request_id"].to_list() == [f"r{i:03d}" for i in range(100)]


def test_a_new_log_never_appends_to_existing_files(tmp_path):
    for i in range(3):
        with ExposureLog(tmp_path) as log:
            log.record(exposure(i))
    assert len(files(tmp_path)) == 3
    assert sorted(read_exposures(tmp_path)["request_id"].to_list()) == ["r0", "r1", "r2"]


def test_torn_last_line_is_skipped_and_counted(tmp_path, caplog):
    with ExposureLog(tmp_path, segment_bytes=1) as log:  # one record per file
        for i in range(3):
            log.record(exposure(i))
    older, _, newest = files(tmp_path)
    with newest.open("ab") as f:
        f.write(exposure(3).to_json().encode()[:40])
    with older.open("ab") as f:  # a crashed earlier writer leaves its (then newest) file torn too
        f.write(b'{"ts": "2026-12-0')
    with caplog.at_level(logging.WARNING, logger="featurizer.contracts.exposures"):  # the reader lives there
        report = read_exposures_report(tmp_path)
    assert report.frame["request_id"].to_list() == ["r0", "r1", "r2"]
    assert report.torn_lines == [(older, 2), (newest, 2)]
    assert "2 torn" in caplog.text


def test_concurrent_records_lose_nothing(tmp_path):
    n_threads, per_thread = 8, 2000
    log = ExposureLog(tmp_path, flush_interval_s=0.01, max_buffer=50, segment_bytes=64 << 10)
    start = threading.Barrier(n_threads)

    def worker(t):
        start.wait()
        for i in range(per_thread):
            log.record(exposure(0, request_id=f"t{t}-{i}"))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    ids = read_exposures(tmp_path)["request_id"].to_list()
    assert log.dropped == 0 and len(files(tmp_path)) > 1
    assert sorted(ids) == sorted(f"t{t}-{i}" for t in range(n_threads) for i in range(per_thread))
    for t in range(n_threads):  # each thread's records stay in its own order
        assert [i for i in ids if i.startswith(f"t{t}-")] == [f"t{t}-{i}" for i in range(per_thread)]


def stalled_log(tmp_path, **kw):
    release, stalled = threading.Event(), threading.Event()

    def fault_injection_stall_writer(n_records):
        stalled.set()
        release.wait()

    log = ExposureLog(tmp_path, flush_interval_s=0.01, fault_injection_before_write=fault_injection_stall_writer, **kw)
    return log, stalled, release


def test_record_never_waits_on_a_stalled_writer(tmp_path):
    log, stalled, release = stalled_log(tmp_path, max_buffer=10)
    log.record(exposure(0))
    assert stalled.wait(30)  # the writer now sits inside a batch write, holding the I/O lock
    done = threading.Event()

    def request_path():
        for i in range(1, 5001):
            log.record(exposure(i))
        done.set()

    threading.Thread(target=request_path, daemon=True).start()
    try:
        assert done.wait(60), "record() blocked while the writer was stalled"
        assert log.written == 0 and log.dropped == 0
    finally:
        release.set()
        log.close()
    assert read_exposures(tmp_path).height == 5001


def test_records_beyond_the_backlog_are_dropped_counted_and_warned(tmp_path, caplog):
    log, stalled, release = stalled_log(tmp_path, max_buffer=10, max_backlog=100)
    with caplog.at_level(logging.WARNING, logger="serving.experiments.exposure_log"):
        try:
            log.record(exposure(0))
            assert stalled.wait(30)
            for i in range(1, 150):
                log.record(exposure(i))
            assert log.dropped == 50  # in-flight batch + buffer == 100 == max_backlog
        finally:
            release.set()
            log.close()
    assert read_exposures(tmp_path).height == 100
    assert "dropping records" in caplog.text and caplog.text.count("dropping records") == 1


def fault_injection_fail_first_write():
    """A writer hook whose first batch write fails as a full disk would."""
    calls = []

    def hook(n_records):
        calls.append(n_records)
        if len(calls) == 1:
            raise OSError("disk full (injected)")

    return hook


def test_write_errors_are_counted_and_the_writer_keeps_going(tmp_path):
    log = ExposureLog(tmp_path, flush_interval_s=3600, fault_injection_before_write=fault_injection_fail_first_write())
    log.record(exposure(0))
    log.flush()
    log.record(exposure(1))
    log.close()
    assert (log.failed, log.written) == (1, 1)
    assert read_exposures(tmp_path)["request_id"].to_list() == ["r1"]


def test_a_record_with_a_non_string_field_is_skipped_not_written(tmp_path):
    with ExposureLog(tmp_path) as log:
        log.record(exposure(0))
        log.record(exposure(1, item_ids=["a", 7]))
        log.record(exposure(2, user_id=None))
        log.record(exposure(3))
    assert (log.failed, log.written) == (2, 2)
    assert read_exposures(tmp_path)["request_id"].to_list() == ["r0", "r3"]


def test_lost_records_are_counted_per_variant_in_each_writers_losses_file(tmp_path):
    """Drops (writer behind) and write failures, per experiment and variant, in a file of the writer's
    own beside the segments; two writers' files (two replicas) add up, and the exposure reader skips them."""
    from featurizer.contracts.exposures import LOSSES_GLOB, read_losses

    a, b = tmp_path / "replica-a", tmp_path / "replica-b"
    log, stalled, release = stalled_log(a, max_buffer=10, max_backlog=100)
    try:
        log.record(exposure(0))
        assert stalled.wait(30)
        for i in range(1, 150):  # 50 dropped: 30 control, 20 treatment
            log.record(exposure(i, variant="control" if i % 5 < 3 else "treatment"))
    finally:
        release.set()
        log.close()
    assert log.dropped == 50
    other = ExposureLog(b, flush_interval_s=3600, fault_injection_before_write=fault_injection_fail_first_write())
    other.record(exposure(500, variant="treatment"))
    other.flush()
    other.close()
    assert [len(list(d.glob(LOSSES_GLOB))) for d in (a, b)] == [1, 1]
    dropped = read_losses(a)
    assert sum(dropped.values()) == 50 and set(dropped) == {("exp", "control"), ("exp", "treatment")}
    assert read_losses(b) == {("exp", "treatment"): 1}
    assert read_exposures(a).height == 100  # the losses file is not an exposure file
    (b / next(b.glob(LOSSES_GLOB)).name).write_text("{not json")
    with pytest.raises(Exception, match="not an exposure losses file"):
        read_losses(b)


def test_nothing_lost_writes_no_losses_file(tmp_path):
    from featurizer.contracts.exposures import LOSSES_GLOB

    with ExposureLog(tmp_path) as log:
        log.record(exposure(1))
    assert not list(tmp_path.glob(LOSSES_GLOB))
