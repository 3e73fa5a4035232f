"""The item store (serving/ranking/item_store.py): upserts persist and merge field by field, item
embeddings are cached per encoder key on disk, a changed text makes its embedding stale until it
is embedded again, and a restart re-embeds nothing."""

from __future__ import annotations

import asyncio

import numpy as np
import polars as pl
import pytest

from serving.encoding.pool import InProcessEncoder
from serving.ranking.item_store import ItemStore, map_safetensor
from tests.fakes import DIM, HashEncoder

KEY = "hash-encoder-L128"
ITEMS = pl.DataFrame({
    "item_id": ["a", "b", "c"], "title": ["Red mug", "Blue kettle", "Green teapot"],
    "category": ["kitchen", "kitchen", "kitchen"], "brand": ["Acme", None, "Leaf"], "price": [9.0, 30.0, 21.5],
})


class CountingEncoder:
    def __init__(self) -> None:
        self.encoder = InProcessEncoder(HashEncoder())
        self.texts: list[str] = []

    async def encode_bulk(self, texts):
        self.texts.extend(texts)
        return await self.encoder.encode_bulk(texts)


def embed(store: ItemStore, enc) -> int:
    return asyncio.run(store.ensure_embeddings(KEY, enc.encode_bulk, DIM))


def test_rows_titles_and_texts(tmp_path):
    store = ItemStore(ITEMS, tmp_path)
    assert store.rows(["c", "zz", "a"]).tolist() == [2, -1, 0]
    assert store.title("b") == "Blue kettle" and store.title("zz") is None
    assert len(store) == 3 and "Red mug" in store.texts[0]


def test_upserts_persist_and_a_null_field_keeps_the_known_value(tmp_path):
    store = ItemStore(ITEMS, tmp_path)
    store.upsert(pl.DataFrame({"item_id": ["b", "d"], "title": [None, "Steel pan"], "price": [25.0, 40.0]}))
    assert store.item_ids == ["a", "b", "c", "d"]  # rows keep their place; new ones are appended
    b = store.items.row(1, named=True)
    assert (b["title"], b["price"]) == ("Blue kettle", 25.0)
    again = ItemStore(ITEMS, tmp_path)  # a restart reads the upserts back
    assert again.item_ids == store.item_ids and again.items.equals(store.items)


def test_embeddings_are_made_once_and_a_changed_text_is_stale_until_embedded(tmp_path):
    enc = CountingEncoder()
    store = ItemStore(ITEMS, tmp_path)
    assert embed(store, enc) == 3 and embed(store, enc) == 0
    table, current = store.embeddings(KEY)
    np.testing.assert_allclose(np.linalg.norm(table, axis=1), 1.0, rtol=1e-6)
    assert current.all()
    store.upsert(pl.DataFrame({"item_id": ["c"], "title": ["Green teapot, 1 l"]}))
    assert store.embeddings(KEY)[1].tolist() == [True, True, False]  # masked out, not served stale
    assert embed(store, enc) == 1 and enc.texts[-1] == store.texts[2]
    assert store.embeddings(KEY)[1].all()


def test_a_restart_loads_the_embedding_chunks_and_embeds_nothing(tmp_path):
    enc = CountingEncoder()
    store = ItemStore(ITEMS, tmp_path)
    embed(store, enc)
    store.upsert(pl.DataFrame({"item_id": ["d"], "title": ["Steel pan"]}))
    embed(store, enc)
    assert len(list((tmp_path / "embeddings" / KEY).glob("emb-*.safetensors"))) == 2

    async def refuse(texts):
        raise AssertionError(f"asked to embed {texts}")

    again = ItemStore(ITEMS, tmp_path)
    assert asyncio.run(again.ensure_embeddings(KEY, refuse, DIM)) == 0
    np.testing.assert_array_equal(again.embeddings(KEY)[0], store.embeddings(KEY)[0])


def test_a_chunk_of_another_dimension_is_refused(tmp_path):
    embed(ItemStore(ITEMS, tmp_path), CountingEncoder())
    with pytest.raises(ValueError, match="embedding dim 16 != 8"):
        asyncio.run(ItemStore(ITEMS, tmp_path).ensure_embeddings(KEY, None, 8))


def test_the_consolidated_base_is_memory_mapped_and_upserts_change_only_this_process(tmp_path):
    """`consolidate` writes one file per encoder that later processes map copy-on-write (the
    workers of one host share it): they embed nothing, read the same vectors, and an upsert (a
    changed text, a new item) changes their view, not the file."""
    first = ItemStore(ITEMS, tmp_path)
    embed(first, CountingEncoder())
    base = first.consolidate(KEY)
    mtime = base.stat().st_mtime_ns
    assert first.consolidate(KEY) == base and base.stat().st_mtime_ns == mtime  # current: not written again
    want = first.embeddings(KEY)[0][np.arange(3)]

    enc, other = CountingEncoder(), ItemStore(ITEMS, tmp_path)
    assert embed(other, enc) == 0 and enc.texts == []
    table, current = other.embeddings(KEY)
    assert isinstance(table.base.base, np.memmap) and str(base) in open("/proc/self/maps").read()  # a view of the map
    np.testing.assert_array_equal(table[np.arange(3)], want)
    assert current.all()

    other.upsert(pl.DataFrame({"item_id": ["b", "d"], "title": ["Blue kettle, 2 l", "Yellow cup"]}))
    assert embed(other, enc) == 2 and len(enc.texts) == 2  # the changed text and the new item only
    table, current = other.embeddings(KEY)
    assert len(table) == 4 and current.all()
    assert not np.array_equal(table[1], want[1]) and np.array_equal(table[0], want[0])
    np.testing.assert_array_equal(map_safetensor(base, "embedding")[1], want[1])  # the file is unchanged

    third = ItemStore(ITEMS, tmp_path)  # a restart: the base, then the chunk files written after it
    assert embed(third, CountingEncoder()) == 0
    np.testing.assert_array_equal(third.embeddings(KEY)[0][np.arange(4)], other.embeddings(KEY)[0][np.arange(4)])
