"""Items in: store upserted item data (persisted) and embed it with every serving encoder.

    await upsert_items(engine, pool, frame)

The data is persisted first (`serving.ranking.item_store.ItemStore.upsert`, append-only chunks
under the state directory) and becomes visible to the online features; then every encoder the
serving bundles use embeds the new or changed texts. When an encoder cannot, `ItemsNotEmbedded`
says so: the data stays stored and a retry embeds only what is still missing.
"""

from __future__ import annotations

import logging

import polars as pl

from featurizer.errors import SemrankError
from serving.encoding.pool import EncoderPool
from serving.ranking.engine import RankingEngine

log = logging.getLogger(__name__)


class ItemsNotEmbedded(SemrankError):
    """Item data is stored, but an encoder could not embed it; a retry of the same call embeds what is missing."""

    grpc_code = "UNAVAILABLE"
    reason = "ITEMS_NOT_EMBEDDED"

    def __init__(self, message: str, stored: int):
        super().__init__(message)
        self.stored = stored

    def error_metadata(self) -> dict[str, str]:
        return {"stored": str(self.stored)}


async def upsert_items(engine: RankingEngine, pool: EncoderPool, items: pl.DataFrame, stored_before: int = 0) -> None:
    """Persist and apply `items` (the item columns; null fields keep known values), then embed them."""
    engine.items.upsert(items)
    await engine.store_worker.write(engine.online.upsert_items, items)
    rows = engine.items.rows(items["item_id"].to_list())
    for handle in pool.handles():
        try:
            await engine.items.ensure_embeddings(handle.key, handle.encoder.encode_bulk, handle.dim, only=rows)
        except Exception as e:
            log.warning("upsert: embedding with encoder %s failed: %s", handle.key, e)
            stored = stored_before + items.height
            raise ItemsNotEmbedded(
                f"the encoder could not embed the items ({type(e).__name__}); their data is stored ({stored} item(s) "
                "so far); retry the call to embed them", stored) from e
