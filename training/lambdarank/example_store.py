"""Ranker training examples on disk, added one chunk of whole query groups at a time, so that the
memory of ranker training follows the chunk and LightGBM's binned dataset, not the number of rows.

    store = ExampleStore(inputs)
    for chunk in chunks:                           # frames of whole groups (consecutive `request_id`)
        store.add("train", chunk.filter(...))
        store.add("valid", ..., keep=("interest_score",))   # kept per row in memory: `store.column`
    dtrain = store.dataset("train")                # a lightgbm.Dataset that reads the rows back in batches
    scores = store.predict("valid", booster)

Per part (train, valid, test) the store keeps:
- the bundle's matrix (`ranker.feature_matrix.BundleInputs.frame_matrix`, float32: the values a frame
  would have given) appended to one file of rows in a temporary directory;
- in memory, per row its label (int32) and each `keep` column (float64: the baselines a report
  compares with), per group its size. Groups without a positive are dropped, as LightGBM's lambdarank
  learns nothing from them (`with_positives`).

LightGBM reads a part through `lightgbm.Sequence`: it samples `bin_construct_sample_cnt` rows (200,000
by default) to find the bins, then pushes the rows batch by batch, so only its binned dataset is ever
whole in memory. The rows are read with `os.preadv` into fresh arrays, not mapped, so a file's pages
never count towards the process's resident memory.

Memory while training (docs/training_at_scale.md gives the measured table):

    peak ≈ event log held by the feature pipeline      (the dataset's frames, plus per chunk the
                                                        cumulative tables over that log)
         + one chunk's working set                      (its groups' frame and feature joins,
                                                        `feature_chunk_rows` rows)
         + LightGBM's dataset                           (rows x (about 1 byte per feature, binned,
                                                        + 4 label + 8 per kept column))
"""

from __future__ import annotations

import numbers
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from ranker.feature_matrix import BundleInputs

def group_sizes(df: pl.DataFrame) -> np.ndarray:
    # rows are sorted by (ts, request_id, ...): consecutive runs of request_id are groups
    return df.group_by("request_id", maintain_order=True).len()["len"].to_numpy()


def with_positives(df: pl.DataFrame) -> pl.DataFrame:
    return df.filter((pl.col("label") > 0).any().over("request_id"))


BATCH_ROWS = 65_536  # rows read back at once (LightGBM's pushes and `predict`): 65k x 50 features = 13 MB


def _row_file_class():
    import lightgbm as lgb

    class RowFile(lgb.Sequence):
        """Rows of a float32 matrix file, read on demand (a `lightgbm.Sequence`)."""

        def __init__(self, path: Path, n_rows: int, n_cols: int, batch_size: int):
            self.path, self.n_rows, self.n_cols, self.batch_size = path, n_rows, n_cols, batch_size
            self._fd: int | None = None

        def __len__(self) -> int:
            return self.n_rows

        def read(self, start: int, stop: int) -> np.ndarray:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY)
            out = np.empty((stop - start, self.n_cols), dtype=np.float32)
            want, offset, got = out.nbytes, start * self.n_cols * 4, 0
            view = memoryview(out).cast("B")
            while got < want:  # preadv may return short reads
                n = os.preadv(self._fd, [view[got:]], offset + got)
                if n <= 0:
                    raise OSError(f"{self.path}: rows {start}..{stop} lie past the end of the file")
                got += n
            return out

        def __getitem__(self, idx):
            if isinstance(idx, numbers.Integral):
                k = int(idx) + (self.n_rows if idx < 0 else 0)
                if not 0 <= k < self.n_rows:
                    raise IndexError(idx)
                return self.read(k, k + 1)[0].astype(np.float64)  # LightGBM samples bins from doubles
            if isinstance(idx, slice):
                start, stop, step = idx.indices(self.n_rows)
                if step != 1:
                    raise ValueError("RowFile reads contiguous rows only")
                return self.read(start, max(start, stop))
            raise TypeError(f"RowFile indices are ints or slices, got {type(idx).__name__}")

        def close(self) -> None:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    return RowFile


def _dataset_class():
    import lightgbm as lgb

    class SequenceDataset(lgb.Dataset):
        """A `lightgbm.Dataset` over `lightgbm.Sequence`s that finds its bins as a matrix Dataset does.
        LightGBM 4.7 builds a Sequence Dataset from `Dataset.get_params()`, which keeps the dataset
        parameters only: without `seed` it samples other rows for the bins (`data_random_seed` follows
        `seed`), and without `min_data_in_leaf` its pre-filter of features no split can use counts
        with the default 20. A matrix Dataset is built with every training parameter; so is this one."""

        def get_params(self) -> dict:
            return dict(self.params) if self.params else super().get_params()

    return SequenceDataset


PREFIX, OWNER_FILE = "semrank-examples-", "owner.pid"


def remove_abandoned(directory: str | Path | None = None) -> list[Path]:
    """Remove the example directories of stores whose process is gone (a killed training run leaves
    its files behind: gigabytes at scale). A directory counts as abandoned when its owner file names a
    process that no longer runs; a directory without one (being created, or not a store's) is left.
    Returns the directories removed."""
    import shutil

    root = Path(directory) if directory is not None else Path(tempfile.gettempdir())
    removed = []
    for d in root.glob(PREFIX + "*"):
        try:
            pid = int((d / OWNER_FILE).read_text().strip())
        except (OSError, ValueError):
            continue
        if pid == os.getpid() or _alive(pid):
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@dataclass
class _Part:
    path: Path
    observed_context: bool
    rows: int = 0
    labels: list[np.ndarray] = field(default_factory=list)
    sizes: list[np.ndarray] = field(default_factory=list)
    kept: dict[str, list[np.ndarray]] = field(default_factory=dict)
    last_group: object = None


class ExampleStore:
    """Examples by part, on disk (see the module docstring). `directory`: where the temporary files go
    (None: the system's temporary directory). Use as a context manager, or `close()`: the files are
    removed; those of a killed run are removed by the next store made in the same directory
    (`remove_abandoned`)."""

    def __init__(self, inputs: BundleInputs, directory: str | Path | None = None, batch_rows: int = BATCH_ROWS):
        if batch_rows < 1:
            raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
        self.inputs, self.batch_rows = inputs, batch_rows
        remove_abandoned(directory)
        self._tmp = tempfile.TemporaryDirectory(prefix=PREFIX, dir=directory)
        (Path(self._tmp.name) / OWNER_FILE).write_text(f"{os.getpid()}\n")
        self._parts: dict[str, _Part] = {}
        self._files: list = []

    def __enter__(self) -> ExampleStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for f in self._files:
            f.close()
        self._files.clear()
        self._tmp.cleanup()

    # ------------------------------------------------------------------ writing

    def add(self, part: str, frame: pl.DataFrame, observed_context: bool = True, keep: Sequence[str] = ()) -> None:
        """Append a frame's groups (rows of one `request_id` consecutive, never split between calls) to
        `part`. `observed_context`: the training-only context columns as observed (training) or at the
        bundle's constants (a test table, as served); one part takes one kind. `keep`: columns of the
        frame kept per row in memory (`column`), where the frame has them."""
        p = self._parts.get(part)
        if p is None:
            p = self._parts[part] = _Part(Path(self._tmp.name) / f"{part}.f32", observed_context)
        elif p.observed_context != observed_context:
            raise ValueError(f"part {part!r} was started with observed_context={p.observed_context}")
        frame = with_positives(frame)
        if frame.is_empty():
            return
        first = frame["request_id"][0]
        if p.last_group is not None and first == p.last_group:
            raise ValueError(f"group {first!r} of part {part!r} was split between two chunks")
        X = self.inputs.frame_matrix(frame, observed_context=observed_context)
        with open(p.path, "ab") as f:
            f.write(np.ascontiguousarray(X, dtype=np.float32).data)
        p.rows += X.shape[0]
        p.labels.append(frame["label"].to_numpy().astype(np.int32))
        p.sizes.append(group_sizes(frame))
        for name in keep:
            if name in frame.columns:
                p.kept.setdefault(name, []).append(frame[name].to_numpy().astype(np.float64))
        p.last_group = frame["request_id"][-1]

    # ------------------------------------------------------------------ reading

    def _part(self, part: str) -> _Part:
        if part not in self._parts:
            raise KeyError(f"no examples in part {part!r} (parts: {sorted(self._parts)})")
        return self._parts[part]

    def has(self, part: str) -> bool:
        return part in self._parts and self._parts[part].rows > 0

    def rows(self, part: str) -> int:
        return self._part(part).rows

    def labels(self, part: str) -> np.ndarray:
        return np.concatenate(self._part(part).labels)

    def sizes(self, part: str) -> np.ndarray:
        return np.concatenate(self._part(part).sizes)

    def column(self, part: str, name: str) -> np.ndarray | None:
        """A `keep` column of every row of `part`, or None when its chunks did not carry it."""
        kept = self._part(part).kept.get(name)
        if kept is None or sum(a.size for a in kept) != self._part(part).rows:
            return None
        return np.concatenate(kept)

    def sequence(self, part: str):
        """The rows of `part` as a `lightgbm.Sequence` read from its file."""
        p = self._part(part)
        rows = _row_file_class()(p.path, p.rows, len(self.inputs.feature_names), self.batch_rows)
        self._files.append(rows)
        return rows

    def batches(self, part: str) -> Iterator[np.ndarray]:
        rows = self.sequence(part)
        for a in range(0, len(rows), self.batch_rows):
            yield rows.read(a, min(a + self.batch_rows, len(rows)))

    def matrix(self, part: str) -> np.ndarray:
        """The whole matrix of `part` in memory (small parts and tests: training reads `batches`)."""
        return np.concatenate(list(self.batches(part))) if self.rows(part) else np.zeros((0, len(self.inputs.feature_names)), np.float32)

    def dataset(self, part: str, reference=None):
        """A `lightgbm.Dataset` of `part` that LightGBM reads in batches when it constructs it."""
        return _dataset_class()(self.sequence(part), label=self.labels(part), group=self.sizes(part),
                                feature_name=self.inputs.feature_names, reference=reference, free_raw_data=False)

    def predict(self, part: str, booster, num_iteration: int | None = None) -> np.ndarray:
        """The booster's scores of every row of `part`, batch by batch."""
        out = [booster.predict(X, num_iteration=num_iteration) for X in self.batches(part)]
        return np.concatenate(out) if out else np.zeros(0)
