"""The output directory of a batch-scoring job: `_manifest.json` and the part files.

The manifest records what the scores depend on (IDENTITY); `prepare_output` refuses to write
into a directory that holds another job's parts, or clears it on `overwrite`. Parts are written
atomically (temp file, fsync, rename), so a reader or a resumed job sees a whole part or none.
Both engines (serving.batch.job's local loop and serving.batch.ray_engine's actors) write here.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from serving.batch.input import BatchInputError
from serving.batch.scorer import BatchScoringError

log = logging.getLogger(__name__)

MANIFEST = "_manifest.json"
MANIFEST_FORMAT = 1
PART = "part-{:06d}.parquet"
IDENTITY = ("bundle_version", "as_of", "input_fingerprint", "layout", "key", "chunk_candidates", "n_chunks")


class OutputMismatch(BatchScoringError):
    """OUT holds parts of another job (other bundle, as-of, input or chunking)."""

    reason = "BATCH_OUTPUT_MISMATCH"


def part_path(out: Path, k: int) -> Path:
    return out / PART.format(k)


def write_part(out: Path, k: int, table: pa.Table) -> Path:
    """Write `table` as part k atomically: a reader (or a resumed job) sees the whole file or none."""
    path = part_path(out, k)
    tmp = out / f".{path.name}.{os.getpid()}.tmp"
    pq.write_table(table, tmp)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def write_json_atomic(path: Path, doc: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)


def prepare_output(out: Path, identity: dict, overwrite: bool) -> None:
    """Make `out` ready for the job `identity` names (see the module docstring)."""
    mf = out / MANIFEST
    if out.exists() and not out.is_dir():
        raise BatchInputError(f"{out}: exists and is not a directory; the output is a directory of parts")
    if mf.is_file():
        old = json.loads(mf.read_text())
        changed = [k for k in IDENTITY if old.get(k) != identity[k]]
        if changed and not overwrite:
            detail = "; ".join(f"{k}: {old.get(k)!r} -> {identity[k]!r}" for k in changed)
            raise OutputMismatch(f"{out} holds scores of another job ({detail}). Use a new output directory, or "
                                 "--overwrite to delete its parts and start over")
        if changed:
            _clear(out)
    elif out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise OutputMismatch(f"{out}: not empty and has no {MANIFEST}; refusing to write into it "
                                 "(use a new directory, or --overwrite to delete its part files)")
        _clear(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(mf, {"format": MANIFEST_FORMAT, **identity, "complete": False})


def _clear(out: Path) -> None:
    for p in list(out.glob("part-*.parquet")) + list(out.glob(".part-*.tmp")) + [out / MANIFEST]:
        p.unlink(missing_ok=True)
    log.info("cleared earlier parts in %s", out)


def progress_bar(total: int, enabled: bool):
    """A rows progress bar on stderr (tqdm)."""
    from tqdm import tqdm

    return tqdm(total=total, unit="row", unit_scale=True, desc="score", disable=not enabled)
