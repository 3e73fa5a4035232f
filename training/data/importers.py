"""Convert the public datasets in shared/data (see its README.md) to the data contract.

Every interaction becomes a `purchase` event (a review or a rating, the usual
implicit-feedback proxy). Besides the contract's columns, events.parquet keeps:

- `seq_pos` (int): the interaction's 0-based position in the user's sequence.
  For the Amazon sets and MovieLens-1M it is the upstream order, which is the
  only sound way to order same-timestamp ties; for ml-latest-small it is
  computed here (by timestamp, then movieId).
- `rating` (float, ml-latest-small only): the explicit rating.

The contract's readers ignore these extra columns. Rows are sorted by
(ts, user_id, seq_pos), so within a user the file order is the seq_pos order.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

import polars as pl

from featurizer.contracts.schema import (
    EVENTS_FILE,
    ITEMS_FILE,
    catalog_report,
    validate_events,
    validate_items,
)

DATASETS = ("amazon-beauty-2014", "amazon-toys-2014", "movielens-1m", "movielens-latest-small")
_SEQUENCE_DATASETS = ("amazon-beauty-2014", "amazon-toys-2014", "movielens-1m")
SHARED_DATA_ENV = "SEMRANK_SHARED_DATA"
MAX_TAGS = 20
_NO_GENRES = "(no genres listed)"


def default_shared_data_dir() -> Path:
    """`$SEMRANK_SHARED_DATA`, else the `shared/data` folder beside this repository."""
    override = os.environ.get(SHARED_DATA_ENV)
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[3] / "shared" / "data"


def import_dataset(name: str, out_dir: str | Path, shared_data_dir: str | Path | None = None) -> dict:
    """Write `out_dir/items.parquet`, `out_dir/events.parquet` and `out_dir/summary.json`; return the summary."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    src = Path(shared_data_dir) if shared_data_dir is not None else default_shared_data_dir()
    src = src / name
    if name in _SEQUENCE_DATASETS:
        items, events = _sequence_dataset(src)
        ties = ("events sorted by (ts, user_id, seq_pos); seq_pos is the upstream per-user order, "
                "so same-timestamp ties keep the upstream order")
    else:
        items, events = _movielens_latest_small(src)
        ties = ("seq_pos computed here per user by (timestamp, movieId); events sorted by (ts, user_id, seq_pos); "
                "the `rating` column keeps the explicit rating")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    items = validate_items(items, src / "items")
    events = _validate_keep_extras(events, src / "events")
    items.write_parquet(out_dir / f"{ITEMS_FILE}.parquet")
    events.write_parquet(out_dir / f"{EVENTS_FILE}.parquet")
    summary = _summary(name, items, events, ties)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _require(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: source file missing; see shared/data/README.md for the expected layout")
    return path


def _sequence_dataset(src: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Amazon 2014 and MovieLens-1M: interactions.csv.gz (user_id,item_id,timestamp,seq_pos), items.csv.gz."""
    inter_path, items_path = _require(src / "interactions.csv.gz"), _require(src / "items.csv.gz")
    events = (
        pl.scan_csv(inter_path, schema={"user_id": pl.Utf8, "item_id": pl.Utf8, "timestamp": pl.Int64,
                                        "seq_pos": pl.Int32})
        .pipe(_purchases)
        .collect()
    )
    items = (
        pl.scan_csv(items_path, schema={"item_id": pl.Utf8, "title": pl.Utf8})
        .with_columns(_unescape("title"))
        .collect()
    )
    return items, events


def _movielens_latest_small(src: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    """ml-latest-small: ratings.csv.gz, movies.csv (title, genres) and tags.csv (free-text user tags)."""
    ratings_path = _require(src / "ratings.csv.gz")
    movies_path, tags_path = _require(src / "movies.csv"), _require(src / "tags.csv")
    events = (
        pl.scan_csv(ratings_path, schema={"userId": pl.Int64, "movieId": pl.Int64, "rating": pl.Float64,
                                          "timestamp": pl.Int64})
        .sort("userId", "timestamp", "movieId")
        .with_columns(pl.int_range(pl.len(), dtype=pl.Int32).over("userId").alias("seq_pos"))
        .select(
            pl.col("userId").cast(pl.Utf8).alias("user_id"),
            pl.col("movieId").cast(pl.Utf8).alias("item_id"),
            "timestamp", "seq_pos", "rating",
        )
        .pipe(_purchases)
        .collect()
    )
    tags = (
        pl.scan_csv(tags_path, schema={"userId": pl.Int64, "movieId": pl.Int64, "tag": pl.Utf8, "timestamp": pl.Int64})
        .with_columns(pl.col("tag").str.strip_chars())
        .filter(pl.col("tag").is_not_null() & (pl.col("tag") != ""))
        .group_by("movieId")
        .agg(pl.col("tag").unique().sort().head(MAX_TAGS).alias("tags"))
    )
    genres = pl.when(pl.col("genres") != _NO_GENRES).then(pl.col("genres").str.replace_all("|", ", ", literal=True))
    items = (
        pl.scan_csv(movies_path, schema={"movieId": pl.Int64, "title": pl.Utf8, "genres": pl.Utf8})
        .join(tags, on="movieId", how="left")
        .with_columns(genres.alias("category"), pl.col("tags").list.join(", ").alias("tag_text"))
        .select(
            pl.col("movieId").cast(pl.Utf8).alias("item_id"),
            _unescape("title"),
            pl.concat_str(
                [pl.lit("Genres: ") + pl.col("category"), pl.lit("Tags: ") + pl.col("tag_text")],
                separator="; ", ignore_nulls=True,
            ).alias("description"),
            "category",
        )
        .with_columns(pl.when(pl.col("description") != "").then(pl.col("description")).alias("description"))
        .collect()
    )
    return items, events


CONTRACT_EVENT_COLUMNS = ("ts", "user_id", "item_id", "event", "request_id", "position", "seq_pos")


def _purchases(lf: pl.LazyFrame) -> pl.LazyFrame:
    """Interactions -> purchase events in an unambiguous order: (ts, user_id, seq_pos)."""
    return lf.with_columns(
        pl.from_epoch("timestamp", time_unit="s").dt.replace_time_zone("UTC").dt.cast_time_unit("us").alias("ts"),
        pl.lit("purchase").alias("event"),
    ).drop("timestamp").sort("ts", "user_id", "seq_pos")


def _unescape(col: str) -> pl.Expr:
    """HTML entities (`&amp;`, `&quot;`) in titles become plain characters."""
    return pl.col(col).map_elements(html.unescape, return_dtype=pl.Utf8, skip_nulls=True).alias(col)


def _validate_keep_extras(events: pl.DataFrame, path: Path) -> pl.DataFrame:
    """`validate_events` drops extra columns; it sorts by ts stably, and `events` is sorted by ts already,
    so the extras are re-attached by row position (checked)."""
    extras = [c for c in events.columns if c not in CONTRACT_EVENT_COLUMNS]
    valid = validate_events(events, path)
    if not (valid["user_id"] == events["user_id"]).all() or not (valid["ts"] == events["ts"]).all():
        raise RuntimeError(f"{path}: validate_events reordered rows; cannot re-attach {extras}")
    return valid.with_columns(events.select(extras))


def _summary(name: str, items: pl.DataFrame, events: pl.DataFrame, ties: str) -> dict:
    stats = events.select(
        pl.col("user_id").n_unique().alias("users"),
        pl.col("item_id").n_unique().alias("items_with_events"),
        pl.col("ts").min().alias("first"),
        pl.col("ts").max().alias("last"),
    ).row(0, named=True)
    report = catalog_report(events, items)
    return {
        "dataset": name,
        "source": f"shared/data/{name}",
        "events": {"purchase": events.height},
        "users": stats["users"],
        "items": items.height,
        "items_with_events": stats["items_with_events"],
        "events_unknown_item": report.events_unknown_item,
        "time_range": [stats["first"].isoformat(), stats["last"].isoformat()],
        "extra_event_columns": [c for c in events.columns if c not in CONTRACT_EVENT_COLUMNS],
        "tie_order": ties,
    }
