"""The catalog as the online features read it: each item's category, brand and price, coded for
the per-request gathers (`featurizer.online.features`).

    cat = Catalog(items, index)          # items: item_id, category, brand, price (absent columns null)
    cat = cat.upsert(more_items)          # a new Catalog: known items' null fields keep their values
    rows = cat.rows(index_rows)          # the catalog row of items at rows of the `ItemIndex`

The fold reads the per-item dicts (`category`, `brand`, `log_price`: what an event of the item
counts), the reads the arrays (`price`, `category_code`, `brand_code`, one extra row for an item not
in the catalog) through `rows`, which follows the index as it grows.
"""

from __future__ import annotations

from itertools import repeat

import numpy as np
import polars as pl

from featurizer.offline.pipeline import catalog
from featurizer.online.item_index import ItemIndex

COLUMNS = {"item_id": pl.Utf8, "category": pl.Utf8, "brand": pl.Utf8, "price": pl.Float64}


def catalog_columns(items: pl.DataFrame, only_present: bool = False) -> pl.DataFrame:
    """The item columns features read, typed; absent ones null (or left out with only_present)."""
    return items.select(
        (pl.col(c).cast(t) if c in items.columns else pl.lit(None, t)).alias(c)
        for c, t in COLUMNS.items()
        if c in items.columns or not only_present
    )


def _codes(values: list[str | None], names: dict[str, int]) -> np.ndarray:
    """Code of each value; None -> len(names); one extra entry for items not in the catalog."""
    none = len(names)
    return np.array([none if v is None else names[v] for v in values] + [none], dtype=np.int64)


class Catalog:
    def __init__(self, items: pl.DataFrame, index: ItemIndex):
        self.items = catalog_columns(items)
        self._index = index
        cat = catalog(self.items.lazy()).collect()
        ids = cat["item_id"].to_list()
        self.category = dict(zip(ids, cat["category"].to_list()))
        self.brand = dict(zip(ids, cat["brand"].to_list()))
        self.log_price = dict(zip(ids, cat["log_price"].to_list()))
        # Row k of the catalog; row len(ids) stands for any item not in it.
        self._row = {i: k for k, i in enumerate(ids)}
        self.unknown = len(ids)
        self.price = np.append(cat["price"].fill_null(np.nan).to_numpy(), np.nan)
        # category (brand) -> code, and the code of each catalog row (+ one row for unknown items)
        self.category_names = {g: k for k, g in enumerate(cat["category"].drop_nulls().unique(maintain_order=True))}
        self.brand_names = {g: k for k, g in enumerate(cat["brand"].drop_nulls().unique(maintain_order=True))}
        self.category_code = _codes(cat["category"].to_list(), self.category_names)
        self.brand_code = _codes(cat["brand"].to_list(), self.brand_names)
        if len(ids) <= index.max_items // 2:
            index.rows(ids)  # the catalog's ids first: later requests add only unknown ones
        self._rows = (-1, np.zeros(0, dtype=np.int64))  # (index epoch, catalog row per index row)

    def upsert(self, items: pl.DataFrame) -> Catalog:
        """This catalog with `items` added, or updating the price, category or brand of known ones (a
        null field leaves the known value unchanged)."""
        if items.is_empty():
            return self
        new = catalog_columns(items, only_present=True).unique("item_id", keep="last", maintain_order=True)
        return Catalog(self.items.update(new, on="item_id", how="full"), self._index)

    def rows(self, index_rows: np.ndarray) -> np.ndarray:
        """The catalog row of the items at `index_rows` of the index (`unknown`: not in the catalog)."""
        epoch, known = self._rows
        if epoch != self._index.epoch or len(known) < len(self._index):
            start = len(known) if epoch == self._index.epoch else 0
            new = self._index.ids[start:]
            more = np.fromiter(map(self._row.get, new, repeat(self.unknown)), dtype=np.int64, count=len(new))
            known = more if start == 0 else np.concatenate([known, more])
            self._rows = (self._index.epoch, known)
        return known[index_rows]
