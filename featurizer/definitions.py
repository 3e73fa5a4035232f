"""Ranking features as code: the registry and the formulas, shared by offline and online.

Both modes first compute the same *base aggregates* (counts of events in a
window, ages in microseconds, sums; see `BASE_COUNTS` and `BASE_FLOATS`) for a
query (user_id, item_id, t), from events strictly before t:

- offline (`featurizer.offline.pipeline`) with polars as-of joins, as columns;
- online (`featurizer.online.features`) from incremental state, as numpy arrays.

`derive` then turns base aggregates into the features of `FEATURES`, with one
set of formulas that runs on polars expressions and on numpy arrays alike
(`POLARS` / `NUMPY` ops). Same inputs, same arithmetic: online equals offline.

Windows are tiled (see `Window`): a window of length W with tile g covers
``[floor_g(t) - W, t)``, so a count never needs timestamps finer than a tile
online, and stays exact.

Missing values are NaN (LightGBM treats them as missing): an age with no event
before t, a share with an empty denominator, a price not in the catalog.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import polars as pl

from featurizer.contracts.schema import ENGAGEMENTS, EVENT_TYPES

US_PER_MINUTE = 60_000_000
US_PER_HOUR = 60 * US_PER_MINUTE
US_PER_DAY = 24 * US_PER_HOUR
HOURS_PER_US = 1.0 / US_PER_HOUR

FAMILIES = ("text", "popularity", "personal", "cooccurrence", "price", "context")

# Event codes are positions in the contract's EVENT_TYPES; plural names are used in feature names.
EVENT_PLURALS = ("impressions", "clicks", "add_to_carts", "purchases")
assert len(EVENT_PLURALS) == len(EVENT_TYPES)
EVENT_CODE = {e: k for k, e in enumerate(EVENT_TYPES)}
ENGAGEMENT_CODES = tuple(EVENT_CODE[e] for e in ENGAGEMENTS)

# Beta prior of the click-through rate: a new item starts near PRIOR_CTR and needs about
# PRIOR_STRENGTH impressions before its own data dominates.
PRIOR_CTR = 0.05
PRIOR_STRENGTH = 20.0
# Conversion (purchases / clicks) prior: about 1 purchase in 10 clicks, worth 10 clicks.
PRIOR_CVR = 0.1
PRIOR_CVR_STRENGTH = 10.0
# Trend pseudo-count, in clicks per day, added to both daily rates: no data -> trend 1.
TREND_PSEUDO_CLICKS_PER_DAY = 0.5


@dataclass(frozen=True)
class Window:
    """A window of `length_us`, tiled by `tile_us`: covers [floor_tile(t) - length, t)."""

    name: str
    length_us: int
    tile_us: int

    @property
    def ring_size(self) -> int:
        """Tiles an online state keeps for this window: the current one and length/tile before it."""
        return self.length_us // self.tile_us + 1

    def start_us(self, t_us: Any) -> Any:
        """First microsecond of the window at t; works on ints, numpy arrays and polars expressions."""
        return (t_us // self.tile_us) * self.tile_us - self.length_us


WINDOWS: dict[str, Window] = {
    w.name: w
    for w in (
        Window("1h", US_PER_HOUR, 5 * US_PER_MINUTE),
        Window("1d", US_PER_DAY, US_PER_HOUR),
        Window("7d", 7 * US_PER_DAY, US_PER_DAY),
        Window("30d", 30 * US_PER_DAY, US_PER_DAY),
    )
}
ITEM_WINDOWS = ("1h", "1d", "7d", "30d")
USER_WINDOWS = ("7d", "30d")
# Online rings, one per tile size: long enough for the longest window using that tile.
TILE_NAMES = {5 * US_PER_MINUTE: "5m", US_PER_HOUR: "1h", US_PER_DAY: "1d"}


def ring_sizes(window_names: tuple[str, ...]) -> dict[int, int]:
    """tile_us -> number of tiles kept, for the given windows."""
    out: dict[int, int] = {}
    for name in window_names:
        w = WINDOWS[name]
        out[w.tile_us] = max(out.get(w.tile_us, 0), w.ring_size)
    return dict(sorted(out.items()))


@dataclass(frozen=True)
class FeatureParams:
    """Tunable definitions; offline and online must use the same (the online state records them)."""

    history_items: int = 10  # N: the user's last N distinct engaged items, for co-occurrence
    cooc_window_s: int = 24 * 3600  # two engagements of one user co-occur if at most this far apart
    # The user's last M distinct items by first engagement, for a bundle's sequence model (whose
    # history may be at most this long; 0: none kept). Chosen when a state is made, which records it
    # and keeps it (featurizer.online.features). Not in `fingerprint`: a store built before semrank
    # kept sequences still opens, with partial ones (`OnlineFeatures.sequence_complete`).
    sequence_items: int = 50

    def __post_init__(self) -> None:
        if self.history_items < 1 or self.cooc_window_s < 0 or self.sequence_items < 0:
            raise ValueError(f"history_items must be >= 1, cooc_window_s and sequence_items >= 0, got {self}")

    @property
    def cooc_window_us(self) -> int:
        return self.cooc_window_s * 1_000_000

    def fingerprint(self) -> str:
        """Changes whenever a stored online state would mean something else."""
        params = {k: v for k, v in asdict(self).items() if k != "sequence_items"}
        spec = {"layout": 2, "params": params, "windows": [asdict(w) for w in WINDOWS.values()],
                "item_windows": ITEM_WINDOWS, "user_windows": USER_WINDOWS}
        return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def smoothed_rate(successes, trials, prior_rate: float = PRIOR_CTR, prior_strength: float = PRIOR_STRENGTH):
    """Beta-smoothed rate (successes + prior_rate * prior_strength) / (trials + prior_strength);
    works on polars expressions, numpy arrays and plain numbers alike."""
    return (successes + prior_rate * prior_strength) / (trials + prior_strength)


# ---------------------------------------------------------------- registry


@dataclass(frozen=True)
class Feature:
    name: str
    family: str
    window: str  # "1h" | "1d" | "7d" | "30d" | "all" | "" (not windowed)
    definition: str


def _registry() -> tuple[Feature, ...]:
    f = [Feature("interest_score", "text", "", "encoder similarity of the user's history text and the item text (given, not computed here)")]
    for w in (*ITEM_WINDOWS, "all"):
        for p in EVENT_PLURALS:
            f.append(Feature(f"item_{p}_{w}", "popularity", w, f"{p.replace('_', '-')} of the item, all users"))
    for w in ("7d", "30d", "all"):
        ctr = f"(clicks + {PRIOR_CTR}*{PRIOR_STRENGTH:g}) / (impressions + {PRIOR_STRENGTH:g})"
        f.append(Feature(f"item_ctr_{w}", "popularity", w, ctr))
    for w in ("30d", "all"):
        cvr = f"(purchases + {PRIOR_CVR}*{PRIOR_CVR_STRENGTH:g}) / (clicks + {PRIOR_CVR_STRENGTH:g})"
        f.append(Feature(f"item_cvr_{w}", "popularity", w, cvr))
    k = TREND_PSEUDO_CLICKS_PER_DAY
    f += [
        Feature("item_click_trend_7d_30d", "popularity", "7d/30d", f"(clicks_7d/7 + {k}) / (clicks_30d/30 + {k}); 1 = steady"),
        Feature("item_ctr_trend_7d_30d", "popularity", "7d/30d", "item_ctr_7d / item_ctr_30d"),
        Feature("item_users_engaged_all", "popularity", "all", "distinct users who engaged with the item (clicked, carted or bought)"),
        Feature("item_hours_since_first_seen", "popularity", "all", "hours since the item's first event of any kind; NaN if none"),
        Feature("user_clicks_7d", "personal", "7d", "the user's clicks, any item"),
        Feature("user_clicks_30d", "personal", "30d", "the user's clicks, any item"),
        Feature("user_purchases_7d", "personal", "7d", "the user's purchases, any item"),
        Feature("user_purchases_30d", "personal", "30d", "the user's purchases, any item"),
        Feature("user_engagements_all", "personal", "all", "the user's clicks + add-to-carts + purchases"),
        Feature("user_hours_since_last_engagement", "personal", "all", "hours since the user's last engagement; NaN if none"),
        Feature("user_category_share_all", "personal", "all",
                "share of the user's engagements on items of the candidate's category; NaN if no engagements or no category"),
        Feature("user_brand_share_all", "personal", "all",
                "share of the user's engagements on items of the candidate's brand; NaN if no engagements or no brand"),
        Feature("user_item_impressions_all", "personal", "all", "times this user was shown this item"),
        Feature("user_item_engagements_all", "personal", "all", "this user's clicks + add-to-carts + purchases of this item"),
        Feature("user_item_purchases_all", "personal", "all", "this user's purchases of this item (> 0: bought before)"),
        Feature("user_item_hours_since_last_impression", "personal", "all", "hours since this user was last shown this item; NaN if never"),
        Feature("user_item_hours_since_last_engagement", "personal", "all", "hours since this user last engaged with this item; NaN if never"),
        Feature("cooc_cosine_max_recent", "cooccurrence", "all",
                "max over the user's last N distinct engaged items h of c(i,h)/sqrt(n_i n_h), c = users whose first "
                "engagements with i and h are within the co-occurrence window, n = users engaged; 0 without history"),
        Feature("cooc_cosine_sum_recent", "cooccurrence", "all", "sum of the same cosines"),
        Feature("item_price", "price", "", "catalog price; NaN if unknown"),
        Feature("user_price_typical_all", "price", "all",
                "geometric mean price of the items the user engaged with (engagements with a price > 0); NaN if none"),
        Feature("item_price_rel_user_all", "price", "all", "item_price / user_price_typical_all"),
        Feature("hour_of_day_utc", "context", "", "hour of t, 0-23, UTC"),
        Feature("day_of_week_utc", "context", "", "weekday of t, Monday = 0, UTC"),
    ]
    return tuple(f)


FEATURES: tuple[Feature, ...] = _registry()
NAMES: tuple[str, ...] = tuple(f.name for f in FEATURES)
FAMILY: dict[str, str] = {f.name: f.family for f in FEATURES}
assert len(set(NAMES)) == len(NAMES) and set(FAMILY.values()) <= set(FAMILIES)


def family_columns(names: tuple[str, ...] | list[str] = NAMES) -> dict[str, list[int]]:
    """Column indices of each family in `names` (e.g. to sum LightGBM contributions by family)."""
    out: dict[str, list[int]] = {fam: [] for fam in FAMILIES}
    for k, n in enumerate(names):
        out[FAMILY[n]].append(k)
    return {fam: cols for fam, cols in out.items() if cols}


# ---------------------------------------------------------------- base aggregates

# Integer counts (0 when nothing happened), and floats (NaN when undefined).
BASE_COUNTS: tuple[str, ...] = (
    *(f"item_n_{p}_{w}" for w in (*ITEM_WINDOWS, "all") for p in EVENT_PLURALS),
    *(f"user_n_{p}_{w}" for w in (*USER_WINDOWS, "all") for p in EVENT_PLURALS),
    "item_n_users_all",
    *(f"ui_n_{p}_all" for p in EVENT_PLURALS),
    "user_logprice_n",
    "t_us",
)
BASE_FLOATS: tuple[str, ...] = (
    "interest_score",
    "item_price",
    "item_first_age_us",  # t - first event of the item
    "user_eng_age_us",  # t - the user's last engagement
    "user_cat_n",  # the user's engagements in the candidate's category (NaN: candidate has none)
    "user_brand_n",
    "user_logprice_sum",  # sum of log(price) over the user's engagements with a price > 0
    "ui_imp_age_us",
    "ui_eng_age_us",
    "cooc_max",
    "cooc_sum",
)


class _NumpyOps:
    @staticmethod
    def f(x):
        return np.asarray(x, dtype=np.float64)

    where = staticmethod(np.where)
    sqrt = staticmethod(np.sqrt)
    exp = staticmethod(np.exp)


class _PolarsOps:
    @staticmethod
    def f(x):
        return x.cast(pl.Float64)

    @staticmethod
    def where(cond, a, b):
        return pl.when(cond).then(a).otherwise(b)

    @staticmethod
    def sqrt(x):
        return x.sqrt()

    @staticmethod
    def exp(x):
        return x.exp()


NUMPY, POLARS = _NumpyOps(), _PolarsOps()
NAN = float("nan")


def cooc_cosine(c, n_i, n_h, ops):
    """c(i,h) / sqrt(n_i n_h); 0 when the pair never co-occurred (then n may be 0)."""
    return ops.where(c > 0, ops.f(c) / ops.sqrt(ops.f(n_i * n_h)), 0.0)


def derive(b: Mapping[str, Any], ops) -> dict[str, Any]:
    """Every feature of FEATURES from base aggregates `b` (polars expressions or numpy arrays), in
    NAMES order: `derive_item_counts` and `derive_rest`, the one definition of each.

    Constants multiply, never divide: polars divides by a scalar through its reciprocal and numpy
    does not, which would differ in the last bit.
    """
    out = {**derive_item_counts(b, ops), **derive_rest(b, ops)}
    assert set(out) == set(NAMES), "derive() and FEATURES disagree"
    return {name: out[name] for name in NAMES}


def derive_item_counts(b: Mapping[str, Any], ops) -> dict[str, Any]:
    """The features of ITEM_COUNT_NAMES: functions of an item's event counts (`item_n_*`) alone, so
    one value per item for every t whose windows hold the same counts (the online features keep
    them per item, `featurizer.online.state_cache.ItemPartsCache`)."""
    f = ops.f
    out: dict[str, Any] = {}
    item = lambda p, w: f(b[f"item_n_{p}_{w}"])  # noqa: E731
    for w in (*ITEM_WINDOWS, "all"):
        for p in EVENT_PLURALS:
            out[f"item_{p}_{w}"] = item(p, w)
    for w in ("7d", "30d", "all"):
        out[f"item_ctr_{w}"] = smoothed_rate(item("clicks", w), item("impressions", w))
    for w in ("30d", "all"):
        out[f"item_cvr_{w}"] = smoothed_rate(item("purchases", w), item("clicks", w), PRIOR_CVR, PRIOR_CVR_STRENGTH)
    k = TREND_PSEUDO_CLICKS_PER_DAY
    out["item_click_trend_7d_30d"] = (item("clicks", "7d") * (1 / 7) + k) / (item("clicks", "30d") * (1 / 30) + k)
    out["item_ctr_trend_7d_30d"] = out["item_ctr_7d"] / out["item_ctr_30d"]
    out["item_users_engaged_all"] = f(b["item_n_users_all"])
    return out


def derive_rest(b: Mapping[str, Any], ops) -> dict[str, Any]:
    """The features not in ITEM_COUNT_NAMES: the text score, the item's age and price, the user's,
    the user x item pair's, co-occurrence and the instant's."""
    f = ops.f
    out: dict[str, Any] = {"interest_score": f(b["interest_score"])}
    out["item_hours_since_first_seen"] = f(b["item_first_age_us"]) * HOURS_PER_US

    user = lambda p, w: f(b[f"user_n_{p}_{w}"])  # noqa: E731
    for p in ("clicks", "purchases"):
        for w in USER_WINDOWS:
            out[f"user_{p}_{w}"] = user(p, w)
    eng = user("clicks", "all") + user("add_to_carts", "all") + user("purchases", "all")
    out["user_engagements_all"] = eng
    out["user_hours_since_last_engagement"] = f(b["user_eng_age_us"]) * HOURS_PER_US
    out["user_category_share_all"] = ops.where(eng > 0, f(b["user_cat_n"]) / eng, NAN)
    out["user_brand_share_all"] = ops.where(eng > 0, f(b["user_brand_n"]) / eng, NAN)

    ui = lambda p: f(b[f"ui_n_{p}_all"])  # noqa: E731
    out["user_item_impressions_all"] = ui("impressions")
    out["user_item_engagements_all"] = ui("clicks") + ui("add_to_carts") + ui("purchases")
    out["user_item_purchases_all"] = ui("purchases")
    out["user_item_hours_since_last_impression"] = f(b["ui_imp_age_us"]) * HOURS_PER_US
    out["user_item_hours_since_last_engagement"] = f(b["ui_eng_age_us"]) * HOURS_PER_US

    out["cooc_cosine_max_recent"] = f(b["cooc_max"])
    out["cooc_cosine_sum_recent"] = f(b["cooc_sum"])

    out["item_price"] = f(b["item_price"])
    n_price = f(b["user_logprice_n"])
    typical = ops.where(n_price > 0, ops.exp(f(b["user_logprice_sum"]) / n_price), NAN)
    out["user_price_typical_all"] = typical
    out["item_price_rel_user_all"] = out["item_price"] / typical

    t = b["t_us"]
    out["hour_of_day_utc"] = f((t // US_PER_HOUR) % 24)
    out["day_of_week_utc"] = f((t // US_PER_DAY + 3) % 7)  # 1970-01-01 was a Thursday
    return out


class _AnyBase(dict):
    def __missing__(self, key):
        return 1


# The features of `derive_item_counts`, in NAMES order.
ITEM_COUNT_NAMES: tuple[str, ...] = tuple(n for n in NAMES if n in derive_item_counts(_AnyBase(), NUMPY))
assert not set(ITEM_COUNT_NAMES) & set(derive_rest(_AnyBase(), NUMPY)), "a feature is defined twice"


# Context known only for logged lists. `position` debiases training on clicks (which follow
# position); at inference every candidate gets the same constant. Not in FEATURES: the ranker
# appends it to the feature list, and the bundle manifest records the constant.
CONTEXT_TRAINING_ONLY: dict[str, float] = {"position": 0.0}
