"""Text views of items and users, shared by training and serving.

The item text and the user-history text are what the encoder sees; both sides
of the system build them here so that offline and online texts are identical.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import polars as pl

# Default budgets; the encoder truncates by tokens as well.
MAX_DESCRIPTION_CHARS = 200
HISTORY_ITEMS = 5  # titles in the user text unless a bundle says otherwise (EncoderRef.history_items)


def item_text(
    title: str,
    category: str | None = None,
    brand: str | None = None,
    description: str | None = None,
    max_description_chars: int = MAX_DESCRIPTION_CHARS,
) -> str:
    """`title. category. brand. description[:n]` with empty parts left out."""
    parts = [title.strip()]
    for extra in (category, brand):
        if extra and extra.strip():
            parts.append(extra.strip())
    if description and description.strip():
        parts.append(description.strip()[:max_description_chars])
    return ". ".join(parts)


def item_text_expr(max_description_chars: int = MAX_DESCRIPTION_CHARS) -> pl.Expr:
    """The same text as `item_text`, as a polars expression over an items frame."""

    def part(col: str, limit: int | None = None) -> pl.Expr:
        e = pl.col(col).cast(pl.Utf8).str.strip_chars()
        if limit is not None:
            e = e.str.slice(0, limit)
        return pl.when(e.is_not_null() & (e != "")).then(e)

    return pl.concat_str(
        [part("title"), part("category"), part("brand"), part("description", max_description_chars)],
        separator=". ",
        ignore_nulls=True,
    ).alias("item_text")


def history_text(titles_most_recent_first: Sequence[str], max_items: int) -> str:
    """The user-side text: the titles of the `max_items` most recent interactions, most recent first.

    `max_items` has no default: it is the bundle's `history_items` (`ranker.feature_matrix.BundleInputs`),
    and training and serving must pass the same."""
    return " | ".join(t for t in titles_most_recent_first[:max_items])


def dedupe_recent(item_ids_most_recent_first: Iterable[str]) -> list[str]:
    """Keep the first (most recent) occurrence of each item."""
    seen: set[str] = set()
    out = []
    for i in item_ids_most_recent_first:
        if i not in seen:
            seen.add(i)
            out.append(i)
    return out
