"""Batch-scoring input: a parquet file (or a directory of them), checked, planned and read in chunks.

Two layouts, told apart by their columns:

- rows:  `user_id`, `item_id`, optional `request_id`, optional inline candidate columns (`title`,
  `description`, `category`, `brand`, `price`), any other columns (context) passed through.
  A request is a run of consecutive rows with the same `request_id` (or `user_id` when there is
  no `request_id` column): rows of one request must be contiguous (sort the input by the key).
- lists: `user_id`, `item_ids` (list of str), optional `request_id`, others passed through;
  one request per row.

`plan_chunks` reads only the key column (rows) or the list lengths (lists), streaming, and cuts
the input into chunks of about `chunk_candidates` candidates that end on a request boundary, so
no request straddles two chunks. `read_rows(start, stop)` reads one chunk, touching only the
row groups that hold it. Memory is bounded by the chunk (and one row group's compressed pages).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from featurizer.errors import SemrankError

SCAN_BATCH_ROWS = 1 << 20  # rows per batch of the planning scan (one column)
READ_BATCH_ROWS = 1 << 16
INLINE_COLUMNS = ("title", "description", "category", "brand", "price")
OUTPUT_COLUMNS = ("score", "rank")


class BatchInputError(SemrankError, ValueError):
    """The input cannot be scored as given; the message names the file, column or row and the fix."""

    grpc_code = "INVALID_ARGUMENT"
    reason = "BATCH_INPUT_INVALID"


@dataclass(frozen=True)
class InputLayout:
    kind: str  # "rows" | "lists"
    key: str  # request key column: request_id when present, else user_id (rows); rows: the row itself
    columns: tuple[str, ...]  # every input column, passed through to the output


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t) or (
        pa.types.is_dictionary(t) and _is_text(t.value_type))


def _is_id(t: pa.DataType) -> bool:
    return _is_text(t) or pa.types.is_integer(t)


class ParquetInput:
    def __init__(self, path: Path):
        self.path = Path(path)
        if self.path.is_dir():
            self.files = sorted(p for p in self.path.glob("*.parquet") if not p.name.startswith((".", "_")))
            if not self.files:
                raise BatchInputError(f"{self.path}: no *.parquet files in this directory")
        elif self.path.is_file():
            self.files = [self.path]
        else:
            raise BatchInputError(f"{self.path}: no such file or directory")
        self._pf: dict[Path, pq.ParquetFile] = {}
        self.schema = self._file(self.files[0]).schema_arrow
        for f in self.files[1:]:
            if not self._file(f).schema_arrow.equals(self.schema):
                raise BatchInputError(f"{f}: its schema differs from {self.files[0]}'s; every input file needs the same columns")
        counts = [self._file(f).metadata.num_rows for f in self.files]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # global first row of each file
        self.num_rows = int(self.offsets[-1])

    def _file(self, f: Path) -> pq.ParquetFile:
        if f not in self._pf:
            self._pf[f] = pq.ParquetFile(f)
        return self._pf[f]

    # ------------------------------------------------------------ checks

    def layout(self) -> InputLayout:
        """The layout and request key, or BatchInputError naming the missing or mistyped column."""
        names = self.schema.names
        where = str(self.path)
        if "user_id" not in names:
            raise BatchInputError(f"{where}: missing column 'user_id' (columns: {names})")
        if "item_ids" in names:
            kind = "lists"
            t = self.schema.field("item_ids").type
            if not ((pa.types.is_list(t) or pa.types.is_large_list(t)) and _is_id(t.value_type)):
                raise BatchInputError(f"{where}: column 'item_ids' is {t}; expected a list of strings (one request per row)")
        elif "item_id" in names:
            kind = "rows"
            if not _is_id(self.schema.field("item_id").type):
                raise BatchInputError(f"{where}: column 'item_id' is {self.schema.field('item_id').type}; expected strings")
        else:
            raise BatchInputError(f"{where}: missing column 'item_id' (one candidate per row) or 'item_ids' "
                                  f"(a list per request) (columns: {names})")
        for c in ("user_id", "request_id"):
            if c in names and not _is_id(self.schema.field(c).type):
                raise BatchInputError(f"{where}: column {c!r} is {self.schema.field(c).type}; expected strings")
        taken = [c for c in OUTPUT_COLUMNS if c in names]
        if taken:
            raise BatchInputError(f"{where}: column(s) {taken} clash with the output's; rename them")
        if kind == "rows":
            for c in INLINE_COLUMNS:
                if c in names and c != "price" and not _is_text(self.schema.field(c).type):
                    raise BatchInputError(f"{where}: inline column {c!r} is {self.schema.field(c).type}; expected strings")
            if "price" in names and not (pa.types.is_floating(self.schema.field("price").type)
                                         or pa.types.is_integer(self.schema.field("price").type)):
                raise BatchInputError(f"{where}: inline column 'price' is {self.schema.field('price').type}; expected numbers")
        key = "request_id" if "request_id" in names else "user_id"
        return InputLayout(kind=kind, key=key, columns=tuple(names))

    def fingerprint(self) -> str:
        """Identifies the content: each file's name and bytes (streamed; ~1 s per GB)."""
        h = hashlib.sha256()
        for f in self.files:
            h.update(f"{f.name}\0{f.stat().st_size}\0".encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    h.update(block)
        return h.hexdigest()[:32]

    # ------------------------------------------------------------ reading

    def scan(self, columns: list[str], batch_rows: int = SCAN_BATCH_ROWS):
        """Record batches of `columns` over all files, in order (streaming)."""
        for f in self.files:
            yield from self._file(f).iter_batches(batch_size=batch_rows, columns=columns)

    def read_rows(self, start: int, stop: int, columns: list[str] | None = None) -> pa.Table:
        """Rows [start, stop) of the concatenated files, reading only the row groups that hold them."""
        parts: list[pa.RecordBatch] = []
        for k, f in enumerate(self.files):
            lo, hi = int(self.offsets[k]), int(self.offsets[k + 1])
            if hi <= start or lo >= stop:
                continue
            pf = self._file(f)
            md = pf.metadata
            first = lo
            groups, group_first = [], None
            for g in range(md.num_row_groups):
                n = md.row_group(g).num_rows
                if first + n > start and first < stop:
                    groups.append(g)
                    group_first = first if group_first is None else group_first
                first += n
            if not groups:
                continue
            pos = group_first
            for batch in pf.iter_batches(batch_size=READ_BATCH_ROWS, row_groups=groups, columns=columns):
                a, b = max(start, pos), min(stop, pos + batch.num_rows)
                if b > a:
                    parts.append(batch.slice(a - pos, b - a))
                pos += batch.num_rows
                if pos >= stop:
                    break
        schema = self.schema if columns is None else pa.schema([self.schema.field(c) for c in columns])
        return pa.Table.from_batches(parts, schema=schema)


def key_breaks(keys: pa.Array) -> np.ndarray:
    """Positions p (1..n-1) where keys[p] != keys[p-1]."""
    if len(keys) < 2:
        return np.zeros(0, dtype=np.int64)
    if pa.types.is_dictionary(keys.type):
        keys = keys.dictionary_decode()
    ne = pc.not_equal(keys.slice(1), keys.slice(0, len(keys) - 1))
    return np.flatnonzero(ne.to_numpy(zero_copy_only=False)) + 1


def plan_chunks(inp: ParquetInput, layout: InputLayout, chunk_candidates: int) -> list[tuple[int, int]]:
    """[(start, stop)] row ranges of about `chunk_candidates` candidates each, ending on request
    boundaries (a request longer than that is a chunk of its own). Streams one column."""
    if chunk_candidates < 1:
        raise ValueError(f"chunk size {chunk_candidates} must be >= 1")
    chunks: list[tuple[int, int]] = []
    start = 0  # first row of the open chunk
    if layout.kind == "lists":
        # Request boundaries are every row; weigh rows by their list length.
        filled = 0
        row = 0
        for batch in inp.scan(["item_ids"]):
            lengths = pc.list_value_length(batch.column(0)).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
            cum = np.cumsum(lengths)
            base = 0  # candidates of this batch before the open chunk's rows in it
            while True:
                # first row k of this batch at which the open chunk reaches the target
                need = chunk_candidates - filled
                k = int(np.searchsorted(cum, base + need, side="left"))
                if k >= len(lengths):
                    filled += int(cum[-1] - base) if len(cum) else 0
                    break
                stop = row + k + 1
                chunks.append((start, stop))
                start, filled, base = stop, 0, int(cum[k])
            row += len(lengths)
        if start < inp.num_rows:
            chunks.append((start, inp.num_rows))
        return chunks
    row = 0
    prev_last = None
    for batch in inp.scan([layout.key]):
        keys = batch.column(0)
        if keys.null_count:
            bad = row + int(np.flatnonzero(keys.is_null().to_numpy(zero_copy_only=False))[0])
            raise BatchInputError(f"{inp.path}: row {bad}: {layout.key} is null; every row needs one")
        breaks = key_breaks(keys) + row
        if prev_last is not None and len(keys) and keys[0].as_py() != prev_last:
            breaks = np.concatenate([[row], breaks])
        while True:  # cut at the first request boundary >= start + chunk_candidates
            j = int(np.searchsorted(breaks, start + chunk_candidates, side="left"))
            if j >= len(breaks):
                break
            chunks.append((start, int(breaks[j])))
            start = int(breaks[j])
        row += len(keys)
        if len(keys):
            prev_last = keys[len(keys) - 1].as_py()
    if start < inp.num_rows:
        chunks.append((start, inp.num_rows))
    return chunks
