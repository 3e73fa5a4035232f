"""`Catalog`: what the online features read of the catalog, and how an upsert changes it."""

from __future__ import annotations

import math

import polars as pl

from featurizer.online.catalog import Catalog
from featurizer.online.item_index import ItemIndex


def _items(rows: list[dict]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema={"item_id": pl.Utf8, "category": pl.Utf8, "brand": pl.Utf8, "price": pl.Float64})


def test_rows_codes_and_prices_follow_the_index_and_leave_unknown_items_on_the_extra_row():
    index = ItemIndex(100)
    cat = Catalog(_items([{"item_id": "a", "category": "shoes", "brand": "x", "price": 10.0},
                          {"item_id": "b", "category": None, "brand": "y", "price": None}]), index)
    rows = cat.rows(index.rows(["b", "zz", "a"]))  # "zz" joins the index after the catalog's ids
    assert rows.tolist() == [1, cat.unknown, 0]
    assert cat.category_code[rows].tolist() == [len(cat.category_names)] * 2 + [cat.category_names["shoes"]]
    assert cat.brand_code[rows].tolist() == [cat.brand_names["y"], len(cat.brand_names), cat.brand_names["x"]]
    price = cat.price[rows]
    assert math.isnan(price[0]) and math.isnan(price[1]) and price[2] == 10.0
    assert cat.log_price == {"a": math.log(10.0), "b": None}


def test_an_upsert_adds_items_and_a_null_field_keeps_the_known_value():
    index = ItemIndex(100)
    cat = Catalog(_items([{"item_id": "a", "category": "shoes", "brand": "x", "price": 10.0}]), index)
    newer = cat.upsert(pl.DataFrame({"item_id": ["a", "c"], "price": [12.0, 3.0]}))  # no category, brand columns
    assert cat.price[cat.rows(index.rows(["a"]))].tolist() == [10.0]  # the old catalog is unchanged
    rows = newer.rows(index.rows(["a", "c"]))
    assert newer.price[rows].tolist() == [12.0, 3.0]
    assert newer.category["a"] == "shoes" and newer.brand["a"] == "x"  # not in the upsert: kept
    assert newer.category["c"] is None
    assert newer.upsert(pl.DataFrame({"item_id": []}, schema={"item_id": pl.Utf8})) is newer
