"""The catalog the service ranks: item data plus one embedding matrix per text encoder.

    store = ItemStore(items, state_dir)                 # data-dir items, then persisted upserts
    await store.ensure_embeddings(key, encode_bulk)     # embed what is missing (or stale) once
    rows = store.rows(item_ids)                         # -1 for unknown ids
    emb, has = store.embeddings(key)                    # (n_items, dim) float32, bool mask

Item embeddings are computed once per encoder (at start-up for the catalog, at upsert for
new or changed items) and persisted under `state_dir`, so a restart embeds nothing it
already has. Each embedding remembers the hash of the text it was computed from: an item
whose text changed is embedded again.

On disk (append-only chunks, written atomically, replayed in order; later rows win):

    state_dir/items/items-<seq>.parquet                       upserted item data
    state_dir/embeddings/<encoder key>/emb-<seq>-<writer>.safetensors  "embedding" (n, dim) f32,
                                                              "text_hash" (n,) i64; metadata item_ids

One more file per encoder, `base.safetensors`, holds the whole catalog's embeddings in row order
(`consolidate`, which `semrank serve --workers N` runs once). A process maps it copy-on-write
(`RowTable`): the workers of a host share its pages, and only rows an upsert rewrites become
private; rows of items added later live in memory beside it.

The embeddings directory may be shared by the workers of one host (`embeddings_dir`, serving.workers):
each process names its files with a writer id of its own, so two that write at once never pick the
same name; every process reads all of them (sorted by seq, then writer; later rows win, and only
rows whose text hash matches today's text count).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Awaitable, Callable
from itertools import repeat
from pathlib import Path

import numpy as np
import polars as pl

from featurizer.store.snapshot_files import replace_and_sync
from featurizer.text import item_text_expr

log = logging.getLogger(__name__)

ITEM_COLUMNS = {"item_id": pl.Utf8, "title": pl.Utf8, "description": pl.Utf8, "category": pl.Utf8, "brand": pl.Utf8, "price": pl.Float64}
BulkEncodeFn = Callable[[list[str]], Awaitable[np.ndarray]]


def normalize_items(items: pl.DataFrame) -> pl.DataFrame:
    """The item columns the store keeps, typed, missing ones null."""
    cols = items.columns
    return items.select(
        [(pl.col(c).cast(t) if c in cols else pl.lit(None, t)).alias(c) for c, t in ITEM_COLUMNS.items()]
    )


def text_hashes(texts: list[str]) -> np.ndarray:
    """The 64-bit hash of each item text an embedding remembers (to tell when the text changed)."""
    return np.array(
        [int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little", signed=True) for t in texts],
        dtype=np.int64,
    )


BASE_FILE = "base.safetensors"


def _file_seq(path: Path) -> int:
    t = path.name.split(".")[0].split("-")
    return int(t[1]) if len(t) > 1 and t[1].isdigit() else 0


def _next_seq(directory: Path, prefix: str) -> int:
    """1 + the highest seq among `<prefix>-<seq>[-<writer>]` files (the writer part is optional)."""
    seqs = [int(t[1]) for p in directory.glob(f"{prefix}-*") if len(t := p.name.split(".")[0].split("-")) > 1 and t[1].isdigit()]
    return max(seqs, default=0) + 1


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    replace_and_sync(tmp, path)


class RowTable:
    """An (n, dim) float32 table: `base` (a memory-mapped, copy-on-write array: shared with other
    processes until a row is written) and rows appended after it in memory. Supports what the
    engine does with a table: `len`, `.shape`, a gather by an int array, one row by an int, and
    assignment to rows."""

    def __init__(self, base: np.ndarray, dim: int):
        # A plain ndarray view of the map (the same pages): numpy.memmap's own indexing builds a
        # memmap object per gather, a cost per request for nothing.
        self.base, self.dim = np.asarray(base), dim
        self.extra = np.zeros((0, dim), dtype=np.float32)

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.base) + len(self.extra), self.dim)

    def __len__(self) -> int:
        return len(self.base) + len(self.extra)

    def grow(self, n: int) -> None:
        self.extra = np.vstack([self.extra, np.zeros((n, self.dim), dtype=np.float32)])

    def __getitem__(self, rows):
        nb = len(self.base)
        if np.isscalar(rows):
            return self.base[rows] if rows < nb else self.extra[rows - nb]
        rows = np.asarray(rows)
        if not len(self.extra) or (rows.size and rows.max() < nb):  # (the usual case: one gather)
            return self.base[rows]
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        inb = rows < nb
        out[inb] = self.base[rows[inb]]
        out[~inb] = self.extra[rows[~inb] - nb]
        return out

    def __setitem__(self, rows, values) -> None:
        nb = len(self.base)
        rows, values = np.atleast_1d(np.asarray(rows)), np.asarray(values, dtype=np.float32).reshape(-1, self.dim)
        inb = rows < nb
        if inb.any():
            self.base[rows[inb]] = values[inb]
        if (~inb).any():
            self.extra[rows[~inb] - nb] = values[~inb]


def _ids_digest(item_ids: list[str]) -> str:
    return hashlib.blake2b("\n".join(item_ids).encode(), digest_size=16).hexdigest()


def map_safetensor(path: Path, name: str) -> np.ndarray:
    """Tensor `name` of a safetensors file as a copy-on-write memory map (F32 or I64)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    t = header[name]
    dtype = {"F32": "<f4", "I64": "<i8"}[t["dtype"]]
    start, _ = t["data_offsets"]
    return np.memmap(path, dtype=dtype, mode="c", offset=8 + n + start, shape=tuple(t["shape"]))


class ItemStore:
    def __init__(self, items: pl.DataFrame, state_dir: Path | None = None, embeddings_dir: Path | None = None):
        self.state_dir = state_dir
        self.embeddings_dir = embeddings_dir if embeddings_dir is not None else (
            state_dir / "embeddings" if state_dir is not None else None)
        self._writer = f"{os.getpid():x}{os.urandom(3).hex()}"  # this process's files in a shared embeddings_dir
        frames = [normalize_items(items)]
        if state_dir is not None:
            (state_dir / "items").mkdir(parents=True, exist_ok=True)
            chunks = sorted((state_dir / "items").glob("items-*.parquet"))
            frames += [normalize_items(pl.read_parquet(p)) for p in chunks]
            if chunks:
                log.info("item store: %d upsert chunk(s) replayed from %s", len(chunks), state_dir / "items")
        merged = frames[0].unique("item_id", keep="first", maintain_order=True)
        for f in frames[1:]:
            merged = merged.update(f.unique("item_id", keep="last", maintain_order=True), on="item_id", how="full")
        self._set_items(merged)
        self._emb: dict[str, np.ndarray] = {}
        self._emb_hash: dict[str, np.ndarray] = {}  # text hash each row was embedded from (0 = none)
        self._current: dict[str, np.ndarray] = {}  # _emb_hash == text_hash, kept in step (read per request)
        # Bumped whenever any key's vectors or current rows may have changed (every change goes through
        # _refresh_current): what is computed from them (a pooled user vector) is valid while it holds.
        self.vectors_version = 0

    # ------------------------------------------------------------ item data

    def _set_items(self, items: pl.DataFrame) -> None:
        self.items = items
        self.item_ids: list[str] = items["item_id"].to_list()
        self.index = {i: k for k, i in enumerate(self.item_ids)}
        self.titles: list[str | None] = items["title"].to_list()
        self.texts: list[str] = items.select(item_text_expr())["item_text"].to_list()
        self.text_hash = text_hashes(self.texts)

    def __len__(self) -> int:
        return len(self.item_ids)

    def title(self, item_id: str) -> str | None:
        k = self.index.get(item_id)
        return None if k is None else self.titles[k]

    def rows(self, item_ids: list[str]) -> np.ndarray:
        return np.fromiter(map(self.index.get, item_ids, repeat(-1)), dtype=np.int64, count=len(item_ids))

    def upsert(self, items: pl.DataFrame) -> None:
        """Add items or update known ones in place (persisted first when the store has a state dir).

        A null field leaves the known value unchanged. Embeddings of changed texts are stale
        (masked out by `embeddings`) until `ensure_embeddings` runs."""
        new = normalize_items(items).unique("item_id", keep="last", maintain_order=True)
        if new.is_empty():
            return
        if self.state_dir is not None:
            d = self.state_dir / "items"
            _write_atomic(d / f"items-{_next_seq(d, 'items'):08d}.parquet", new.write_parquet)
        old_n = len(self.item_ids)
        self._set_items(self.items.update(new, on="item_id", how="full"))  # rows keep their place
        grow = len(self.item_ids) - old_n
        for key, emb in self._emb.items():
            if grow:
                emb.grow(grow)
                self._emb_hash[key] = np.append(self._emb_hash[key], np.zeros(grow, dtype=np.int64))
        self._refresh_current()

    # ------------------------------------------------------------ embeddings

    def keys(self) -> list[str]:
        return list(self._emb)

    def embeddings(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(n_items, dim) unit rows and the mask of rows that are current (embedded from today's text)."""
        return self._emb[key], self._current[key]

    def _refresh_current(self, *keys: str) -> None:
        for key in keys or list(self._emb_hash):
            self._current[key] = self._emb_hash[key] == self.text_hash
        self.vectors_version += 1

    def stale_rows(self, key: str) -> np.ndarray:
        if key not in self._emb:
            return np.arange(len(self.item_ids))
        return np.flatnonzero(~self._current[key])

    def _load_embeddings(self, key: str, dim: int) -> None:
        n = len(self.item_ids)
        base, hashes, through = None, np.zeros(n, dtype=np.int64), 0
        d = self.embeddings_dir / key if self.embeddings_dir is not None else None
        if d is not None and (d / BASE_FILE).exists():
            base, hashes, through = self._map_base(d / BASE_FILE, dim)
        if base is None:
            base = np.zeros((n, dim), dtype=np.float32)
        table = RowTable(base, dim)
        if len(base) < n:
            table.grow(n - len(base))
            hashes = np.append(hashes, np.zeros(n - len(hashes), dtype=np.int64))
        if d is not None:
            from safetensors import safe_open
            from safetensors.numpy import load_file

            for p in sorted(d.glob("emb-*.safetensors")):
                if _file_seq(p) <= through:
                    continue  # in the base file already
                with safe_open(str(p), framework="numpy") as f:
                    ids = json.loads(f.metadata()["item_ids"])
                t = load_file(str(p))
                rows = self.rows(ids)
                ok = rows >= 0
                if t["embedding"].shape[1] != dim:
                    raise ValueError(f"{p}: embedding dim {t['embedding'].shape[1]} != {dim}")
                fresh = ok.copy()  # only rows whose text differs from what the table holds (keeps base pages shared)
                fresh[ok] = hashes[rows[ok]] != t["text_hash"][ok]
                if fresh.any():
                    table[rows[fresh]] = t["embedding"][fresh]
                    hashes[rows[fresh]] = t["text_hash"][fresh]
        self._emb[key], self._emb_hash[key] = table, hashes
        self._refresh_current(key)

    def _map_base(self, path: Path, dim: int) -> tuple[np.ndarray | None, np.ndarray, int]:
        """The base file mapped, if it was made for this catalog's first rows (else None)."""
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata()
        rows = int(meta["rows"])
        if rows > len(self.item_ids) or meta["item_ids_digest"] != _ids_digest(self.item_ids[:rows]):
            log.warning("%s was made for another catalog: not used (its embeddings load from the chunk files)", path)
            return None, np.zeros(len(self.item_ids), dtype=np.int64), 0
        emb = map_safetensor(path, "embedding")
        if emb.shape[1] != dim:
            raise ValueError(f"{path}: embedding dim {emb.shape[1]} != {dim}")
        return emb, np.array(map_safetensor(path, "text_hash")), int(meta["through_seq"])

    def consolidate(self, key: str) -> Path | None:
        """Write `base.safetensors` for `key`: every row's embedding in row order, through the
        newest chunk file (after `ensure_embeddings`). Processes that load after it map it."""
        if self.embeddings_dir is None or key not in self._emb:
            return None
        from safetensors.numpy import save_file

        d = self.embeddings_dir / key
        through = max((_file_seq(p) for p in d.glob("emb-*.safetensors")), default=0)
        if (d / BASE_FILE).exists():
            from safetensors import safe_open

            with safe_open(str(d / BASE_FILE), framework="numpy") as f:
                meta = f.metadata()
            if (int(meta["through_seq"]) == through and meta["rows"] == str(len(self.item_ids))
                    and meta["item_ids_digest"] == _ids_digest(self.item_ids)):
                return d / BASE_FILE  # current already
        table = self._emb[key]
        emb = table[np.arange(len(table))]
        meta = {"rows": str(len(table)), "item_ids_digest": _ids_digest(self.item_ids), "through_seq": str(through)}
        _write_atomic(d / BASE_FILE, lambda p: save_file({"embedding": emb, "text_hash": self._emb_hash[key]}, str(p),
                                                         metadata=meta))
        return d / BASE_FILE

    async def ensure_embeddings(self, key: str, encode_bulk: BulkEncodeFn, dim: int, only: np.ndarray | None = None) -> int:
        """Embed the rows of `key` that are missing or stale (or only those in `only`); returns how many."""
        if key not in self._emb:
            self._load_embeddings(key, dim)
        stale = self.stale_rows(key)
        if only is not None:
            stale = np.intersect1d(stale, only)
        if stale.size == 0:
            return 0
        texts = [self.texts[k] for k in stale]
        hashes = self.text_hash[stale].copy()
        vectors = np.asarray(await encode_bulk(texts), dtype=np.float32)
        if self.embeddings_dir is not None:
            from safetensors.numpy import save_file

            d = self.embeddings_dir / key
            d.mkdir(parents=True, exist_ok=True)
            meta = {"item_ids": json.dumps([self.item_ids[k] for k in stale])}
            path = d / f"emb-{_next_seq(d, 'emb'):08d}-{self._writer}.safetensors"
            _write_atomic(path, lambda p: save_file({"embedding": vectors, "text_hash": hashes}, str(p), metadata=meta))
        self._emb[key][stale] = vectors
        self._emb_hash[key][stale] = hashes
        self._refresh_current(key)
        return int(stale.size)
