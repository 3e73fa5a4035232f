"""Items in: store upserted item data (persisted) and embed it with every serving encoder.

    seq = await upsert_items(engine, pool, frame, share=ingest.publish_items)   # share: replicas on JetStream
    await apply_shared_items(engine, pool, items)                                # another replica's upsert

The data is persisted first (`serving.ranking.item_store.ItemStore.upsert`, append-only chunks
under the state directory) and becomes visible to the online features; then every encoder the
serving bundles use embeds the new or changed texts. When an encoder cannot, `ItemsNotEmbedded`
says so: the data stays stored and a retry embeds only what is still missing.

With `--events jetstream` the rows then go on the stream (serving.ingest.jetstream), each with
the embeddings this replica computed (per encoder key, with the hash of the text they came from),
and the call answers once JetStream acknowledged them, with their sequence (a token for
`RankRequest.min_sequence`). Every other replica folds them in stream order: it stores the rows in
its own state directory and takes the embeddings whose text hash matches its own merged text, so
it does not call its encoder for them; it embeds only the rest. When the rows cannot be shared,
`ItemsNotShared` says so: stored here, not on the other replicas; a retry of the call shares them.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import numpy as np
import polars as pl

from featurizer.errors import SemrankError
from serving.encoding.pool import EncoderPool
from serving.ranking.engine import RankingEngine
from serving.ranking.item_store import ITEM_COLUMNS, text_hashes

ITEM_SCHEMA = dict(ITEM_COLUMNS)

log = logging.getLogger(__name__)


class ItemsNotEmbedded(SemrankError):
    """Item data is stored, but an encoder could not embed it; a retry of the same call embeds what is missing."""

    grpc_code = "UNAVAILABLE"
    reason = "ITEMS_NOT_EMBEDDED"

    def __init__(self, message: str, stored: int, embedded: int | None = None):
        super().__init__(message)
        self.stored, self.embedded = stored, embedded

    def error_metadata(self) -> dict[str, str]:
        out = {"stored": str(self.stored)}
        if self.embedded is not None:
            out["embedded"] = str(self.embedded)
        return out


EMBED_CHUNK = 256  # items embedded (and persisted) at a time by UpsertItems: a failure keeps what was done


class ItemsNotShared(SemrankError):
    """Item data is stored and embedded on this replica, but JetStream did not take it for the others."""

    grpc_code = "UNAVAILABLE"
    reason = "ITEMS_NOT_SHARED"

    def __init__(self, message: str, stored: int = 0):
        super().__init__(message)
        self.stored = stored

    def error_metadata(self) -> dict[str, str]:
        return {"stored": str(self.stored)}


ShareFn = Callable[[list[tuple[dict, dict]]], Awaitable[int]]


async def upsert_items(engine: RankingEngine, pool: EncoderPool, items: pl.DataFrame, stored_before: int = 0,
                       share: ShareFn | None = None) -> int:
    """Persist and apply `items` (the item columns; null fields keep known values), embed them, and
    (`share`) publish them for the other replicas. Returns the stream seq of the last one (0: not shared)."""
    engine.items.upsert(items)
    await engine.store_worker.write(engine.online.upsert_items, items)
    rows = engine.items.rows(items["item_id"].to_list())
    for handle in pool.handles():
        done = 0  # items of this message embedded (and persisted) with this encoder
        try:
            for start in range(0, len(rows), EMBED_CHUNK):  # through the encoder's bulk lane: Ranks go first
                chunk = rows[start : start + EMBED_CHUNK]
                await engine.items.ensure_embeddings(handle.key, handle.encoder.encode_bulk, handle.dim, only=chunk)
                done += len(chunk)
        except Exception as e:
            log.warning("upsert: embedding with encoder %s failed after %d of %d item(s): %s", handle.key, done,
                        len(rows), e)
            stored = stored_before + items.height
            raise ItemsNotEmbedded(
                f"the encoder could not embed the items ({type(e).__name__}): every item is stored ({stored} so far "
                f"in this call), {done} of the {len(rows)} in this message are embedded; retry the call to embed the "
                "rest (the stored and embedded ones are not redone)", stored, done) from e
    if share is None:
        return 0
    store = engine.items
    shared = []
    for row, k in zip(items.to_dicts(), rows.tolist()):
        embeddings = {}
        for key in store.keys():
            emb, current = store.embeddings(key)
            if current[k]:
                embeddings[key] = (int(store.text_hash[k]), emb[k])
        shared.append((row, embeddings))
    try:
        return await share(shared)
    except ItemsNotShared as e:
        stored = stored_before + items.height
        raise ItemsNotShared(f"{items.height} item(s) are stored and embedded on this replica, but not shared with the "
                             f"others ({e}); retry the call to share them", stored) from None


def shared_items_frame(shared) -> pl.DataFrame:
    """The item rows of shared item messages (serving.ingest.jetstream.SharedItem) as one frame."""
    return pl.DataFrame([s.row for s in shared], schema=ITEM_SCHEMA)


async def apply_shared_items(engine: RankingEngine, pool: EncoderPool, shared) -> None:
    """Fold item rows another replica shared (serving.ingest.jetstream.SharedItem): store them,
    take the embeddings whose text hash matches this replica's text, embed the rest. An encoder
    failure is logged, not raised (the fold must go on): those rows are embedded at the next start
    or upsert, and rank without their text until then."""
    frame = shared_items_frame(shared)
    engine.items.upsert(frame)
    await engine.store_worker.write(engine.online.upsert_items, frame)
    rows = engine.items.rows(frame["item_id"].to_list())
    for handle in pool.handles():
        given = {h: v for s in shared if handle.key in s.embeddings for h, v in [s.embeddings[handle.key]]}

        async def encode(texts: list[str], _given=given, _encoder=handle.encoder) -> np.ndarray:
            hashes = text_hashes(texts)
            out = np.zeros((len(texts), handle.dim), dtype=np.float32)
            todo = [k for k, h in enumerate(hashes.tolist()) if h not in _given or len(_given[h]) != handle.dim]
            for k, h in enumerate(hashes.tolist()):
                if k not in todo:
                    out[k] = _given[h]
            if todo:
                out[todo] = await _encoder.encode_bulk([texts[k] for k in todo])
            return out

        try:
            await engine.items.ensure_embeddings(handle.key, encode, handle.dim, only=rows)
        except Exception as e:  # noqa: BLE001 - see the docstring
            log.warning("shared items: embedding %d row(s) with encoder %s failed (%s); they are embedded at the "
                        "next start or upsert", len(rows), handle.key, type(e).__name__)
