"""Batch-scoring input: layout checks, chunk plans on request boundaries, row-range reads."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.batch.input import BatchInputError, ParquetInput, plan_chunks


def write(path, table: pa.Table, row_group_size: int = 7):
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def rows_table(run_lengths: list[int], with_request_id: bool = True) -> pa.Table:
    req = [f"r{k}" for k, n in enumerate(run_lengths) for _ in range(n)]
    cols = {"user_id": [f"u{k % 3}" for k, n in enumerate(run_lengths) for _ in range(n)],
            "item_id": [f"i{j}" for n in run_lengths for j in range(n)], "context": list(range(len(req)))}
    if with_request_id:
        cols = {"request_id": req, **cols}
    return pa.table(cols)


@settings(max_examples=60, deadline=None)
@given(runs=st.lists(st.integers(1, 30), min_size=1, max_size=40), chunk=st.integers(1, 80))
def test_rows_plan_covers_the_input_and_cuts_only_between_requests(tmp_path_factory, runs, chunk):
    path = write(tmp_path_factory.mktemp("p") / "in.parquet", rows_table(runs))
    inp = ParquetInput(path)
    plan = plan_chunks(inp, inp.layout(), chunk)
    starts = set(np.cumsum([0] + runs).tolist())
    assert plan[0][0] == 0 and plan[-1][1] == sum(runs)
    assert all(a[1] == b[0] for a, b in zip(plan, plan[1:]))
    for start, stop in plan:
        assert start in starts and stop in starts  # whole requests only
        # as small as possible: dropping the last request would go below the target
        last_run_start = max(s for s in starts if s < stop)
        assert stop - start >= chunk or stop == sum(runs)
        assert last_run_start - start < chunk or last_run_start == start


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(0, 20), min_size=1, max_size=50), chunk=st.integers(1, 60))
def test_lists_plan_weighs_rows_by_their_candidates(tmp_path_factory, lengths, chunk):
    table = pa.table({"user_id": [f"u{k}" for k in range(len(lengths))],
                      "item_ids": pa.array([[f"i{j}" for j in range(n)] for n in lengths], pa.list_(pa.string()))})
    path = write(tmp_path_factory.mktemp("p") / "in.parquet", table, row_group_size=5)
    inp = ParquetInput(path)
    plan = plan_chunks(inp, inp.layout(), chunk)
    assert plan[0][0] == 0 and plan[-1][1] == len(lengths)
    cum = np.concatenate([[0], np.cumsum(lengths)])
    for start, stop in plan[:-1]:
        assert cum[stop] - cum[start] >= chunk > cum[stop - 1] - cum[start]


def test_read_rows_reads_exact_ranges_across_files_and_row_groups(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    t = rows_table([3, 5, 2, 9, 4, 1])
    write(d / "a.parquet", t.slice(0, 10), row_group_size=4)
    write(d / "b.parquet", t.slice(10), row_group_size=3)
    inp = ParquetInput(d)
    assert inp.num_rows == t.num_rows
    for start, stop in [(0, 24), (2, 11), (10, 11), (9, 10), (13, 24), (5, 5)]:
        assert inp.read_rows(start, stop).equals(t.slice(start, stop - start))


def test_key_is_request_id_else_user_id(tmp_path):
    inp = ParquetInput(write(tmp_path / "a.parquet", rows_table([2, 2])))
    assert inp.layout().key == "request_id" and inp.layout().kind == "rows"
    inp = ParquetInput(write(tmp_path / "b.parquet", rows_table([2, 2], with_request_id=False)))
    assert inp.layout().key == "user_id"


@pytest.mark.parametrize("table, message", [
    (pa.table({"item_id": ["i"]}), r"a\.parquet: missing column 'user_id'"),
    (pa.table({"user_id": ["u"], "sku": ["i"]}), r"a\.parquet: missing column 'item_id'"),
    (pa.table({"user_id": ["u"], "item_id": [1.5]}), r"column 'item_id' is double"),
    (pa.table({"user_id": ["u"], "item_ids": ["i"]}), r"column 'item_ids' is string; expected a list"),
    (pa.table({"user_id": ["u"], "item_id": ["i"], "score": [1.0]}), r"clash with the output"),
    (pa.table({"user_id": ["u"], "item_id": ["i"], "price": ["cheap"]}), r"'price' is string"),
])
def test_bad_layouts_name_the_file_and_column(tmp_path, table, message):
    inp = ParquetInput(write(tmp_path / "a.parquet", table))
    with pytest.raises(BatchInputError, match=message):
        inp.layout()


def test_null_request_key_is_an_error(tmp_path):
    t = pa.table({"request_id": ["a", None], "user_id": ["u", "u"], "item_id": ["i", "j"]})
    inp = ParquetInput(write(tmp_path / "a.parquet", t))
    with pytest.raises(BatchInputError, match="row 1: request_id is null"):
        plan_chunks(inp, inp.layout(), 10)


def test_fingerprint_changes_with_content(tmp_path):
    a = ParquetInput(write(tmp_path / "a.parquet", rows_table([2, 3]))).fingerprint()
    assert ParquetInput(write(tmp_path / "a.parquet", rows_table([2, 3]))).fingerprint() == a
    assert ParquetInput(write(tmp_path / "a.parquet", rows_table([3, 2]))).fingerprint() != a
