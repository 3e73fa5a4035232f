"""Retention compaction (serving/retention.py, issue 18 item 4) on the real logs: the event log
deletes old closed segments that a persisted state holds, never the open one nor an event the
snapshot lacks; the exposure log deletes old files, never its open one; a quiet log's open
segment closes at its age; readers skip what was deleted under them."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from featurizer.contracts.exposures import FILE_GLOB, LOSSES_GLOB
from featurizer.errors import ConfigError
from serving.config import Limits, ServeConfig
from serving.experiments.exposure_log import Exposure, ExposureLog
from serving.ingest.event_log import EventLog
from serving.ingest.log_format import LoggedEvent, read_log
from serving.retention import DAY_S, Retention, RetentionConfig

T0_US = 1_780_000_000_000_000


def events(first: int, n: int) -> list[LoggedEvent]:
    return [LoggedEvent(T0_US + k, f"u{k % 3}", f"i{k % 5}", "click", f"e{k}") for k in range(first, first + n)]


def age(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("events-*.log"))


def old_log(directory: Path, n: int = 3) -> EventLog:
    """A log of n segments of 10 events each (seqs 1-10, 11-20, ...), all written 3 days ago."""
    log = EventLog(directory, fsync=False, segment_max_age_s=0.0)  # every append opens a segment
    for k in range(n):
        log.append(events(10 * k, 10))
    for f in segments(directory):
        age(f, 3 * DAY_S)
    return log


def test_old_covered_closed_segments_go_the_open_one_and_uncovered_ones_stay(tmp_path):
    log = old_log(tmp_path / "events", 4)
    files = segments(tmp_path / "events")
    assert len(files) == 4
    assert log.compact(DAY_S, covered_seq=25) == 20  # segments 1-10 and 11-20; 21-30 holds seqs past 25
    assert segments(tmp_path / "events") == files[2:]
    assert log.compact(DAY_S, covered_seq=40) == 10  # never the open segment (31-40), however old
    assert segments(tmp_path / "events") == files[3:]
    age(files[3], 0)
    log.append(events(40, 5))
    assert [s for s, _ in log.replay()] == list(range(31, 46))  # what is left, in order
    log.close()
    reopened = EventLog(tmp_path / "events", fsync=False)  # a log whose first segments are gone opens
    assert reopened.last_seq == 45 and [s for s, _ in read_log(tmp_path / "events")] == list(range(31, 46))
    reopened.close()


def test_recent_segments_stay_and_compaction_stops_at_the_first_kept(tmp_path):
    log = old_log(tmp_path / "events")
    files = segments(tmp_path / "events")
    age(files[0], 0.5 * DAY_S)  # younger than the age: kept, and so is everything after it
    age(files[1], 3 * DAY_S)
    assert log.compact(DAY_S, covered_seq=30) == 0 and segments(tmp_path / "events") == files
    log.close()


def test_a_quiet_log_closes_its_segment_at_its_age_and_not_before(tmp_path):
    log = EventLog(tmp_path / "events", fsync=False, segment_max_age_s=3600.0)
    log.append(events(0, 5))
    log.append(events(5, 5))
    assert len(segments(tmp_path / "events")) == 1
    log._opened_at -= 3601  # the open segment is an hour old
    log.append(events(10, 5))
    assert len(segments(tmp_path / "events")) == 2 and [s for s, _ in log.replay()] == list(range(1, 16))
    log.close()


def test_a_replay_started_before_a_compaction_skips_the_deleted_segment(tmp_path):
    log = old_log(tmp_path / "events")
    replay = log.replay()
    assert next(replay)[0] == 1  # the first segment is open in the reader
    assert log.compact(DAY_S, covered_seq=30) == 20
    assert [s for s, _ in replay] == list(range(2, 11)) + list(range(21, 31))  # 11-20 gone meanwhile
    log.close()


def test_exposure_files_older_than_the_age_go_the_open_one_and_own_counts_stay(tmp_path):
    exposures = ExposureLog(tmp_path, flush_interval_s=3600, segment_max_age_s=0.0)
    for k in range(3):  # each flush closes the (aged) file and opens another
        exposures.record(Exposure(request_id=f"r{k}", user_id="p1_x", experiment="", variant="", bundle_version="v",
                                  item_ids=("a", "b")))
        exposures.flush()
    (tmp_path / "exposure-losses-20200101T000000-1.json").write_text("{}")  # an old run's counts
    files = sorted(tmp_path.glob(FILE_GLOB))
    assert len(files) == 3
    for f in [*files, *tmp_path.glob(LOSSES_GLOB)]:
        age(f, 3 * DAY_S)
    assert exposures.expire(DAY_S) == 3  # two closed files and the old run's counts; the open file stays
    assert sorted(tmp_path.glob(FILE_GLOB)) == files[2:] and not list(tmp_path.glob(LOSSES_GLOB))
    exposures.close()


def test_retention_runs_both_with_the_covered_seq_it_is_given(tmp_path):
    log = old_log(tmp_path / "events")
    exposures = ExposureLog(tmp_path / "exposures", flush_interval_s=3600)
    covered = [0]
    retention = Retention(RetentionConfig(events_s=DAY_S, exposures_s=DAY_S), log, exposures, lambda: covered[0])
    assert retention.run_once() == {"events": 0, "exposure_files": 0}  # no snapshot holds anything yet
    covered[0] = 30
    assert retention.run_once() == {"events": 20, "exposure_files": 0}
    assert Retention(RetentionConfig(), log, exposures, lambda: 30).run_once() == {"events": 0, "exposure_files": 0}
    exposures.close()
    log.close()


def test_event_retention_shorter_than_the_exactly_once_window_is_refused():
    with pytest.raises(ConfigError, match="exactly-once window"):
        ServeConfig(bundle_dir=Path("b"), data_dir=Path("d"), retention=RetentionConfig(events_s=3600))
    ServeConfig(bundle_dir=Path("b"), data_dir=Path("d"), retention=RetentionConfig(events_s=3600),
                limits=Limits(dedup_window_s=3600))
    with pytest.raises(ConfigError, match="retention ages"):
        RetentionConfig(exposures_s=-1)
