"""The synthetic shop's catalog and users (see training/data/synth.py for the whole generative model).

- Items in >= 12 categories, each with its own vocabulary (training/data/synth_vocab.py). A
  brand has a price tier (budget / mid / premium) that the item usually inherits; prices are
  lognormal around the category's median, scaled by tier. Titles and descriptions are drawn
  from the category's words and sentence templates, with some shared across categories.
- Items drift in popularity (a fifth trend up, a fifth fade) and NEW_ITEM_SHARE of them are
  launched inside the period, with a launch boost.
- Users: a Dirichlet category affinity concentrated on 1-4 categories, a preferred price tier
  and 1-2 preferred attribute values.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from training.data.synth_vocab import ATTRIBUTES, CATEGORIES, SHARED_SENTENCES, TIERS, Category

DAY_MS = 86_400_000
ATTR_INDEX = {a: k for k, a in enumerate(ATTRIBUTES)}
MAX_KINDS = max(len(c.attributes) for c in CATEGORIES)
TIER_PRICE_FACTOR = np.array([0.55, 1.0, 2.1])
PRICE_SIGMA = 0.3
BRAND_TIER_KEEP = 0.75  # else the item is one tier off its brand's
USER_TIER_P = np.array([0.35, 0.45, 0.20])
NEW_ITEM_SHARE = 0.3


def _title_case(text: str) -> str:
    keep = {"g", "kg", "and", "for", "of", "with", "the"}
    return " ".join(w if w in keep else w[:1].upper() + w[1:] for w in text.split(" "))


def _text_fields(cat: Category, brand: str, noun: str, adj: str, feature: str, values: list[str],
                 rng: np.random.Generator) -> dict[str, str]:
    fields = {kind.replace(" ", "_"): v for (kind, _), v in zip(cat.attributes, values)}
    fields.update(brand=brand, noun=noun, noun_l=noun.lower(), adj=adj, adj_l=adj.lower(), feature=feature,
                  feature_l=feature.lower(), hours=str(int(rng.integers(8, 61))), years=str(int(rng.integers(1, 6))))
    return fields


def _item_text(cat: Category, brand: str, values: list[str], rng: np.random.Generator) -> tuple[str, str]:
    noun = cat.nouns[rng.integers(len(cat.nouns))]
    adj = cat.adjectives[rng.integers(len(cat.adjectives))]
    feature = cat.features[rng.integers(len(cat.features))]
    words = [brand] + ([adj] if rng.random() < 0.7 else []) + ([feature] if rng.random() < 0.6 else []) + [noun]
    title = " ".join(words) + ", " + ", ".join(_title_case(v) for v in values[: 1 + int(rng.random() < 0.4)])
    fields = _text_fields(cat, brand, noun, adj, feature, values, rng)
    n_sentences = int(rng.choice([1, 2, 3], p=[0.25, 0.45, 0.30]))
    chosen = [cat.sentences[k] for k in rng.permutation(len(cat.sentences))[:n_sentences]]
    if n_sentences > 1 and rng.random() < 0.35:
        chosen[-1] = SHARED_SENTENCES[rng.integers(len(SHARED_SENTENCES))]
    sentences = [s.format(**fields) for s in chosen]
    return title, " ".join(s[:1].upper() + s[1:] for s in sentences)


@dataclass(frozen=True)
class Catalog:
    """The generated items: the contract's table, the ground-truth table and the latent arrays."""

    items: pl.DataFrame  # the contract's items table
    truth: pl.DataFrame  # truth/items.parquet
    category: np.ndarray
    tier: np.ndarray
    attr: np.ndarray
    base_quality: np.ndarray
    drift_slope: np.ndarray
    launch_boost: np.ndarray
    created_ms: np.ndarray


def make_catalog(rng: np.random.Generator, n_items: int, n_days: int, list_size: int, start_ms: int) -> Catalog:
    """`n_items` items; NEW_ITEM_SHARE of them (keeping `list_size` old ones) are created inside the `n_days` period."""
    n, k = n_items, len(CATEGORIES)
    share = rng.dirichlet(np.full(k, 6.0))
    category = np.concatenate([np.arange(min(k, n)), rng.choice(k, size=max(n - k, 0), p=share)])
    category = rng.permutation(category)
    # Popularity drift: a fifth trend up, a fifth fade, the rest drift a little.
    trend = rng.choice(3, size=n, p=[0.2, 0.2, 0.6])
    slope = np.choose(trend, [rng.normal(0.05, 0.015, n), rng.normal(-0.05, 0.015, n), rng.normal(0.0, 0.005, n)])
    base_quality = rng.lognormal(0.0, 0.45, n)
    n_new = min(int(round(NEW_ITEM_SHARE * n)), n - list_size)
    is_new = np.zeros(n, dtype=bool)
    is_new[rng.choice(n, size=n_new, replace=False)] = True
    created_ms = np.where(
        is_new,
        start_ms + rng.integers(0, n_days * DAY_MS, n),
        start_ms - rng.integers(DAY_MS, 365 * DAY_MS, n),
    )
    launch_boost = np.where(is_new, rng.uniform(0.5, 2.0, n), 0.0)

    rows: dict[str, list] = {c: [] for c in ("title", "description", "brand", "tier", "price", "attributes")}
    attr = np.full((n, MAX_KINDS), -1, dtype=np.int64)
    for i in range(n):
        cat = CATEGORIES[category[i]]
        brand, brand_tier = cat.brands[rng.integers(len(cat.brands))]
        tier = brand_tier if rng.random() < BRAND_TIER_KEEP else int(np.clip(brand_tier + rng.choice([-1, 1]), 0, 2))
        values = [vals[rng.integers(len(vals))] for _, vals in cat.attributes]
        attr[i, : len(values)] = [ATTR_INDEX[v] for v in values]
        price = cat.median_price * TIER_PRICE_FACTOR[tier] * rng.lognormal(0.0, PRICE_SIGMA)
        title, description = _item_text(cat, brand, values, rng)
        for col, v in zip(rows, (title, description, brand, tier, max(round(price) - 0.01, 0.99), values)):
            rows[col].append(v)

    item_id = pl.Series("item_id", [f"i{i:06d}" for i in range(n)])
    cat_names = [CATEGORIES[c].name for c in category]
    created_at = pl.from_epoch(pl.Series(created_ms), time_unit="ms").dt.replace_time_zone("UTC")
    items = pl.DataFrame({
        "item_id": item_id, "title": rows["title"], "description": rows["description"], "category": cat_names,
        "brand": rows["brand"], "price": rows["price"], "created_at": created_at,
    })
    truth = pl.DataFrame({
        "item_id": item_id, "category": cat_names, "brand": rows["brand"],
        "price_tier": [TIERS[t] for t in rows["tier"]],
        "attributes": pl.Series(rows["attributes"], dtype=pl.List(pl.Utf8)),
        "base_quality": base_quality, "drift_slope": slope,
        "trend": [("up", "fade", "stable")[t] for t in trend], "launch_boost": launch_boost,
        "created_day": (created_ms - start_ms) / DAY_MS,
    })
    return Catalog(items, truth, category, np.array(rows["tier"]), attr, base_quality, slope, launch_boost, created_ms)


def make_users(rng: np.random.Generator, n_users: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Category affinity (Dirichlet, concentrated on 1-4 categories), preferred tier, preferred attributes."""
    k = len(CATEGORIES)
    cat_pop = rng.dirichlet(np.full(k, 4.0))
    n_focus = rng.choice([1, 2, 3, 4], size=n_users, p=[0.1, 0.35, 0.35, 0.2])
    affinity = np.empty((n_users, k))
    user_attr = np.zeros((n_users, len(ATTRIBUTES)), dtype=bool)
    for u in range(n_users):
        focus = rng.choice(k, size=n_focus[u], replace=False, p=cat_pop)
        alpha = np.full(k, 0.05)
        alpha[focus] += 2.0
        a = np.maximum(rng.dirichlet(alpha), 1e-4)
        affinity[u] = a / a.sum()
        for _ in range(1 + int(rng.random() < 0.5)):
            cat = CATEGORIES[rng.choice(k, p=affinity[u])]
            _, values = cat.attributes[rng.integers(len(cat.attributes))]
            user_attr[u, ATTR_INDEX[values[rng.integers(len(values))]]] = True
    user_tier = rng.choice(3, size=n_users, p=USER_TIER_P)
    return affinity, user_tier, user_attr
