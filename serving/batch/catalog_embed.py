"""`semrank embed-catalog`: embed the catalog items a bundle's encoder lacks, ahead of serving.

    summary = asyncio.run(embed_catalog(bundle_dir, data_dir, state_dir, encoder="inprocess"))

The items are those the server would load (the data directory's, then the upserts in
`state_dir/items`); the embeddings go where the server looks for them
(`state_dir/embeddings/<encoder key>/emb-*.safetensors`, `serving.ranking.item_store`). Missing and
stale items are embedded in chunks, each chunk persisted as it finishes, so an interrupted job
loses at most one chunk and a rerun resumes. A server started on the same state directory (with
the same bundle encoder) then embeds nothing at start-up.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


async def embed_catalog(bundle_dir: Path, data_dir: Path, state_dir: Path, encoder: str = "inprocess",
                        chunk_size: int = 4096, progress: bool = True, threads: int | None = None,
                        triton=None) -> dict:
    """Embed what is missing or stale; returns {"items", "embedded", "chunks", "encoder_key", "seconds"}."""
    from featurizer.contracts.schema import read_dataset
    from ranker.bundle import load_bundle
    from ranker.encoder import encoder_key
    from serving.batch.scorer import BATCH_TRITON
    from serving.encoding.factories import encoder_factory
    from serving.ranking.item_store import ItemStore

    if chunk_size < 1:
        raise ValueError(f"--chunk-size {chunk_size} must be >= 1")
    t0 = time.perf_counter()
    bundle = load_bundle(bundle_dir)
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    ds = read_dataset(data_dir)
    items = ItemStore(ds.items, state_dir)
    if "interest_score" not in bundle.feature_names:
        log.info("bundle %s uses no text features: nothing to embed", bundle.version)
        return {"items": len(items), "embedded": 0, "chunks": 0, "encoder_key": None, "seconds": 0.0}
    key = encoder_key(bundle.encoder.resolve(bundle.path), bundle.encoder.max_length)
    factory = encoder_factory(encoder, threads=threads, triton=BATCH_TRITON, external=triton)  # triton: ExternalTriton
    handle = await factory(bundle.encoder, bundle.path, key)
    try:
        # Load what is on disk (an empty `only` embeds nothing), then embed the rest chunk by chunk.
        await items.ensure_embeddings(key, handle.encoder.encode_bulk, handle.dim, only=np.zeros(0, dtype=np.int64))
        todo = items.stale_rows(key)
        log.info("%d of %d catalog items to embed with encoder %s (%s)", todo.size, len(items), key, encoder)
        from tqdm import tqdm

        done = chunks = 0
        with tqdm(total=int(todo.size), unit="item", desc="embed", disable=not progress) as bar:
            for start in range(0, todo.size, chunk_size):
                rows = todo[start : start + chunk_size]
                n = await items.ensure_embeddings(key, handle.encoder.encode_bulk, handle.dim, only=rows)
                done += n
                chunks += 1
                bar.update(rows.size)
    finally:
        await handle.close()
    return {"items": len(items), "embedded": done, "chunks": chunks, "encoder_key": key,
            "seconds": round(time.perf_counter() - t0, 3)}
