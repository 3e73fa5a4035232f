"""Point-in-time building blocks of the offline pipeline: a cumulative table per key and instant,
read by an as-of join strictly before the query's instant (one small function per step).

Every frame here is the prepared events of `featurizer.offline.pipeline.prepare_events`: __t (µs
since epoch), user_id, item_id, __code, __eng (an engagement), ...
"""

from __future__ import annotations

import polars as pl

ONE = pl.col("__t").is_not_null().cast(pl.Int64)  # 1 per row (a literal would not be summed per group)


def cumulative(ev: pl.LazyFrame, keys: list[str], sums: dict[str, pl.Expr], lasts: dict[str, pl.Expr] | None = None) -> pl.LazyFrame:
    """Per key and instant __t: running sums of `sums` up to and including the instant, and for each
    condition in `lasts` the latest instant so far where it held (null before the first).

    Events of one instant are summed first, so an as-of read never sees half an instant.
    """
    lasts = lasts or {}
    t = pl.col("__t")
    return (
        ev.group_by([*keys, "__t"])
        .agg(*(e.sum().alias(n) for n, e in sums.items()), *(t.filter(c).max().alias(n) for n, c in lasts.items()))
        .sort([*keys, "__t"])
        .with_columns(*(pl.col(n).cum_sum().over(keys) for n in sums), *(pl.col(n).forward_fill().over(keys) for n in lasts))
    )


def asof_before(left: pl.LazyFrame, cum: pl.LazyFrame, by_left: list[str], by_right: list[str], on: str, cols: list[str], suffix: str) -> pl.LazyFrame:
    """Attach to each left row `cols` of the latest `cum` row with the same keys and __t < left[on].

    No such row: nulls. Left row order is not kept; join the result back by key.
    """
    right = cum.select(*by_right, pl.col("__t").alias("__rt"), *(pl.col(c).alias(c + suffix) for c in cols))
    return left.sort(on).join_asof(
        right.sort("__rt"), left_on=on, right_on="__rt", by_left=by_left, by_right=by_right,
        strategy="backward", allow_exact_matches=False, check_sortedness=False,
    ).drop("__rt")


def recent_items(ev: pl.LazyFrame, keys: pl.LazyFrame, n: int) -> pl.LazyFrame:
    """keys (user_id, __t) -> __hist: the user's last `n` distinct engaged items before __t, ranked by
    their latest engagement before __t, most recent first, ties by item_id ascending."""
    eng = (
        ev.filter(pl.col("__eng"))
        .select("user_id", "item_id", "__t")
        .unique()
        .sort(["user_id", "__t", "item_id"], descending=[False, False, True])
        .with_columns(pl.int_range(1, pl.len() + 1).over("user_id").alias("__k"))
    )
    upto = eng.group_by("user_id", "__t").agg(pl.col("__k").max())  # engagements up to and including __t
    seqs = eng.group_by("user_id").agg(pl.col("item_id").sort_by("__k").alias("__seq"))
    hist = pl.col("__seq").list.slice(0, pl.col("__k")).list.reverse().list.unique(maintain_order=True).list.head(n)
    return (
        asof_before(keys, upto, ["user_id"], ["user_id"], "__t", ["__k"], "")
        .join(seqs, on="user_id", how="left")
        .select("user_id", "__t", pl.when(pl.col("__k") > 0).then(hist).otherwise(pl.lit([], pl.List(pl.Utf8))).alias("__hist"))
    )


def first_touches(ev: pl.LazyFrame) -> pl.LazyFrame:
    """user_id, item_id, __t: each user's first engagement with each item."""
    return ev.filter(pl.col("__eng")).group_by("user_id", "item_id").agg(pl.col("__t").min())
