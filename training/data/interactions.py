"""Import any interaction log: a table of (user, item, timestamp) plus an items table with a title.

    semrank data import --format interactions --interactions log.csv --items items.parquet --out data/mine \
        [--user-column user --item-column sku --ts-column time [--ts-unit auto|s|ms|us]] \
        [--event-column type [--event-map view=click --event-map order=purchase]] [--order-column pos] \
        [--title-column name --description-column ... --category-column ... --brand-column ... --price-column ...]

What comes out is what the named importers write (`training.data.importers`): `items.parquet`,
`events.parquet` (sorted by ts, user_id, seq_pos) and `summary.json`, so a team's own log, or any
public sequential dataset, goes through training and `semrank eval` with no importer of its own.

- Every interaction is a `purchase` unless `--event-column` names the type; `--event-map RAW=TYPE`
  maps a log's own names onto the contract's (impression, click, add_to_cart, purchase).
- `seq_pos` is each interaction's 0-based place in its user's sequence: by the `--order-column`
  when one is given (the upstream order, the only sound order of same-timestamp ties), else by
  timestamp, ties in file order. Given the files behind a named importer and `--order-column
  seq_pos`, the result equals that importer's (tests/training/test_interactions_import.py).
- Timestamps: integers in seconds, milliseconds or microseconds since the epoch (`--ts-unit`;
  `auto` reads the unit from the magnitude), ISO 8601 text, or a datetime column.
- Bad rows are dropped, never a crash: counted by reason in the summary, with the first few row
  numbers (0-based, in the input file) of each reason. An event whose item has no row in the
  items table is kept (the data contract allows it) and counted in `events_unknown_item`.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from featurizer.contracts.schema import EVENT_TYPES, EVENTS_FILE, ITEMS_FILE, validate_events, validate_items
from featurizer.errors import SemrankError

EXAMPLE_ROWS = 5  # row numbers kept per bad-row reason
TS_UNITS = ("auto", "s", "ms", "us")


class InteractionImportError(SemrankError, ValueError):
    """The input cannot be imported at all (a missing file or column, no valid row): a clear message
    (the CLI prints it and exits 2)."""


@dataclass(frozen=True)
class InteractionFormat:
    """Which columns hold what; the defaults are the names the data contract uses."""

    user: str = "user_id"
    item: str = "item_id"
    ts: str = "timestamp"
    ts_unit: str = "auto"
    event: str | None = None  # None: every interaction is a purchase
    event_map: dict[str, str] = field(default_factory=dict)  # a log's own event names -> contract types
    order: str | None = None  # same-timestamp order within a user (None: file order)
    item_id: str = "item_id"  # in the items table
    title: str = "title"
    unescape_html: bool = False  # titles and descriptions: `&amp;` -> `&` (scraped catalogs; the Amazon importers do it)
    description: str | None = None
    category: str | None = None
    brand: str | None = None
    price: str | None = None

    def __post_init__(self):
        if self.ts_unit not in TS_UNITS:
            raise InteractionImportError(f"--ts-unit {self.ts_unit!r}: one of {', '.join(TS_UNITS)}")
        bad = {raw: to for raw, to in self.event_map.items() if to not in EVENT_TYPES}
        if bad:
            raise InteractionImportError(f"--event-map {bad}: the contract's event types are {', '.join(EVENT_TYPES)}")


class BadRows:
    """Rows dropped, by reason, with the first few row numbers of each."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.examples: dict[str, list[int]] = {}

    def drop(self, df: pl.DataFrame, bad: pl.Series, reason: str) -> pl.DataFrame:
        """`df` without the rows where `bad` holds (nulls count as good), counted under `reason`."""
        bad = bad.fill_null(False)
        n = int(bad.sum())
        if n:
            self.counts[reason] = self.counts.get(reason, 0) + n
            self.examples.setdefault(reason, []).extend(df.filter(bad)["_row"].head(EXAMPLE_ROWS).to_list())
            self.examples[reason] = self.examples[reason][:EXAMPLE_ROWS]
        return df.filter(~bad)

    def summary(self) -> dict:
        return {"dropped": sum(self.counts.values()), "by_reason": dict(sorted(self.counts.items())),
                "example_rows": {k: self.examples[k] for k in sorted(self.examples)}}


def _read(path: Path) -> pl.DataFrame:
    """A CSV (also .csv.gz, as text: a bad value is then a counted row, not a parser crash) or parquet."""
    if not path.is_file():
        raise InteractionImportError(f"{path}: no such file")
    name = path.name.lower()
    if name.endswith(".parquet"):
        df = pl.read_parquet(path)
    elif name.endswith((".csv", ".csv.gz", ".tsv", ".tsv.gz")):
        df = pl.read_csv(path, infer_schema=False, separator="\t" if ".tsv" in name else ",")
    else:
        raise InteractionImportError(f"{path}: use .csv, .csv.gz, .tsv or .parquet")
    return df.with_row_index("_row")


def _column(df: pl.DataFrame, path: Path, name: str | None, flag: str) -> None:
    if name is not None and name not in df.columns:
        found = ", ".join(c for c in df.columns if c != "_row")
        raise InteractionImportError(f"{path}: no column {name!r} (set by {flag}); the file has: {found}")


def _text(df: pl.DataFrame, col: str) -> pl.Series:
    """A column as stripped text, empty as null."""
    s = df[col].cast(pl.Utf8).str.strip_chars()
    return pl.select(pl.when(s != "").then(s)).to_series()


def _timestamps(s: pl.Series, unit: str) -> pl.Series:
    """Microsecond UTC datetimes (null where unparsable)."""
    if s.dtype == pl.Datetime:
        if s.dtype.time_zone is None:
            s = s.dt.replace_time_zone("UTC")
        return s.dt.convert_time_zone("UTC").dt.cast_time_unit("us")
    if s.dtype == pl.Date:
        return s.cast(pl.Datetime("us")).dt.replace_time_zone("UTC")
    text = s.cast(pl.Utf8).str.strip_chars()
    number = text.cast(pl.Float64, strict=False)
    if unit == "auto":  # the magnitude of the numbers: 1e9 s, 1e12 ms, 1e15 µs around today
        top = number.abs().max()
        unit = "s" if top is None or top < 1e11 else "ms" if top < 1e14 else "us"
    scale = {"s": 1_000_000, "ms": 1_000, "us": 1}[unit]
    from_number = pl.from_epoch((number * scale).round().cast(pl.Int64, strict=False), time_unit="us")
    words = pl.select(pl.when(number.is_null()).then(text)).to_series()
    try:  # (polars reads the format from the first value; text it cannot read at all is unparsable)
        from_text = words.str.to_datetime(time_zone="UTC", strict=False, time_unit="us")
    except pl.exceptions.ComputeError:
        from_text = pl.Series(values=[None] * len(words), dtype=pl.Datetime("us", "UTC"))
    return pl.select(pl.when(number.is_not_null()).then(from_number.dt.replace_time_zone("UTC"))
                     .otherwise(from_text)).to_series()


def read_interactions(path: Path, fmt: InteractionFormat) -> tuple[pl.DataFrame, BadRows, dict[str, pl.DataFrame]]:
    """The log as contract events (ts, user_id, item_id, event, seq_pos) with the rows that fail
    dropped and counted; also per-item columns (category, brand, price) the log carries, if named."""
    df = _read(path)
    for name, flag in ((fmt.user, "--user-column"), (fmt.item, "--item-column"), (fmt.ts, "--ts-column"),
                       (fmt.event, "--event-column"), (fmt.order, "--order-column")):
        _column(df, path, name, flag)
    bad = BadRows()
    df = df.with_columns(_text(df, fmt.user).alias("user_id"), _text(df, fmt.item).alias("item_id"))
    df = bad.drop(df, df["user_id"].is_null(), "user id missing")
    df = bad.drop(df, df["item_id"].is_null(), "item id missing")
    df = bad.drop(df, _text(df, fmt.ts).is_null(), "timestamp missing")
    df = df.with_columns(_timestamps(df[fmt.ts], fmt.ts_unit).alias("ts"))
    df = bad.drop(df, df["ts"].is_null(), "timestamp unparsable")
    if fmt.event is None:
        df = df.with_columns(pl.lit("purchase").alias("event"))
    else:
        raw = _text(df, fmt.event)
        mapped = raw.replace_strict(fmt.event_map, default=raw, return_dtype=pl.Utf8) if fmt.event_map else raw
        df = df.with_columns(mapped.alias("event"))
        df = bad.drop(df, ~df["event"].is_in(list(EVENT_TYPES)).fill_null(False), "event type unknown")
    if fmt.order is not None:
        order = df[fmt.order].cast(pl.Float64, strict=False)
        df = bad.drop(df.with_columns(order.alias("_order")), order.is_null(), "order not a number")
    else:
        df = df.with_columns(pl.col("ts").alias("_order"))
    # The user's sequence: by the order column (or the timestamp), ties by file row.
    df = df.sort("user_id", "_order", "_row").with_columns(
        pl.int_range(pl.len(), dtype=pl.Int64).over("user_id").alias("seq_pos"))
    per_item = {}
    for name in (fmt.category, fmt.brand, fmt.price):
        if name is not None and name in df.columns:  # the item's latest value in the log
            per_item[name] = df.sort("ts", "_row").group_by("item_id", maintain_order=True).agg(
                pl.col(name).drop_nulls().last()).rename({name: "value"})
    events = df.select("ts", "user_id", "item_id", pl.col("event").cast(pl.Enum(list(EVENT_TYPES))), "seq_pos")
    return events.sort("ts", "user_id", "seq_pos"), bad, per_item


def read_catalog(path: Path, fmt: InteractionFormat, per_item: dict[str, pl.DataFrame]) -> tuple[pl.DataFrame, BadRows]:
    """The items table as contract items (item_id, title, description, category, brand, price), bad
    rows dropped and counted (a duplicate id keeps its first row; an unparsable price becomes null)."""
    df = _read(path)
    for name, flag in ((fmt.item_id, "--items-id-column"), (fmt.title, "--title-column")):
        _column(df, path, name, flag)
    bad = BadRows()
    df = df.with_columns(_text(df, fmt.item_id).alias("item_id"), _text(df, fmt.title).alias("title"))
    df = bad.drop(df, df["item_id"].is_null(), "item id missing")
    df = bad.drop(df, df["title"].is_null(), "title missing")
    df = bad.drop(df, ~df["item_id"].is_first_distinct(), "item id repeated (the first row kept)")
    title = df["title"].map_elements(html.unescape, return_dtype=pl.Utf8) if fmt.unescape_html else df["title"]
    out = {"item_id": df["item_id"], "title": title}
    for key, name in (("description", fmt.description), ("category", fmt.category), ("brand", fmt.brand),
                      ("price", fmt.price)):
        if name is not None and name in df.columns:
            out[key] = _text(df, name)
            if fmt.unescape_html and key == "description":
                out[key] = out[key].map_elements(html.unescape, return_dtype=pl.Utf8, skip_nulls=True)
        elif name is not None and name in per_item:  # only the log has it
            joined = df.select("item_id").join(per_item[name], on="item_id", how="left")
            out[key] = joined["value"].cast(pl.Utf8)
        elif name is not None:
            raise InteractionImportError(f"{path}: no column {name!r} (set by --{key}-column) in the items table or the log")
    items = pl.DataFrame(out)
    if "price" in items.columns:
        price = items["price"].cast(pl.Float64, strict=False)
        unparsable = price.is_null() & items["price"].is_not_null()
        bad.counts.update({"price unparsable (kept without a price)": int(unparsable.sum())} if unparsable.any() else {})
        items = items.with_columns(price.alias("price"))
    return validate_items(items, path), bad


def import_interactions(interactions: str | Path, items: str | Path, out_dir: str | Path,
                        fmt: InteractionFormat = InteractionFormat()) -> dict:
    """Write `out_dir/items.parquet`, `out_dir/events.parquet` and `out_dir/summary.json` from an
    interaction log and its items table; return the summary (what was kept and what was dropped)."""
    interactions, items_path, out_dir = Path(interactions), Path(items), Path(out_dir)
    events, bad_events, per_item = read_interactions(interactions, fmt)
    catalog, bad_items = read_catalog(items_path, fmt, per_item)
    if events.height == 0:
        raise InteractionImportError(f"{interactions}: no valid interaction ({bad_events.summary()['by_reason']})")
    if catalog.height == 0:
        raise InteractionImportError(f"{items_path}: no valid item ({bad_items.summary()['by_reason']})")
    out_dir.mkdir(parents=True, exist_ok=True)
    catalog.write_parquet(out_dir / f"{ITEMS_FILE}.parquet")
    validate_events(events, interactions).write_parquet(out_dir / f"{EVENTS_FILE}.parquet")
    stats = events.select(pl.col("user_id").n_unique().alias("users"), pl.col("ts").min().alias("first"),
                          pl.col("ts").max().alias("last")).row(0, named=True)
    known = events["item_id"].is_in(catalog["item_id"].implode())
    summary = {
        "format": "interactions",
        "source": {"interactions": interactions.name, "items": items_path.name},
        "events": {str(k): int(v) for k, v in events["event"].value_counts().sort("event").iter_rows()},
        "users": stats["users"],
        "items": catalog.height,
        "items_with_events": events["item_id"].n_unique(),
        "events_unknown_item": int((~known).sum()),
        "time_range": [stats["first"].isoformat(), stats["last"].isoformat()],
        "extra_event_columns": ["seq_pos"],
        "tie_order": (f"seq_pos by the order column {fmt.order!r}, ties in file order" if fmt.order else
                      "seq_pos by timestamp, ties in file order") + "; events sorted by (ts, user_id, seq_pos)",
        "bad_rows": {"interactions": bad_events.summary(), "items": bad_items.summary()},
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
