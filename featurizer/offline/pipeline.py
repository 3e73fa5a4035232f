"""Offline features: `offline_features(events, items, queries)`, a lazy polars pipeline.

For every query row (user_id, item_id, ts) it computes the base aggregates of
`featurizer.definitions` from events strictly before ts, then `derive`s the
features. Each entity's history becomes a table of cumulative values per
instant (`cumulative`); a query reads it with an as-of join strictly before its
time (`asof_before`). A window count is a difference of two such reads:
cum(before t) - cum(before window start). Aggregates are computed once per
distinct (entity, t) and joined back, so the many rows of one impression list
cost one lookup.
"""

from __future__ import annotations

import polars as pl

from featurizer.definitions import (
    BASE_COUNTS,
    BASE_FLOATS,
    EVENT_CODE,
    EVENT_PLURALS,
    ITEM_WINDOWS,
    NAMES,
    POLARS,
    USER_WINDOWS,
    WINDOWS,
    FeatureParams,
    derive,
)
from featurizer.offline.cooccurrence import (
    cooccurrence_scores,
    cooccurrence_scores_dense,
)
from featurizer.offline.point_in_time import (
    ONE,
    asof_before,
    cumulative,
    first_touches,
    recent_items,
)

QUERY_REQUIRED = ("user_id", "item_id", "ts")
COOC_METHODS = ("auto", "pairs", "dense")
# "auto" sweeps a dense item x item matrix (4 bytes a cell) up to this many items, else joins pairs.
DENSE_COOC_MAX_ITEMS = 8192
NAN = float("nan")
_CODES = range(len(EVENT_PLURALS))


def catalog(items: pl.LazyFrame) -> pl.LazyFrame:
    """item_id, category, brand (blank -> null), price (<= 0 -> null), log_price: what features read from items."""
    cols = items.collect_schema().names()

    def text(c: str) -> pl.Expr:
        e = pl.col(c).cast(pl.Utf8).str.strip_chars() if c in cols else pl.lit(None, pl.Utf8)
        return pl.when(e != "").then(e).alias(c)

    price = pl.col("price").cast(pl.Float64) if "price" in cols else pl.lit(None, pl.Float64)
    return (
        items.select(pl.col("item_id").cast(pl.Utf8), text("category"), text("brand"), pl.when(price > 0).then(price).alias("price"))
        .unique("item_id", keep="first", maintain_order=True)
        .with_columns(pl.col("price").log().alias("log_price"))
    )


def prepare_events(events: pl.LazyFrame, items: pl.LazyFrame) -> pl.LazyFrame:
    """__t (µs since epoch), user_id, item_id, __code (EVENT_TYPES index), __eng, category, brand, __logprice."""
    code = pl.col("event").cast(pl.Utf8).replace_strict(EVENT_CODE, return_dtype=pl.Int8)
    return (
        events.select(pl.col("ts").dt.epoch("us").alias("__t"), "user_id", "item_id", code.alias("__code"))
        .join(catalog(items).select("item_id", "category", "brand", "log_price"), on="item_id", how="left")
        .with_columns((pl.col("__code") > 0).alias("__eng"))
        .with_columns(pl.when(pl.col("__eng")).then(pl.col("log_price")).alias("__logprice"))
        .drop("log_price")
    )


def _age(last: str) -> pl.Expr:
    """t - last as float µs, NaN when there is no such instant before t."""
    return pl.when(pl.col(last).is_not_null()).then((pl.col("__t") - pl.col(last)).cast(pl.Float64)).otherwise(NAN)


def _windowed_counts(keys: pl.LazyFrame, cum: pl.LazyFrame, by: list[str], windows: tuple[str, ...], prefix: str) -> pl.LazyFrame:
    """`{prefix}_{plural}_{window}` counts for window in `windows` and "all", from a cumulative table with c0..c3."""
    cols = [f"c{k}" for k in _CODES]
    out = keys.with_columns(WINDOWS[w].start_us(pl.col("__t")).alias(f"__s_{w}") for w in windows)
    out = asof_before(out, cum, by, by, "__t", cols, "_all")
    for w in windows:
        out = asof_before(out, cum, by, by, f"__s_{w}", cols, f"_{w}")
    z = lambda c: pl.col(c).fill_null(0)  # noqa: E731
    counts = [z(f"c{k}_all").alias(f"{prefix}_{p}_all") for k, p in enumerate(EVENT_PLURALS)]
    counts += [(z(f"c{k}_all") - z(f"c{k}_{w}")).alias(f"{prefix}_{p}_{w}") for w in windows for k, p in enumerate(EVENT_PLURALS)]
    return out.select(*keys.collect_schema().names(), *counts)


def _code_sums() -> dict[str, pl.Expr]:
    return {f"c{k}": (pl.col("__code") == k).cast(pl.Int64) for k in _CODES}


# ---------------------------------------------------------------- entity aggregates


def item_aggregates(ev: pl.LazyFrame, keys: pl.LazyFrame) -> pl.LazyFrame:
    """keys (item_id, __t) -> item_n_* counts, item_n_users_all and item_first_age_us."""
    out = _windowed_counts(keys, cumulative(ev, ["item_id"], _code_sums()), ["item_id"], ITEM_WINDOWS, "item_n")
    first = ev.group_by("item_id").agg(pl.col("__t").min().alias("__first"))
    users = asof_before(keys, cumulative(first_touches(ev), ["item_id"], {"n": ONE}), ["item_id"], ["item_id"], "__t", ["n"], "")
    return (
        out.join(first, on="item_id", how="left")
        .join(users.select("item_id", "__t", pl.col("n").fill_null(0).alias("item_n_users_all")), on=["item_id", "__t"], how="left")
        .with_columns(
            pl.when(pl.col("__first") < pl.col("__t")).then((pl.col("__t") - pl.col("__first")).cast(pl.Float64)).otherwise(NAN).alias("item_first_age_us")
        )
        .drop("__first")
    )


def user_aggregates(ev: pl.LazyFrame, keys: pl.LazyFrame) -> pl.LazyFrame:
    """keys (user_id, __t) -> user_n_* counts, user_eng_age_us, user_logprice_sum / _n."""
    sums = {**_code_sums(), "lp_sum": pl.col("__logprice").fill_null(0.0), "lp_n": pl.col("__logprice").is_not_null().cast(pl.Int64)}
    cum = cumulative(ev, ["user_id"], sums, {"last_eng": pl.col("__eng")})
    out = _windowed_counts(keys, cum, ["user_id"], USER_WINDOWS, "user_n")
    extra = asof_before(keys, cum, ["user_id"], ["user_id"], "__t", ["lp_sum", "lp_n", "last_eng"], "")
    return out.join(
        extra.select(
            "user_id", "__t", _age("last_eng").alias("user_eng_age_us"),
            pl.col("lp_sum").fill_null(0.0).alias("user_logprice_sum"), pl.col("lp_n").fill_null(0).alias("user_logprice_n"),
        ),
        on=["user_id", "__t"], how="left",
    )


def user_group_counts(ev: pl.LazyFrame, keys: pl.LazyFrame, column: str, key_col: str, name: str) -> pl.LazyFrame:
    """keys (user_id, key_col, __t) -> `name`: the user's engagements on items whose `column` equals key_col."""
    eng = ev.filter(pl.col("__eng") & pl.col(column).is_not_null())
    cum = cumulative(eng, ["user_id", column], {"n": ONE})
    out = asof_before(keys, cum, ["user_id", key_col], ["user_id", column], "__t", ["n"], "")
    value = pl.when(pl.col(key_col).is_null()).then(NAN).otherwise(pl.col("n").fill_null(0).cast(pl.Float64))
    return out.select("user_id", key_col, "__t", value.alias(name))


def user_item_aggregates(ev: pl.LazyFrame, keys: pl.LazyFrame) -> pl.LazyFrame:
    """keys (user_id, item_id, __t) -> ui_n_*_all, ui_imp_age_us, ui_eng_age_us."""
    cum = cumulative(ev, ["user_id", "item_id"], _code_sums(), {"last_imp": pl.col("__code") == 0, "last_eng": pl.col("__eng")})
    by = ["user_id", "item_id"]
    out = asof_before(keys, cum, by, by, "__t", [f"c{k}" for k in _CODES] + ["last_imp", "last_eng"], "")
    return out.select(
        *by, "__t",
        *(pl.col(f"c{k}").fill_null(0).alias(f"ui_n_{p}_all") for k, p in enumerate(EVENT_PLURALS)),
        _age("last_imp").alias("ui_imp_age_us"), _age("last_eng").alias("ui_eng_age_us"),
    )


# ---------------------------------------------------------------- the pipeline


def own_events(ev: pl.LazyFrame, queries: pl.LazyFrame) -> pl.LazyFrame:
    """The events of the queries' users only: what the user-side tables (user, user x item, user x
    category/brand counts, the recent items) read. A user's own aggregates never count another user's
    events, so the values are the same as over the whole log, and a chunk of queries builds tables the
    size of its users' events instead of the whole log's (the event-log term of the training memory,
    docs/training_at_scale.md). The item-side tables (item counts, co-occurrence) need every user."""
    return ev.join(queries.select("user_id").unique(), on="user_id", how="semi")


def _check_queries(names: list[str]) -> None:
    missing = [c for c in QUERY_REQUIRED if c not in names]
    if missing:
        raise ValueError(f"queries lack column(s) {missing}; need user_id, item_id, ts (found: {names})")
    reserved = [c for c in names if c.startswith("__")]
    clash = [c for c in names if c in NAMES and c != "interest_score"]
    if reserved or clash:
        raise ValueError(
            f"queries have column(s) {reserved + clash} that the output would overwrite; rename or drop them "
            "(names starting with '__' are reserved; `interest_score` is the only feature a query may carry)"
        )


def offline_features(
    events: pl.LazyFrame, items: pl.LazyFrame, queries: pl.LazyFrame, params: FeatureParams = FeatureParams(),
    resolution_us: int = 1, cooc: str = "auto",
) -> pl.LazyFrame:
    """Every feature of `FEATURES` for each query row (user_id, item_id, ts), from events strictly before ts.

    Rows and their order are preserved. Query columns pass through, followed by the features in
    FEATURES order (an `interest_score` query column is moved there, as Float64; without one it is NaN).

    `resolution_us` is the time resolution of the log (1: exact times, as the service logs them). With a
    coarser one, e.g. reviews stamped by day whose per-user order is known and written into the µs
    below the day (`training.data.loo.loo_data`), the user's own aggregates (history, user and user x item
    counts) still read the events strictly before ts, while what counts other users' events (item
    aggregates, co-occurrence pairs and users) reads only the ticks before ts's tick: the order of two
    users' same-day events is unknown, so neither may see the other's.

    `cooc` picks how co-occurrence is counted (same values): "pairs" joins a table of every
    co-occurring pair (`cooccurrence_scores`), "dense" sweeps an item x item matrix
    (`cooccurrence_scores_dense`), "auto" takes "dense" up to DENSE_COOC_MAX_ITEMS items.
    """
    if resolution_us < 1:
        raise ValueError(f"resolution_us must be >= 1, got {resolution_us}")
    if cooc not in COOC_METHODS:
        raise ValueError(f"cooc must be one of {', '.join(COOC_METHODS)}, got {cooc!r}")
    if cooc == "auto":
        n_items = items.select(pl.col("item_id").n_unique()).collect().item()
        cooc = "dense" if n_items <= DENSE_COOC_MAX_ITEMS else "pairs"
    scores = cooccurrence_scores_dense if cooc == "dense" else cooccurrence_scores
    names = queries.collect_schema().names()
    _check_queries(names)
    ev = prepare_events(events, items)
    meta = catalog(items).select("item_id", pl.col("category").alias("__category"), pl.col("brand").alias("__brand"), pl.col("price").alias("__price"))
    t = pl.col("ts").dt.epoch("us")
    q = (
        queries.with_row_index("__q")
        .with_columns(t.alias("__t"), ((t // resolution_us) * resolution_us).alias("__ti"))
        .join(meta, on="item_id", how="left")
    )
    keys_i = q.select("item_id", pl.col("__ti").alias("__t")).unique()
    keys_u = q.select("user_id", "__t").unique()
    own = own_events(ev, q)
    parts = [
        (item_aggregates(ev, keys_i).rename({"__t": "__ti"}), ["item_id", "__ti"]),
        (user_aggregates(own, keys_u), ["user_id", "__t"]),
        (user_group_counts(own, q.select("user_id", "__category", "__t").unique(), "category", "__category", "user_cat_n"), ["user_id", "__category", "__t"]),
        (user_group_counts(own, q.select("user_id", "__brand", "__t").unique(), "brand", "__brand", "user_brand_n"), ["user_id", "__brand", "__t"]),
        (user_item_aggregates(own, q.select("user_id", "item_id", "__t").unique()), ["user_id", "item_id", "__t"]),
        (scores(ev, q, params, own), ["__q"]),
    ]
    out = q
    for part, on in parts:
        out = out.join(part, on=on, how="left", nulls_equal=True)
    interest = pl.col("interest_score").cast(pl.Float64) if "interest_score" in names else pl.lit(NAN)
    base = {
        **{c: pl.col(c).fill_null(0) for c in BASE_COUNTS if c != "t_us"},
        **{c: pl.col(c).fill_null(NAN) for c in BASE_FLOATS},
        "t_us": pl.col("__t"),
        "interest_score": interest.fill_null(NAN),
        "item_price": pl.col("__price").fill_null(NAN),
        "cooc_max": pl.col("cooc_max").fill_null(0.0),
        "cooc_sum": pl.col("cooc_sum").fill_null(0.0),
    }
    features = derive(base, POLARS)
    return (
        out.with_columns(**features)
        .sort("__q")
        .select(*(c for c in names if c != "interest_score"), *NAMES)
    )


def user_recent_items(events: pl.LazyFrame, items: pl.LazyFrame, queries: pl.LazyFrame, n: int) -> pl.LazyFrame:
    """queries (user_id, ts, ...) -> the same rows plus `history`: the user's last `n` distinct engaged
    items strictly before ts, most recent first, ties by item_id (the order `OnlineFeatures.history` gives)."""
    q = queries.with_row_index("__q").with_columns(pl.col("ts").dt.epoch("us").alias("__t"))
    keys = q.select("user_id", "__t").unique()
    hist = recent_items(own_events(prepare_events(events, items), q), keys, n)
    return (
        q.join(hist, on=["user_id", "__t"], how="left")
        .sort("__q")
        .with_columns(pl.col("__hist").fill_null(pl.lit([], pl.List(pl.Utf8))).alias("history"))
        .drop("__q", "__t", "__hist")
    )
