"""Behavioural features, point-in-time correct.

One definition serves both modes:
- offline, `point_in_time_features` answers "what did we know about (user, item)
  strictly before t" for every training row with as-of joins;
- online, `OnlineSnapshot.build` runs the very same pipeline at one instant for
  every item and user-item pair, and serving gathers rows from it by index.

Only events with ts < t count for a query at t (strictly before: an event at
the same instant as the query is not yet known).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
import polars as pl

from featurizer.schema import EVENT_STRENGTH

# Beta prior of the click-through rate: a new item starts near PRIOR_CTR and
# needs about PRIOR_STRENGTH impressions before its own data dominates.
PRIOR_CTR = 0.05
PRIOR_STRENGTH = 20.0

WINDOW_7D = timedelta(days=7)

ITEM_FEATURES = (
    "item_impressions_all",
    "item_clicks_all",
    "item_purchases_all",
    "item_clicks_7d",
    "item_ctr_all",
)
USER_ITEM_FEATURES = ("user_item_impressions_all", "user_item_engagements_all")
TEXT_FEATURES = ("interest_score",)
# Context known only for logged lists. `position` debiases training on clicks (which
# follow position); at inference every candidate gets the same constant.
CONTEXT_FEATURES = ("position",)
INFERENCE_CONSTANTS: dict[str, float] = {"position": 0.0}
# The ranker's input, in order. The bundle manifest records the list it was trained on.
FEATURE_NAMES = TEXT_FEATURES + ITEM_FEATURES + USER_ITEM_FEATURES + CONTEXT_FEATURES
BEHAVIOURAL_FEATURES = ITEM_FEATURES + USER_ITEM_FEATURES

ENGAGEMENTS = ("click", "add_to_cart", "purchase")


def smoothed_rate(successes, trials, prior_rate: float = PRIOR_CTR, prior_strength: float = PRIOR_STRENGTH):
    """Beta-smoothed rate; works on polars expressions and numpy arrays alike."""
    return (successes + prior_rate * prior_strength) / (trials + prior_strength)


# ---------------------------------------------------------------- offline (polars)


def _event_count_exprs() -> list[pl.Expr]:
    ev = pl.col("event")
    return [
        (ev == "impression").cast(pl.Int64).alias("n_impressions"),
        (ev == "click").cast(pl.Int64).alias("n_clicks"),
        (ev == "purchase").cast(pl.Int64).alias("n_purchases"),
        ev.is_in(list(ENGAGEMENTS)).cast(pl.Int64).alias("n_engagements"),
    ]


def cumulative_counts(events: pl.LazyFrame, keys: list[str]) -> pl.LazyFrame:
    """Per key and instant, counts of events up to and including that instant.

    Events sharing an instant are summed first, so an as-of lookup never sees
    half of the events of one instant.
    """
    counts = ["n_impressions", "n_clicks", "n_purchases", "n_engagements"]
    return (
        events.with_columns(_event_count_exprs())
        .group_by([*keys, "ts"])
        .agg(pl.col(c).sum() for c in counts)
        .sort([*keys, "ts"])
        .with_columns(pl.col(c).cum_sum().over(keys).alias(f"cum_{c[2:]}") for c in counts)
        .select([*keys, "ts", *(f"cum_{c[2:]}" for c in counts)])
    )


def asof_before(queries: pl.LazyFrame, cum: pl.LazyFrame, keys: list[str], suffix: str, shift: timedelta | None = None) -> pl.LazyFrame:
    """Join each query to the latest cumulative row strictly before its ts (minus `shift`)."""
    q = queries.with_row_index("_q")
    on = pl.col("ts") - shift if shift else pl.col("ts")
    q = q.with_columns(on.alias("_asof_ts"))
    right = cum.rename({"ts": "_asof_ts"}).rename({c: f"{c}{suffix}" for c in ("cum_impressions", "cum_clicks", "cum_purchases", "cum_engagements")})
    # join_asof needs both sides sorted by the on-key.
    joined = q.sort("_asof_ts").join_asof(
        right.sort("_asof_ts"), on="_asof_ts", by=keys, strategy="backward", allow_exact_matches=False, check_sortedness=False
    )
    return joined.sort("_q").drop("_q", "_asof_ts")


def point_in_time_features(events: pl.LazyFrame, queries: pl.LazyFrame) -> pl.LazyFrame:
    """Behavioural features for each query row (user_id, item_id, ts), from events strictly before ts.

    Rows and their order are preserved; extra query columns pass through.
    """
    events = events.select("ts", "user_id", "item_id", "event")
    item_cum = cumulative_counts(events, ["item_id"])
    ui_cum = cumulative_counts(events, ["user_id", "item_id"])
    out = asof_before(queries, item_cum, ["item_id"], "_item")
    out = asof_before(out, item_cum, ["item_id"], "_item7", shift=WINDOW_7D)
    out = asof_before(out, ui_cum, ["user_id", "item_id"], "_ui")
    z = lambda c: pl.col(c).fill_null(0)  # noqa: E731  (no event before t: count 0)
    out = out.with_columns(
        z("cum_impressions_item").cast(pl.Float32).alias("item_impressions_all"),
        z("cum_clicks_item").cast(pl.Float32).alias("item_clicks_all"),
        z("cum_purchases_item").cast(pl.Float32).alias("item_purchases_all"),
        (z("cum_clicks_item") - z("cum_clicks_item7")).cast(pl.Float32).alias("item_clicks_7d"),
        smoothed_rate(z("cum_clicks_item"), z("cum_impressions_item")).cast(pl.Float32).alias("item_ctr_all"),
        z("cum_impressions_ui").cast(pl.Float32).alias("user_item_impressions_all"),
        z("cum_engagements_ui").cast(pl.Float32).alias("user_item_engagements_all"),
    )
    return out.drop(pl.col("^cum_.*$"))


def user_histories(events: pl.LazyFrame, queries: pl.LazyFrame, max_items: int) -> pl.LazyFrame:
    """For each query (user_id, ts): the user's last `max_items` distinct engaged items strictly
    before ts, most recent first (stronger events first within one instant), as `history`.

    Output has the query columns plus `history: list[str]`, rows in query order.
    """
    strength = pl.col("event").cast(pl.Utf8).replace_strict(EVENT_STRENGTH, return_dtype=pl.Int8)
    eng = (
        events.filter(pl.col("event").is_in(list(ENGAGEMENTS)))
        .with_columns(strength.alias("_strength"))
        .sort(["user_id", "ts", "_strength"])
        .with_columns(pl.int_range(1, pl.len() + 1).over("user_id").alias("_n"))
    )
    seqs = eng.group_by("user_id").agg(pl.col("item_id").alias("_seq"))
    counts = eng.select("user_id", "ts", "_n").group_by(["user_id", "ts"]).agg(pl.col("_n").max())
    q = queries.with_row_index("_q")
    q = (
        q.sort("ts")
        .join_asof(counts.sort("ts"), on="ts", by="user_id", strategy="backward", allow_exact_matches=False, check_sortedness=False)
        .join(seqs, on="user_id", how="left")
        .with_columns(pl.col("_n").fill_null(0))
    )
    # Look back further than max_items so that repeats can be dropped and still leave max_items.
    lookback = max_items * 4
    hist = (
        pl.col("_seq")
        .list.slice(pl.max_horizontal(pl.col("_n") - lookback, 0), pl.min_horizontal(pl.col("_n"), lookback))
        .list.reverse()
        .list.unique(maintain_order=True)
        .list.head(max_items)
    )
    return (
        q.with_columns(pl.when(pl.col("_n") > 0).then(hist).otherwise(pl.lit([], dtype=pl.List(pl.Utf8))).alias("history"))
        .sort("_q")
        .drop("_q", "_n", "_seq")
    )


# ---------------------------------------------------------------- online (numpy)


@dataclass
class OnlineSnapshot:
    """Features of every known item and user-item pair as of one instant, for gathering by index.

    Built with `point_in_time_features` itself, so online rows equal offline rows at `as_of`.
    """

    as_of: datetime
    item_index: dict[str, int]
    item_matrix: np.ndarray  # (n_items, len(ITEM_FEATURES)) float32
    user_item: dict[tuple[str, str], np.ndarray]  # (user, item) -> USER_ITEM_FEATURES values
    histories: dict[str, list[str]]  # user -> recent engaged items, most recent first
    cold_item_row: np.ndarray  # item features of an item with no events

    @classmethod
    def build(cls, events: pl.DataFrame, item_ids: list[str], as_of: datetime, history_items: int) -> OnlineSnapshot:
        lf = events.lazy()
        items_q = pl.LazyFrame({"item_id": item_ids, "user_id": [""] * len(item_ids)}).with_columns(
            pl.lit(as_of).cast(pl.Datetime("us", "UTC")).alias("ts")
        )
        item_rows = point_in_time_features(lf, items_q).collect()
        pairs = (
            lf.filter(pl.col("ts") < as_of)
            .select("user_id", "item_id")
            .unique(maintain_order=True)
            .with_columns(pl.lit(as_of).cast(pl.Datetime("us", "UTC")).alias("ts"))
        )
        ui_rows = point_in_time_features(lf, pairs).collect()
        users_q = (
            lf.select("user_id").unique(maintain_order=True).with_columns(pl.lit(as_of).cast(pl.Datetime("us", "UTC")).alias("ts"))
        )
        hist = user_histories(lf, users_q, history_items).collect()
        ui_vals = ui_rows.select(USER_ITEM_FEATURES).to_numpy().astype(np.float32)
        cold = point_in_time_features(
            pl.LazyFrame(schema=events.schema), pl.LazyFrame({"user_id": [""], "item_id": [""], "ts": [as_of]}).with_columns(pl.col("ts").cast(pl.Datetime("us", "UTC")))
        ).collect()
        return cls(
            as_of=as_of,
            item_index={i: k for k, i in enumerate(item_rows["item_id"].to_list())},
            item_matrix=item_rows.select(ITEM_FEATURES).to_numpy().astype(np.float32),
            user_item={(u, i): ui_vals[k] for k, (u, i) in enumerate(zip(ui_rows["user_id"], ui_rows["item_id"]))},
            histories={u: h for u, h in zip(hist["user_id"].to_list(), hist["history"].to_list()) if h},
            cold_item_row=cold.select(ITEM_FEATURES).to_numpy()[0].astype(np.float32),
        )

    def gather(self, user_id: str, item_ids: list[str]) -> np.ndarray:
        """Behavioural features (n, len(BEHAVIOURAL_FEATURES)) for a user and candidates."""
        n = len(item_ids)
        out = np.empty((n, len(BEHAVIOURAL_FEATURES)), dtype=np.float32)
        idx = np.fromiter((self.item_index.get(i, -1) for i in item_ids), dtype=np.int64, count=n)
        known = idx >= 0
        out[known, : len(ITEM_FEATURES)] = self.item_matrix[idx[known]]
        out[~known, : len(ITEM_FEATURES)] = self.cold_item_row
        zeros = np.zeros(len(USER_ITEM_FEATURES), dtype=np.float32)
        out[:, len(ITEM_FEATURES) :] = np.stack([self.user_item.get((user_id, i), zeros) for i in item_ids]) if n else zeros[:0]
        return out
