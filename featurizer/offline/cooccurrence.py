"""Offline co-occurrence features: cooc_max / cooc_sum of a candidate with the user's recent items.

c(i, h) counts users whose first touches (first engagements) of i and h are at most the
co-occurrence window apart, known at the later one; n counts users engaged; the cosine is
c / sqrt(n_i n_h) (`featurizer.definitions.cooc_cosine`). Two equal paths:

- `cooccurrence_scores`: a cumulative table of every co-occurring pair, read with as-of joins;
- `cooccurrence_scores_dense`: one sweep over the touches with a dense item x item matrix, for
  catalogs whose pair table would not fit in memory (`offline_features(cooc="auto")` picks it up
  to `DENSE_COOC_MAX_ITEMS` items).
"""

from __future__ import annotations

import numpy as np
import polars as pl

from featurizer.definitions import NUMPY, POLARS, FeatureParams, cooc_cosine
from featurizer.offline.point_in_time import (
    ONE,
    asof_before,
    cumulative,
    first_touches,
    recent_items,
)


def cooccurrence_pairs(touches: pl.LazyFrame, window_us: int) -> pl.LazyFrame:
    """Every pair of one user's first touches of distinct items at most `window_us` apart, once per
    order: item_id, __h (the other item), __t = the later of the two instants (when the pair is known)."""
    other = touches.select("user_id", pl.col("item_id").alias("__h"), pl.col("__t").alias("__th"))
    return (
        touches.join(other, on="user_id")
        .filter((pl.col("item_id") != pl.col("__h")) & ((pl.col("__t") - pl.col("__th")).abs() <= window_us))
        .select("item_id", "__h", pl.max_horizontal("__t", "__th").alias("__t"))
    )


def cooccurrence_scores(ev: pl.LazyFrame, q: pl.LazyFrame, params: FeatureParams, own: pl.LazyFrame | None = None) -> pl.LazyFrame:
    """q (__q, user_id, item_id, __t, __ti) -> __q, cooc_max, cooc_sum over the user's recent items (rows with
    history only). The recent items are the user's own, before __t (read from `own`, the queries' users'
    events, when given; `ev` otherwise); the pair and user counts are every user's, before __ti (see
    `offline_features`' `resolution_us`)."""
    hist = recent_items(ev if own is None else own, q.select("user_id", "__t").unique(), params.history_items)
    touches = first_touches(ev)
    pair_cum = cumulative(cooccurrence_pairs(touches, params.cooc_window_us), ["item_id", "__h"], {"c": ONE})
    users_cum = cumulative(touches, ["item_id"], {"n": ONE})
    qh = (
        q.select("__q", "user_id", "item_id", "__t", "__ti")
        .join(hist, on=["user_id", "__t"], how="inner")
        .explode("__hist", empty_as_null=False)
        .filter(pl.col("__hist").is_not_null())
    )
    qh = asof_before(qh, pair_cum, ["item_id", "__hist"], ["item_id", "__h"], "__ti", ["c"], "")
    qh = asof_before(qh, users_cum, ["item_id"], ["item_id"], "__ti", ["n"], "_i")
    qh = asof_before(qh, users_cum.rename({"item_id": "__h"}), ["__hist"], ["__h"], "__ti", ["n"], "_h")
    z = lambda c: pl.col(c).fill_null(0)  # noqa: E731
    cos = cooc_cosine(z("c"), z("n_i"), z("n_h"), POLARS)
    return qh.group_by("__q").agg(cos.max().alias("cooc_max"), cos.sum().alias("cooc_sum"))


def cooccurrence_scores_dense(ev: pl.LazyFrame, q: pl.LazyFrame, params: FeatureParams, own: pl.LazyFrame | None = None) -> pl.LazyFrame:
    """`cooccurrence_scores` by one sweep over the first touches in time order, with a dense item x item
    count matrix instead of a table of every co-occurring pair.

    The pair table grows with the square of a user's items per window: MovieLens-1M users rate
    hundreds of films a day, about 4e8 pairs, more memory than the machine has; the matrix costs
    4 bytes x items². Each touch adds its pairs with the user's earlier touches at most the window
    before it (the later touch dates the pair, as in `cooccurrence_pairs`); a query at __ti reads the
    matrix after every touch before __ti. Same formula (`cooc_cosine`); the sum may differ from the
    pairs path in the last bits (summation order). `own`: as in `cooccurrence_scores`."""
    touches = first_touches(ev).collect()
    qh = (
        q.select("__q", "user_id", "item_id", "__t", "__ti")
        .join(recent_items(ev if own is None else own, q.select("user_id", "__t").unique(), params.history_items), on=["user_id", "__t"], how="inner")
        .filter(pl.col("__hist").list.len() > 0)
        .select("__q", "item_id", "__ti", "__hist")
        .collect()
    )
    schema = {"__q": pl.UInt32, "cooc_max": pl.Float64, "cooc_sum": pl.Float64}
    if qh.is_empty():
        return pl.LazyFrame(schema=schema)
    code = {i: k for k, i in enumerate(pl.concat([touches["item_id"], qh["item_id"]]).unique().sort().to_list())}
    # Touches sorted by (user, time, item); `lo`: the first touch of the same user at most the window earlier.
    tu = touches.with_columns(
        pl.col("item_id").replace_strict(code, return_dtype=pl.Int64).alias("__i"),
        pl.col("user_id").rank("dense").cast(pl.Int64).alias("__u"),
    ).sort(["__u", "__t", "__i"])
    u, t, items = tu["__u"].to_numpy(), tu["__t"].to_numpy(), tu["__i"].to_numpy()
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]]) if u.size else np.zeros(0, np.int64)
    lo = np.empty(u.size, dtype=np.int64)
    for a, b in zip(starts, np.r_[starts[1:], u.size]):
        lo[a:b] = a + np.searchsorted(t[a:b], t[a:b] - params.cooc_window_us, side="left")
    order = np.lexsort((items, u, t))  # application order: time, user, item (a user's earlier rows come first)
    c = np.zeros((len(code), len(code)), dtype=np.int32)
    users = np.zeros(len(code), dtype=np.int64)
    qi = qh["item_id"].replace_strict(code, return_dtype=pl.Int64).to_numpy()
    qt = qh["__ti"].to_numpy()
    hist = np.full((qh.height, int(qh["__hist"].list.len().max())), -1, dtype=np.int64)
    for k, h in enumerate(qh["__hist"].to_list()):
        hist[k, : len(h)] = [code[x] for x in h]
    q_order = np.argsort(qt, kind="stable")
    cuts = np.flatnonzero(np.r_[True, qt[q_order][1:] != qt[q_order][:-1], True])
    out_max, out_sum = np.zeros(qh.height), np.zeros(qh.height)
    p = 0
    for a, b in zip(cuts[:-1], cuts[1:]):
        rows = q_order[a:b]
        while p < order.size and t[order[p]] < qt[rows[0]]:
            r = order[p]
            others = items[lo[r]: r]
            c[items[r], others] += 1
            c[others, items[r]] += 1
            users[items[r]] += 1
            p += 1
        valid = hist[rows] >= 0
        h = np.where(valid, hist[rows], 0)
        i = qi[rows][:, None]
        with np.errstate(invalid="ignore", divide="ignore"):  # 0/0 only where c == 0, which `where` drops
            cos = NUMPY.where(valid, cooc_cosine(c[i, h], users[i], users[h], NUMPY), 0.0)
        out_max[rows], out_sum[rows] = cos.max(axis=1), cos.sum(axis=1)
    return pl.DataFrame({"__q": qh["__q"], "cooc_max": out_max, "cooc_sum": out_sum}, schema=schema).lazy()
