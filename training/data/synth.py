"""A synthetic e-commerce shop with known ground truth.

The generative model, in short:

- Catalog: items in >= 12 categories, each with its own vocabulary (nouns,
  adjectives, features, attribute kinds such as colour or material, brands).
  Some words, attribute values and brands are shared across categories, so
  text is informative but not trivially separable. A brand has a price tier
  (budget / mid / premium) that the item usually inherits; prices are
  lognormal around the category's median, scaled by tier.
- Item quality on day d: ``base * exp(slope * d) * (1 + boost * exp(-age / 7))``
  where ``age = max(d - created_day, 0)``; some items trend up, some fade, and
  items created inside the period get a launch boost. They are never shown
  before their ``created_at``.
- Users: a Dirichlet category affinity concentrated on 1-4 categories, a
  preferred price tier and 1-2 preferred attribute values. True interest is
  ``affinity[category] * (1 + ATTRIBUTE_BONUS * match) * TIER_FACTOR[user tier,
  item tier] * quality(day)`` (`Truth.interest`).
- Sessions: Poisson sessions per user and day, one ranked list per session,
  sampled (Gumbel top-k, i.e. Plackett-Luce) by a logging policy that mixes
  recent click popularity, the user's past click categories and uniform
  exploration. It never looks at true interest, so a learned ranker can beat it.
  Clicks: ``position_bias(p) * (accidental + (1 - accidental) * squash(interest))``;
  carts and purchases follow, seconds to minutes later.
  Popularity and users' category histories are updated after each day (the
  feedback loop).

Everything is drawn from ``numpy.random.default_rng(seed)``; the same seed and
config give the same tables.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import polars as pl
from tqdm import tqdm

from featurizer.contracts.schema import EVENT_TYPES, write_dataset
from training.data.synth_catalog import DAY_MS, MAX_KINDS, make_catalog, make_users
from training.data.synth_vocab import ATTRIBUTES, CATEGORIES, TIERS


# --------------------------------------------------------------------------- model constants

# Rows: user's preferred tier; columns: item tier.
TIER_FACTOR = np.array([[1.0, 0.6, 0.25], [0.7, 1.0, 0.7], [0.3, 0.65, 1.0]])
ATTRIBUTE_BONUS = 0.8
LAUNCH_DECAY_DAYS = 7.0
POSITION_BIAS_EXP = 0.8
INTEREST_SCALE = 0.12  # squash(x) = x^g / (x^g + scale^g)
INTEREST_POWER = 1.5
ACCIDENTAL_CLICK = 0.004  # clicks unrelated to interest
CART_BASE = 0.25
PURCHASE_BASE = 0.4
# Logging policy: softmax(POP_W * log1p(clicks, decayed) + USER_W * user's click share of the category),
# mixed with uniform exploration.
POLICY_POP_W = 1.0
POLICY_USER_W = 3.0
POLICY_USER_PRIOR = 3.0
POLICY_EXPLORE = 0.15
POP_DECAY_PER_DAY = 0.8
HOUR_WEIGHTS = np.array([0.5, 0.3, 0.2, 0.2, 0.2, 0.3, 0.6, 1.0, 1.2, 1.1, 1.0, 1.1,
                         1.3, 1.2, 1.0, 1.0, 1.1, 1.3, 1.6, 2.0, 2.2, 2.0, 1.5, 0.9])
_POLICY_CHUNK_CELLS = 4_000_000  # sessions x items per policy batch, bounds memory


@dataclass(frozen=True)
class SynthConfig:
    n_users: int = 1500
    n_items: int = 800
    n_days: int = 28
    sessions_per_user_per_day: float = 0.35  # mean Poisson rate
    list_size: int = 20  # items shown per impression list
    start: datetime = datetime(2026, 1, 5, tzinfo=timezone.utc)

    def __post_init__(self) -> None:
        if self.n_users < 1 or self.n_days < 1 or self.list_size < 1:
            raise ValueError(f"n_users, n_days and list_size must be >= 1: {self}")
        if self.n_items <= self.list_size:
            raise ValueError(f"n_items ({self.n_items}) must exceed list_size ({self.list_size})")
        if not self.sessions_per_user_per_day > 0:
            raise ValueError(f"sessions_per_user_per_day must be > 0, got {self.sessions_per_user_per_day}")
        if self.start.tzinfo is None:
            raise ValueError("start must be timezone-aware (UTC)")


# --------------------------------------------------------------------------- ground truth


@dataclass(frozen=True)
class Truth:
    """Latent state of users and items; `interest` is the one formula both simulation and evaluation use."""

    start_ms: int
    affinity: np.ndarray  # users x categories, rows sum to 1
    user_tier: np.ndarray  # users
    user_attr: np.ndarray  # users x ATTRIBUTES, bool
    item_category: np.ndarray  # items
    item_tier: np.ndarray  # items
    item_attr: np.ndarray  # items x MAX_KINDS attribute indices, -1 = none
    base_quality: np.ndarray
    drift_slope: np.ndarray  # per day, log scale
    launch_boost: np.ndarray  # 0 for items that existed before the period
    created_day: np.ndarray  # days since start (float, negative = before)

    def quality(self, items: np.ndarray, day: np.ndarray | int) -> np.ndarray:
        age = np.maximum(day - self.created_day[items], 0.0)
        launch = 1.0 + self.launch_boost[items] * np.exp(-age / LAUNCH_DECAY_DAYS)
        return self.base_quality[items] * np.exp(self.drift_slope[items] * day) * launch

    def interest(self, users: np.ndarray, items: np.ndarray, day: np.ndarray | int) -> np.ndarray:
        """True interest for (user index, item index) pairs on integer day(s) since start; broadcasts."""
        attr = self.item_attr[items]
        hit = (attr >= 0) & self.user_attr[users[..., None], np.maximum(attr, 0)]
        match = hit.any(axis=-1)
        return (
            self.affinity[users, self.item_category[items]]
            * (1.0 + ATTRIBUTE_BONUS * match)
            * TIER_FACTOR[self.user_tier[users], self.item_tier[items]]
            * self.quality(items, day)
        )


def position_bias(position: np.ndarray) -> np.ndarray:
    return 1.0 / np.power(1.0 + position, POSITION_BIAS_EXP)


def click_probability(position: np.ndarray, interest: np.ndarray) -> np.ndarray:
    return position_bias(position) * (ACCIDENTAL_CLICK + (1.0 - ACCIDENTAL_CLICK) * squash(interest))


def squash(interest: np.ndarray) -> np.ndarray:
    x = np.power(interest, INTEREST_POWER)
    return x / (x + INTEREST_SCALE**INTEREST_POWER)


# --------------------------------------------------------------------------- simulation


@dataclass
class _State:
    """What the logging policy knows: decayed click counts per item, click counts per (user, category)."""

    popularity: np.ndarray
    user_cat_clicks: np.ndarray
    next_request: int = 1


def _policy_lists(rng: np.random.Generator, state: _State, cat: np.ndarray, created_ms: np.ndarray,
                  users: np.ndarray, ts: np.ndarray, list_size: int) -> np.ndarray:
    """Sample one ranked list per session (Gumbel top-k over the policy's mixture weights)."""
    n = cat.size
    out = np.empty((users.size, list_size), dtype=np.int64)
    step = max(1, _POLICY_CHUNK_CELLS // n)
    pop_logit = POLICY_POP_W * np.log1p(state.popularity)
    for lo in range(0, users.size, step):
        u, t = users[lo: lo + step], ts[lo: lo + step]
        avail = created_ms[None, :] <= t[:, None]
        clicks = state.user_cat_clicks[u]
        share = clicks / (clicks.sum(axis=1, keepdims=True) + POLICY_USER_PRIOR)
        logit = np.where(avail, pop_logit[None, :] + POLICY_USER_W * share[:, cat], -np.inf)
        p = np.exp(logit - logit.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        w = (1.0 - POLICY_EXPLORE) * p + POLICY_EXPLORE * avail / avail.sum(axis=1, keepdims=True)
        keys = np.full(w.shape, -np.inf)
        np.log(w, out=keys, where=avail)
        keys += rng.gumbel(size=w.shape)
        top = np.argpartition(-keys, list_size - 1, axis=1)[:, :list_size]
        order = np.argsort(-np.take_along_axis(keys, top, axis=1), axis=1, kind="stable")
        out[lo: lo + step] = np.take_along_axis(top, order, axis=1)
    return out


def _simulate_day(rng: np.random.Generator, day: int, config: SynthConfig, truth: Truth, created_ms: np.ndarray,
                  state: _State) -> list[np.ndarray]:
    """One day of sessions; returns event columns (ts_ms, user, item, code, request, position); updates `state`."""
    n_sessions = rng.poisson(config.sessions_per_user_per_day, config.n_users)
    users = np.repeat(np.arange(config.n_users), n_sessions)
    hours = rng.choice(24, size=users.size, p=HOUR_WEIGHTS / HOUR_WEIGHTS.sum())
    ts = truth.start_ms + day * DAY_MS + hours * 3_600_000 + rng.integers(0, 3_600_000, users.size)
    order = np.lexsort((users, ts))
    users, ts = users[order], ts[order]
    requests = state.next_request + np.arange(users.size)
    state.next_request += users.size

    shown = _policy_lists(rng, state, truth.item_category, created_ms, users, ts, config.list_size)
    pos = np.broadcast_to(np.arange(config.list_size), shown.shape)
    uu = np.broadcast_to(users[:, None], shown.shape)
    interest = truth.interest(uu, shown, day)
    click = rng.random(shown.shape) < click_probability(pos, interest)
    p_cart = CART_BASE * (0.5 + squash(interest))
    cart = click & (rng.random(shown.shape) < p_cart)
    tier_fit = TIER_FACTOR[truth.user_tier[uu], truth.item_tier[shown]]
    purchase = cart & (rng.random(shown.shape) < PURCHASE_BASE * (0.7 + 0.3 * tier_fit))

    t_imp = np.broadcast_to(ts[:, None], shown.shape)
    t_click = t_imp + 3_000 + pos * 2_000 + rng.exponential(20_000, shown.shape).astype(np.int64)
    t_cart = t_click + 5_000 + rng.exponential(45_000, shown.shape).astype(np.int64)
    t_buy = t_cart + 20_000 + rng.exponential(120_000, shown.shape).astype(np.int64)
    req = np.broadcast_to(requests[:, None], shown.shape)

    code = np.zeros(shown.shape, dtype=np.int8)
    columns = (t_imp, uu, shown, code, req, pos)
    out = [a.ravel() for a in columns]  # impressions
    for k, (mask, t) in enumerate(((click, t_click), (cart, t_cart), (purchase, t_buy)), start=1):
        for j, a in enumerate((t, uu, shown, code + k, req, pos)):
            out[j] = np.concatenate([out[j], a[mask]])

    state.popularity = state.popularity * POP_DECAY_PER_DAY + np.bincount(
        shown[click], minlength=state.popularity.size)
    np.add.at(state.user_cat_clicks, (uu[click], truth.item_category[shown[click]]), 1.0)
    return out


def _id_expr(prefix: str, col: str, width: int) -> pl.Expr:
    return pl.concat_str([pl.lit(prefix), pl.col(col).cast(pl.Utf8).str.zfill(width)])


def _events_frame(cols: list[np.ndarray]) -> pl.DataFrame:
    names = ("ts_ms", "user", "item", "code", "request", "position")
    lf = pl.LazyFrame({n: c for n, c in zip(names, cols)})
    return (
        lf.sort(["ts_ms", "request", "code", "position"])
        .select(
            pl.from_epoch("ts_ms", time_unit="ms").dt.replace_time_zone("UTC").dt.cast_time_unit("us").alias("ts"),
            _id_expr("u", "user", 5).alias("user_id"),
            _id_expr("i", "item", 6).alias("item_id"),
            pl.col("code").replace_strict(dict(enumerate(EVENT_TYPES)), return_dtype=pl.Utf8).alias("event"),
            _id_expr("r", "request", 7).alias("request_id"),
            pl.col("position").cast(pl.Int32),
        )
        .collect()
    )


def synthesize(out_dir: str | Path, seed: int = 0, config: SynthConfig = SynthConfig(),
               progress: bool = False) -> dict:
    """Generate the shop and write items/events (the contract), truth/ and summary.json under `out_dir`."""
    out_dir = Path(out_dir)
    start_ms = int(config.start.timestamp() * 1000)
    rng_items, rng_users, rng_sessions = np.random.default_rng(seed).spawn(3)
    catalog = make_catalog(rng_items, config.n_items, config.n_days, config.list_size, start_ms)
    affinity, user_tier, user_attr = make_users(rng_users, config.n_users)
    truth = Truth(start_ms, affinity, user_tier, user_attr, catalog.category, catalog.tier, catalog.attr,
                  catalog.base_quality, catalog.drift_slope, catalog.launch_boost,
                  (catalog.created_ms - start_ms) / DAY_MS)

    is_old = catalog.created_ms < start_ms
    state = _State(popularity=np.where(is_old, rng_sessions.poisson(5.0 * catalog.base_quality), 0).astype(float),
                   user_cat_clicks=np.zeros((config.n_users, len(CATEGORIES))))
    days = [_simulate_day(rng_sessions, d, config, truth, catalog.created_ms, state)
            for d in tqdm(range(config.n_days), desc="synth days", unit="day", disable=not progress)]
    events = _events_frame([np.concatenate(c) for c in zip(*days)])

    write_dataset(out_dir, catalog.items, events)
    _write_truth(out_dir / "truth", config, seed, truth, catalog.truth)
    summary = _summary(events, config, seed)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _write_truth(truth_dir: Path, config: SynthConfig, seed: int, truth: Truth, items_truth: pl.DataFrame) -> None:
    truth_dir.mkdir(parents=True, exist_ok=True)
    users = pl.DataFrame({
        "user_id": [f"u{u:05d}" for u in range(config.n_users)],
        "affinity": pl.Series(truth.affinity.tolist(), dtype=pl.List(pl.Float64)),
        "preferred_tier": [TIERS[t] for t in truth.user_tier],
        "preferred_attributes": pl.Series(
            [[ATTRIBUTES[a] for a in np.flatnonzero(row)] for row in truth.user_attr], dtype=pl.List(pl.Utf8)),
    })
    users.write_parquet(truth_dir / "users.parquet")
    items_truth.write_parquet(truth_dir / "items.parquet")
    meta = {
        "seed": seed,
        "start": config.start.isoformat(),
        "categories": [c.name for c in CATEGORIES],
        "tiers": list(TIERS),
        "attributes": list(ATTRIBUTES),
        "interest": "affinity[category] * (1 + attribute_bonus * any(preferred attribute on item))"
                    " * tier_factor[user tier][item tier] * quality(day)",
        "quality": "base_quality * exp(drift_slope * day) * (1 + launch_boost * exp(-max(day - created_day, 0)"
                   " / launch_decay_days)); day = whole days since start",
        "click": "position_bias(position) * (accidental + (1 - accidental) * squash(interest));"
                 " position_bias(p) = 1 / (1 + p)^position_bias_exp; squash(x) = x^power / (x^power + scale^power)",
        "accidental_click": ACCIDENTAL_CLICK,
        "attribute_bonus": ATTRIBUTE_BONUS,
        "tier_factor": TIER_FACTOR.tolist(),
        "launch_decay_days": LAUNCH_DECAY_DAYS,
        "position_bias_exp": POSITION_BIAS_EXP,
        "squash": {"scale": INTEREST_SCALE, "power": INTEREST_POWER},
        "add_to_cart": f"{CART_BASE} * (0.5 + squash(interest)) after a click",
        "purchase": f"{PURCHASE_BASE} * (0.7 + 0.3 * tier_factor) after add_to_cart",
        "logging_policy": {
            "pop_weight": POLICY_POP_W, "user_category_weight": POLICY_USER_W, "user_prior": POLICY_USER_PRIOR,
            "explore": POLICY_EXPLORE, "popularity_decay_per_day": POP_DECAY_PER_DAY,
            "note": "Plackett-Luce sample of softmax(pop_weight * log1p(decayed clicks) + user_category_weight *"
                    " user's click share of the category) mixed with uniform exploration; state updated daily",
        },
        "config": _config_json(config),
    }
    (truth_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def _config_json(config: SynthConfig) -> dict:
    return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in asdict(config).items()}


def _summary(events: pl.DataFrame, config: SynthConfig, seed: int) -> dict:
    counts = dict(events.group_by("event").len().iter_rows())
    per_type = {e: int(counts.get(e, 0)) for e in EVENT_TYPES}
    stats = events.select(
        pl.col("ts").min().alias("first"), pl.col("ts").max().alias("last"),
        pl.col("user_id").n_unique().alias("active_users"), pl.col("request_id").n_unique().alias("requests"),
        pl.col("item_id").filter(pl.col("event") == "impression").n_unique().alias("items_shown"),
    ).row(0, named=True)
    return {
        "source": "training.data.synth",
        "seed": seed,
        "config": _config_json(config),
        "users": config.n_users,
        "active_users": stats["active_users"],
        "items": config.n_items,
        "items_shown": stats["items_shown"],
        "days": config.n_days,
        "requests": stats["requests"],
        "events": per_type,
        "ctr": per_type["click"] / max(per_type["impression"], 1),
        "cart_per_click": per_type["add_to_cart"] / max(per_type["click"], 1),
        "purchase_per_cart": per_type["purchase"] / max(per_type["add_to_cart"], 1),
        "time_range": [stats["first"].isoformat(), stats["last"].isoformat()],
    }


# --------------------------------------------------------------------------- reading the truth back


def load_truth(out_dir: str | Path) -> tuple[Truth, pl.DataFrame, pl.DataFrame]:
    """The `Truth` of a synthesized dataset plus its users/items truth tables (row i = index i)."""
    truth_dir = Path(out_dir) / "truth"
    meta = json.loads((truth_dir / "meta.json").read_text())
    users = pl.read_parquet(truth_dir / "users.parquet")
    items = pl.read_parquet(truth_dir / "items.parquet")
    cats = {c: k for k, c in enumerate(meta["categories"])}
    attr_index = {a: k for k, a in enumerate(meta["attributes"])}
    tiers = {t: k for k, t in enumerate(meta["tiers"])}
    user_attr = np.zeros((users.height, len(attr_index)), dtype=bool)
    for u, prefs in enumerate(users["preferred_attributes"].to_list()):
        user_attr[u, [attr_index[a] for a in prefs]] = True
    item_attr = np.full((items.height, MAX_KINDS), -1, dtype=np.int64)
    for i, values in enumerate(items["attributes"].to_list()):
        item_attr[i, : len(values)] = [attr_index[a] for a in values]
    truth = Truth(
        start_ms=int(datetime.fromisoformat(meta["start"]).timestamp() * 1000),
        affinity=np.array(users["affinity"].to_list()),
        user_tier=np.array([tiers[t] for t in users["preferred_tier"]]),
        user_attr=user_attr,
        item_category=np.array([cats[c] for c in items["category"]]),
        item_tier=np.array([tiers[t] for t in items["price_tier"]]),
        item_attr=item_attr,
        base_quality=items["base_quality"].to_numpy(),
        drift_slope=items["drift_slope"].to_numpy(),
        launch_boost=items["launch_boost"].to_numpy(),
        created_day=items["created_day"].to_numpy(),
    )
    return truth, users, items


def true_interest(out_dir: str | Path, events: pl.DataFrame) -> np.ndarray:
    """True interest for each row of `events` (columns ts, user_id, item_id), at the event's day."""
    truth, users, items = load_truth(out_dir)
    idx = events.select("ts", "user_id", "item_id").with_row_index("_row").join(
        users.select("user_id").with_row_index("_u"), on="user_id", how="left"
    ).join(items.select("item_id").with_row_index("_i"), on="item_id", how="left").sort("_row")
    if idx["_u"].null_count() or idx["_i"].null_count():
        raise ValueError(f"{out_dir}: events name users or items that are not in truth/")
    start = datetime.fromtimestamp(truth.start_ms / 1000, tz=timezone.utc)
    day = ((idx["ts"] - start).dt.total_milliseconds() // DAY_MS).to_numpy()
    return truth.interest(idx["_u"].to_numpy().astype(np.int64), idx["_i"].to_numpy().astype(np.int64), day)
