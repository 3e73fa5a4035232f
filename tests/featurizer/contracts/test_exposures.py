"""The exposure log reader (featurizer.contracts.exposures): exact format, torn last lines, errors naming file:line.

Files written by the real writer are tested in tests/serving/experiments/test_exposure_log.py."""

import json
import logging
from datetime import datetime, timezone

import polars as pl
import pytest

from featurizer.contracts.exposures import (
    FILE_GLOB,
    KEYS,
    SCHEMA,
    ExposureLogError,
    exposure_files,
    read_exposures,
    read_exposures_report,
)

TS = "2026-12-01T10:00:00.123456Z"


def record(i, **kw) -> str:
    base = {"ts": TS, "request_id": f"r{i}", "user_id": f"u{i}", "experiment": "exp", "variant": "control",
            "bundle_version": "b1", "item_ids": [f"i{i}", "x"]}
    return json.dumps({**base, **kw})


def name(k: int) -> str:
    return f"exposures-20261201T10000{k}-00000{k}.jsonl"


def test_reads_the_exact_format_in_file_name_order(tmp_path):
    (tmp_path / name(2)).write_text(record(2, ts="2026-12-01T09:00:00.000000Z") + "\n")
    (tmp_path / name(1)).write_text(record(0, experiment="", variant="", item_ids=[]) + "\n" + record(1) + "\n")
    (tmp_path / "other.jsonl").write_text("not an exposure file\n")  # outside FILE_GLOB: not read
    read = read_exposures_report(tmp_path)
    assert read.files == [tmp_path / name(1), tmp_path / name(2)] == exposure_files(tmp_path)
    assert read.frame.schema == SCHEMA and read.frame.columns == [*KEYS, "teams"] and read.torn_lines == []
    assert read.frame["request_id"].to_list() == ["r0", "r1", "r2"]  # file order; not sorted by ts here
    assert read.frame.row(0, named=True) == {
        "ts": datetime(2026, 12, 1, 10, 0, 0, 123456, tzinfo=timezone.utc), "request_id": "r0", "user_id": "u0",
        "experiment": "", "variant": "", "bundle_version": "b1", "item_ids": [], "teams": []}
    assert read_exposures(tmp_path / name(2))["request_id"].to_list() == ["r2"]
    assert FILE_GLOB == "exposures-*.jsonl"


def test_torn_last_line_is_skipped_in_any_file_not_only_the_newest(tmp_path, caplog):
    """Writers never append to an older file, so a crashed writer's torn line stays a last line for good."""
    older, newest = tmp_path / name(1), tmp_path / name(2)
    older.write_text(record(0) + "\n" + record(1)[:25])  # crashed mid-write; a new process started `newest`
    newest.write_text(record(2) + "\n" + record(3)[:40])  # being written now
    with caplog.at_level(logging.WARNING, logger="featurizer.contracts.exposures"):
        read = read_exposures_report(tmp_path)
    assert read.frame["request_id"].to_list() == ["r0", "r2"]
    assert read.torn_lines == [(older, 2), (newest, 2)]
    assert "2 torn" in caplog.text and f"{older}:2" in caplog.text


def test_unterminated_but_complete_last_line_is_kept(tmp_path):
    p = tmp_path / name(1)
    p.write_text(record(0) + "\n" + record(1))
    read = read_exposures_report(p)
    assert read.frame["request_id"].to_list() == ["r0", "r1"] and read.torn_lines == []


def test_a_bad_unterminated_last_line_that_parses_is_an_error_not_a_torn_write(tmp_path):
    p = tmp_path / name(1)
    p.write_text(record(0) + "\n" + json.dumps({"ts": TS}))
    with pytest.raises(ExposureLogError, match=rf"{name(1)}:2: expected exactly the keys"):
        read_exposures(p)


@pytest.mark.parametrize(
    "bad_line, words",
    [
        ("{not json", "not valid JSON"),
        ("", "not valid JSON"),  # a blank line inside a file is not a record
        ('["a list"]', "expected exactly the keys"),
        (json.dumps({k: "x" for k in KEYS[:-1]}), "expected exactly the keys"),  # item_ids missing
        (json.dumps({k: v for k, v in json.loads(record(0)).items() if k != "experiment"}), "expected exactly the keys"),
        (record(0, extra=1), "expected exactly the keys"),
        (record(0, user_id=7), "user_id must be a string"),
        (record(0, experiment=None), "experiment must be a string"),
        (record(0, item_ids=[1]), "item_ids must be a list of strings"),
        (record(0, item_ids="i1"), "item_ids must be a list of strings"),
        (record(0, ts="yesterday"), "ts must look like"),
        (record(0, ts="2026-12-01T10:00:00Z"), "ts must look like"),  # 6 fractional digits, always
        (record(0, ts="2026-12-01T10:00:00.123Z"), "ts must look like"),
        (record(0, ts="2026-12-01T10:00:00.123456+00:00"), "ts must look like"),
    ],
)
def test_bad_lines_raise_with_file_and_line(tmp_path, bad_line, words):
    p = tmp_path / name(1)
    p.write_text(f"{record(0)}\n{bad_line}\n{record(2)}\n")  # newline-terminated, so never mistaken for a torn write
    with pytest.raises(ExposureLogError) as e:
        read_exposures(tmp_path)
    assert f"{p}:2: " in str(e.value) and words in str(e.value)


def test_line_numbers_count_per_file(tmp_path):
    (tmp_path / name(1)).write_text(record(0) + "\n" + record(1) + "\n")
    (tmp_path / name(2)).write_text(record(2) + "\n" + record(3, ts="soon") + "\n")
    with pytest.raises(ExposureLogError, match=rf"{name(2)}:2: ts must look like"):
        read_exposures(tmp_path)


def test_missing_path_raises_and_empty_directory_reads_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such exposure file or directory"):
        read_exposures(tmp_path / "nope")
    read = read_exposures_report(tmp_path)
    assert read.files == [] and read.frame.height == 0 and read.frame.schema == SCHEMA
    assert isinstance(read.frame, pl.DataFrame)
