from datetime import datetime, timezone

import polars as pl
import pytest

from featurizer.contracts.schema import (
    DataContractError,
    catalog_report,
    read_dataset,
    read_events,
    read_items,
    write_dataset,
)


def _write_csv(path, text):
    path.write_text(text)
    return path


def test_items_csv_roundtrip_and_optional_columns(tmp_path):
    p = _write_csv(tmp_path / "items.csv", "item_id,title,price\ni1,Red Shoe,19.5\ni2,Blue Phone,\n")
    items = read_items(p)
    assert items.columns == ["item_id", "title", "description", "category", "brand", "price", "created_at"]
    assert items["price"].to_list() == [19.5, None]
    assert items["category"].null_count() == 2


@pytest.mark.parametrize(
    "text, column, row, words",
    [
        ("item_id\ni1\n", "title", None, "missing required column"),
        ("item_id,title\ni1,Shoe\n,Phone\n", "item_id", 1, "null or empty"),
        ("item_id,title\ni1,Shoe\ni1,Phone\n", "item_id", 1, "duplicate"),
        ("item_id,title,price\ni1,Shoe,cheap\n", "price", 0, "not a number"),
    ],
)
def test_items_errors_name_file_column_row(tmp_path, text, column, row, words):
    p = _write_csv(tmp_path / "items.csv", text)
    with pytest.raises(DataContractError) as e:
        read_items(p)
    assert e.value.column == column and e.value.row == row
    assert "items.csv" in str(e.value) and column in str(e.value) and words in str(e.value)


@pytest.mark.parametrize(
    "body, column, row, words",
    [
        ("ts,user_id,item_id\n2026-01-01T00:00:00Z,u1,i1\n", "event", None, "missing required column"),
        ("ts,user_id,item_id,event\n2026-01-01T00:00:00Z,u1,i1,click\n2026-01-01T00:00:00Z,u1,i1,like\n", "event", 1, "unknown event type 'like'"),
        ("ts,user_id,item_id,event\n2026-01-01T00:00:00Z,u1,i1,click\nyesterday,u1,i1,click\n", "ts", 1, "unparsable timestamp"),
        ("ts,user_id,item_id,event\n2026-01-01T00:00:00Z,,i1,click\n", "user_id", 0, "null or empty"),
        ("ts,user_id,item_id,event,position\n2026-01-01T00:00:00Z,u1,i1,impression,top\n", "position", 0, "not a number"),
    ],
)
def test_events_errors_name_file_column_row(tmp_path, body, column, row, words):
    p = _write_csv(tmp_path / "events.csv", body)
    with pytest.raises(DataContractError) as e:
        read_events(p)
    assert (e.value.column, e.value.row) == (column, row)
    assert "events.csv" in str(e.value) and words in str(e.value)


def test_events_timestamps_iso_and_unix_seconds_are_utc(tmp_path):
    p = _write_csv(
        tmp_path / "events.csv",
        "ts,user_id,item_id,event,request_id,position\n"
        "2026-01-02T10:00:00+02:00,u1,i1,impression,r1,0\n"
        "1767225600,u1,i1,click,r1,\n",
    )
    ev = read_events(p)
    assert ev["ts"].dtype == pl.Datetime("us", "UTC")
    assert ev["ts"].to_list() == [
        datetime(2026, 1, 1, tzinfo=timezone.utc),
        datetime(2026, 1, 2, 8, tzinfo=timezone.utc),
    ]  # sorted by time
    assert ev["event"].cast(pl.Utf8).to_list() == ["click", "impression"]


def test_unknown_catalog_items_are_counted_not_fatal(tmp_path):
    items = pl.DataFrame({"item_id": ["i1"], "title": ["Shoe"]})
    events = pl.DataFrame(
        {"ts": [datetime(2026, 1, 1, tzinfo=timezone.utc)] * 3, "user_id": ["u1"] * 3, "item_id": ["i1", "x9", "x9"], "event": ["click"] * 3}
    )
    write_dataset(tmp_path, items, events)
    ds = read_dataset(tmp_path)
    assert ds.report.events_total == 3 and ds.report.events_unknown_item == 2
    assert ds.report.unknown_item_ids == ["x9"]
    assert "missing from the catalog" in str(ds.report)
    assert catalog_report(ds.events, ds.items) == ds.report


def test_missing_table_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="items.parquet or items.csv"):
        read_dataset(tmp_path)
