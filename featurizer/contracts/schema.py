"""The data contract: items and events, read with polars from parquet or CSV.

items:  item_id (str), title (str); optional description, category, brand (str),
        price (float), created_at (UTC timestamp).
events: ts (UTC timestamp), user_id (str), item_id (str),
        event in {impression, click, add_to_cart, purchase};
        optional request_id (str) and position (int): impressions sharing a
        request_id are one ranked list that was shown; optional seq_pos (int):
        the order of a user's events where timestamps tie (imported datasets).

Validation fails early with a `DataContractError` naming the file, the column
and the first bad row (0-based, in file order).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from featurizer.errors import SemrankError

EVENT_TYPES: tuple[str, ...] = ("impression", "click", "add_to_cart", "purchase")
# Event strength, used for graded labels and for the weight of a training pair.
EVENT_STRENGTH: dict[str, int] = {"impression": 0, "click": 1, "add_to_cart": 2, "purchase": 3}
# Events that count as the user engaging with the item (strength > 0).
ENGAGEMENTS: tuple[str, ...] = tuple(e for e in EVENT_TYPES if EVENT_STRENGTH[e] > 0)

ITEM_REQUIRED = ("item_id", "title")
ITEM_OPTIONAL_STR = ("description", "category", "brand")
EVENT_REQUIRED = ("ts", "user_id", "item_id", "event")

ITEMS_FILE = "items"
EVENTS_FILE = "events"


class DataContractError(SemrankError, ValueError):
    """Input data breaks the contract. The message names file, column and row."""

    grpc_code = "INVALID_ARGUMENT"
    reason = "DATA_CONTRACT_VIOLATION"

    def __init__(self, path: str | Path, column: str, row: int | None, problem: str):
        self.path, self.column, self.row, self.problem = str(path), column, row, problem
        where = f"{path}: column '{column}'"
        if row is not None:
            where += f", row {row}"
        super().__init__(f"{where}: {problem}")

    def field_violations(self) -> list[tuple[str, str]]:
        row = "" if self.row is None else f"[{self.row}]"
        return [(f"{self.column}{row}", self.problem)]


@dataclass(frozen=True)
class CatalogReport:
    """Events whose item is not in the catalog are counted, not fatal."""

    events_total: int
    events_unknown_item: int
    unknown_item_ids: list[str] = field(default_factory=list)  # a sample, at most 10

    def __str__(self) -> str:
        if not self.events_unknown_item:
            return f"{self.events_total} events, all items in the catalog"
        return (
            f"{self.events_total} events, {self.events_unknown_item} for items missing from "
            f"the catalog (e.g. {', '.join(self.unknown_item_ids)}); they are kept for user "
            "history but have no item text"
        )


def find_table(data_dir: str | Path, name: str) -> Path:
    """`DIR/name.parquet`, else `DIR/name.csv`."""
    data_dir = Path(data_dir)
    for ext in (".parquet", ".csv"):
        p = data_dir / f"{name}{ext}"
        if p.exists():
            return p
    raise FileNotFoundError(f"{data_dir}: no {name}.parquet or {name}.csv")


def _read_raw(path: Path) -> pl.DataFrame:
    if path.suffix == ".parquet":
        return pl.read_parquet(path)
    if path.suffix == ".csv":
        # Everything as text first, so that a bad value is reported by row, not by a parser crash.
        return pl.read_csv(path, infer_schema=False)
    raise DataContractError(path, "*", None, "unsupported file type; use .parquet or .csv")


def _first_bad_row(mask: pl.Series) -> int | None:
    idx = mask.arg_true()
    return int(idx[0]) if len(idx) else None


def _require_columns(df: pl.DataFrame, path: Path, required: tuple[str, ...]) -> None:
    for col in required:
        if col not in df.columns:
            raise DataContractError(path, col, None, f"missing required column (found: {', '.join(df.columns)})")


def _require_non_null_str(df: pl.DataFrame, path: Path, col: str) -> pl.DataFrame:
    s = df[col].cast(pl.Utf8)
    bad = _first_bad_row(s.is_null() | (s.str.strip_chars() == ""))
    if bad is not None:
        raise DataContractError(path, col, bad, "null or empty id/text; every row needs a value")
    return df.with_columns(s.alias(col))


def _parse_timestamp(df: pl.DataFrame, path: Path, col: str, required: bool) -> pl.DataFrame:
    s = df[col]
    if s.dtype == pl.Datetime:
        out = s.dt.replace_time_zone(None) if s.dtype.time_zone is None else s.dt.convert_time_zone("UTC")
        out = out.dt.replace_time_zone("UTC").dt.cast_time_unit("us")
    elif s.dtype.is_integer():
        out = pl.from_epoch(s, time_unit="s").dt.replace_time_zone("UTC").dt.cast_time_unit("us")
    else:
        text = s.cast(pl.Utf8)
        parsed = text.str.to_datetime(time_zone="UTC", strict=False, time_unit="us")
        # Plain digits are Unix seconds.
        digits = text.str.contains(r"^\d+$").fill_null(False)
        if digits.any():
            epoch = pl.from_epoch(text.cast(pl.Int64, strict=False), time_unit="s").dt.replace_time_zone("UTC")
            parsed = pl.select(pl.when(digits).then(epoch).otherwise(parsed)).to_series()
        bad = _first_bad_row(parsed.is_null() & text.is_not_null())
        if bad is not None:
            raise DataContractError(path, col, bad, f"unparsable timestamp {text[bad]!r}; use ISO 8601 (UTC) or Unix seconds")
        out = parsed.dt.cast_time_unit("us")
    if required:
        bad = _first_bad_row(out.is_null())
        if bad is not None:
            raise DataContractError(path, col, bad, "null timestamp")
    return df.with_columns(out.alias(col))


def _parse_number(df: pl.DataFrame, path: Path, col: str, dtype: pl.DataType) -> pl.DataFrame:
    s = df[col]
    out = s.cast(dtype, strict=False)
    bad = _first_bad_row(out.is_null() & s.is_not_null())
    if bad is not None:
        raise DataContractError(path, col, bad, f"not a number: {s[bad]!r}")
    return df.with_columns(out.alias(col))


def validate_items(df: pl.DataFrame, path: str | Path = "<items>") -> pl.DataFrame:
    """Check and normalise an items table; returns it with contract dtypes."""
    path = Path(path)
    _require_columns(df, path, ITEM_REQUIRED)
    for col in ITEM_REQUIRED:
        df = _require_non_null_str(df, path, col)
    dup = _first_bad_row(~df["item_id"].is_first_distinct())
    if dup is not None:
        raise DataContractError(path, "item_id", dup, f"duplicate item_id {df['item_id'][dup]!r}")
    for col in ITEM_OPTIONAL_STR:
        df = df.with_columns(
            (df[col].cast(pl.Utf8) if col in df.columns else pl.lit(None, dtype=pl.Utf8)).alias(col)
        )
    df = _parse_number(df, path, "price", pl.Float64) if "price" in df.columns else df.with_columns(
        pl.lit(None, dtype=pl.Float64).alias("price")
    )
    if "created_at" in df.columns:
        df = _parse_timestamp(df, path, "created_at", required=False)
    else:
        df = df.with_columns(pl.lit(None, dtype=pl.Datetime("us", "UTC")).alias("created_at"))
    return df.select("item_id", "title", *ITEM_OPTIONAL_STR, "price", "created_at")


def validate_events(df: pl.DataFrame, path: str | Path = "<events>") -> pl.DataFrame:
    """Check and normalise an events table; returns it sorted by ts (stable)."""
    path = Path(path)
    _require_columns(df, path, EVENT_REQUIRED)
    for col in ("user_id", "item_id"):
        df = _require_non_null_str(df, path, col)
    ev = df["event"].cast(pl.Utf8)
    bad = _first_bad_row(~ev.is_in(list(EVENT_TYPES)).fill_null(False))
    if bad is not None:
        raise DataContractError(
            path, "event", bad, f"unknown event type {ev[bad]!r}; expected one of {', '.join(EVENT_TYPES)}"
        )
    df = df.with_columns(ev.cast(pl.Enum(list(EVENT_TYPES))).alias("event"))
    df = _parse_timestamp(df, path, "ts", required=True)
    df = df.with_columns(
        (df["request_id"].cast(pl.Utf8) if "request_id" in df.columns else pl.lit(None, dtype=pl.Utf8)).alias(
            "request_id"
        )
    )
    df = _parse_number(df, path, "position", pl.Int32) if "position" in df.columns else df.with_columns(
        pl.lit(None, dtype=pl.Int32).alias("position")
    )
    df = _parse_number(df, path, "seq_pos", pl.Int64) if "seq_pos" in df.columns else df.with_columns(
        pl.lit(None, dtype=pl.Int64).alias("seq_pos")
    )
    return df.select("ts", "user_id", "item_id", "event", "request_id", "position", "seq_pos").sort(
        "ts", maintain_order=True
    )


def read_items(path: str | Path) -> pl.DataFrame:
    path = Path(path)
    return validate_items(_read_raw(path), path)


def read_events(path: str | Path) -> pl.DataFrame:
    path = Path(path)
    return validate_events(_read_raw(path), path)


def has_impression_lists(events: pl.DataFrame) -> bool:
    """True when some impression carries a request_id: the events hold ranked lists that were shown
    (ranker training then learns from them; without them it uses leave-one-out targets)."""
    return events.filter((pl.col("event") == "impression") & pl.col("request_id").is_not_null()).height > 0


def catalog_report(events: pl.DataFrame, items: pl.DataFrame) -> CatalogReport:
    unknown = events.filter(~pl.col("item_id").is_in(items["item_id"].implode()))
    sample = unknown["item_id"].unique(maintain_order=True).head(10).to_list()
    return CatalogReport(events_total=events.height, events_unknown_item=unknown.height, unknown_item_ids=sample)


@dataclass(frozen=True)
class Dataset:
    items: pl.DataFrame
    events: pl.DataFrame
    report: CatalogReport


def read_dataset(data_dir: str | Path) -> Dataset:
    """Read and validate `items` and `events` from a data directory."""
    items = read_items(find_table(data_dir, ITEMS_FILE))
    events = read_events(find_table(data_dir, EVENTS_FILE))
    return Dataset(items=items, events=events, report=catalog_report(events, items))


def write_dataset(data_dir: str | Path, items: pl.DataFrame, events: pl.DataFrame) -> None:
    """Write a dataset in the contract's parquet layout (validated first)."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    validate_items(items).write_parquet(data_dir / f"{ITEMS_FILE}.parquet")
    validate_events(events).write_parquet(data_dir / f"{EVENTS_FILE}.parquet")
