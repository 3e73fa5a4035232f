"""Simulated A/B experiments on the synthetic shop, for the A/B report's tests and docs.

The synthetic shop (training/data/synth.py) supplies the users, the ranked lists they were shown and
the true response model. An experiment re-uses those lists as Rank exposures and redraws the
responses from the truth, as synth does: a shown item is clicked with
`synth.click_probability(position, interest)`, added to the cart with
`CART_BASE * (0.5 + squash(interest))` after a click and bought with
`PURCHASE_BASE * (0.7 + 0.3 * tier_factor)` after a cart. A treatment multiplies every shown
item's click probability by (1 + lift): a planted effect of known size. Users differ in taste and
in how many lists they see, so their exposures are correlated, as in a real shop.

    python -m training.ab.simulation --out runs/ab-sim --users 2000 --days 28 --lift 0.1
writes a shop under OUT/shop and an experiment (OUT/exposures/, OUT/data/) for `semrank ab report`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import polars as pl

from featurizer.contracts.schema import read_dataset, write_dataset
from training.data.synth import (
    CART_BASE,
    DAY_MS,
    PURCHASE_BASE,
    TIER_FACTOR,
    SynthConfig,
    click_probability,
    load_truth,
    squash,
    synthesize,
)


@dataclass(frozen=True)
class Population:
    """Exposed users, their exposures (ranked lists) and each shown item's true response probabilities."""

    user_ids: list[str]  # user index -> id; only users with >= 1 exposure
    items: pl.DataFrame  # the shop's items table (item index = row)
    exposure_user: np.ndarray  # exposure -> user index, exposures sorted by time
    exposure_ts_ms: np.ndarray
    request_ids: list[str]
    shown: np.ndarray  # exposures x list size, item indices, best first
    p_click: np.ndarray  # exposures x list size
    p_cart: np.ndarray  # given a click
    p_purchase: np.ndarray  # given an add_to_cart

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def prices(self) -> np.ndarray:
        return self.items["price"].fill_null(0.0).to_numpy()


def population_from_shop(shop_dir: str | Path) -> Population:
    """The impression lists of a synthesized shop as exposures, with true probabilities from its truth/."""
    ds = read_dataset(shop_dir)
    truth, users, items = load_truth(shop_dir)
    imp = (ds.events.filter(pl.col("event") == "impression")
           .join(users.select("user_id").with_row_index("u"), on="user_id")
           .join(items.select("item_id").with_row_index("i"), on="item_id")
           .sort("ts", "request_id", "position"))
    lists = imp.group_by("request_id", maintain_order=True).agg(
        pl.col("ts").first(), pl.col("u").first(), pl.col("i"), pl.col("position"))
    sizes = lists["i"].list.len()
    if sizes.n_unique() != 1:
        raise ValueError(f"{shop_dir}: impression lists differ in length; a synth shop has one list size")
    shown = np.stack(lists["i"].to_numpy()).astype(np.int64)
    pos = np.broadcast_to(np.arange(shown.shape[1]), shown.shape)
    ts_ms = lists["ts"].dt.epoch("ms").to_numpy()
    day = (ts_ms - truth.start_ms) // DAY_MS
    exposed, user = np.unique(lists["u"].to_numpy().astype(np.int64), return_inverse=True)
    uu = np.broadcast_to(exposed[user][:, None], shown.shape)
    interest = truth.interest(uu, shown, day[:, None])
    tier_fit = TIER_FACTOR[truth.user_tier[uu], truth.item_tier[shown]]
    return Population(
        user_ids=users["user_id"].gather(exposed).to_list(), items=ds.items.sort("item_id"),
        exposure_user=user, exposure_ts_ms=ts_ms, request_ids=lists["request_id"].to_list(), shown=shown,
        p_click=click_probability(pos, interest), p_cart=CART_BASE * (0.5 + squash(interest)),
        p_purchase=PURCHASE_BASE * (0.7 + 0.3 * tier_fit))


def shop_population(shop: Path | None, out_dir: Path, users: int = 2000) -> Population:
    """The population of `shop`, or of a shop synthesized once under `out_dir/shop` (seed 0, 300 items,
    28 days) and reused by later runs: what the simulation commands start from."""
    if shop is None:
        from training.data.synth import SynthConfig, synthesize

        shop = out_dir / "shop"
        if not shop.exists():
            synthesize(shop, seed=0, config=SynthConfig(n_users=users, n_items=300, n_days=28))
    return population_from_shop(shop)


def split_users(n_users: int, rng: np.random.Generator, shares: tuple[float, ...] = (0.5, 0.5)) -> np.ndarray:
    """Variant index per user: a random split with exactly round(share * n) users per variant."""
    counts = np.floor(np.cumsum(shares) / np.sum(shares) * n_users + 0.5).astype(int)
    variant = np.searchsorted(counts, np.arange(n_users), side="right")
    return rng.permutation(variant)


def click_multiplier(pop: Population, variant_of_user: np.ndarray, lifts: tuple[float, ...]) -> np.ndarray:
    """Per exposure: 1 + the lift of its user's variant."""
    return 1.0 + np.asarray(lifts, dtype=float)[variant_of_user[pop.exposure_user]]


def draw_responses(pop: Population, rng: np.random.Generator, multiplier: np.ndarray | float = 1.0
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clicks, add-to-carts and purchases per shown item (exposures x list size, bool)."""
    m = np.broadcast_to(np.asarray(multiplier, dtype=float), (pop.shown.shape[0],))[:, None]
    click = rng.random(pop.shown.shape) < np.minimum(pop.p_click * m, 1.0)
    cart = np.zeros_like(click)
    cart[click] = rng.random(int(click.sum())) < pop.p_cart[click]
    buy = np.zeros_like(click)
    buy[cart] = rng.random(int(cart.sum())) < pop.p_purchase[cart]
    return click, cart, buy


def per_user(pop: Population, click: np.ndarray, cart: np.ndarray, buy: np.ndarray) -> dict[str, np.ndarray]:
    """The per-user sums of `training.ab.prepare.user_table`, from simulated responses."""
    u, n = pop.exposure_user, pop.n_users
    revenue = (buy * pop.prices[pop.shown]).sum(axis=1)
    return {
        "exposures": np.bincount(u, minlength=n).astype(float),
        "click_exposures": np.bincount(u, weights=click.any(axis=1), minlength=n),
        "cart_exposures": np.bincount(u, weights=cart.any(axis=1), minlength=n),
        "purchase_exposures": np.bincount(u, weights=buy.any(axis=1), minlength=n),
        "revenue": np.bincount(u, weights=revenue, minlength=n),
    }


def ctr_moments(pop: Population, multiplier: float) -> tuple[float, float]:
    """True CTR (exposures with a click / exposures) when every click probability is scaled by `multiplier`,
    and the per-user variance term of its delta method: E[(Y - r N)^2] / E[N]^2 over users."""
    q = 1.0 - np.prod(1.0 - np.minimum(pop.p_click * multiplier, 1.0), axis=1)  # P(exposure has a click)
    u, n = pop.exposure_user, pop.n_users
    mu = np.bincount(u, weights=q, minlength=n)  # expected clicked exposures per user
    v = np.bincount(u, weights=q * (1.0 - q), minlength=n)  # their Bernoulli variance
    exposures = np.bincount(u, minlength=n).astype(float)
    r = mu.sum() / exposures.sum()
    return float(r), float(np.mean(v + (mu - r * exposures) ** 2) / exposures.mean() ** 2)


# --------------------------------------------------------------------------- files for `semrank ab report`


def _iso(ms: np.ndarray) -> list[str]:
    return [datetime.fromtimestamp(t / 1000, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ") for t in ms]


@dataclass(frozen=True)
class SimulatedRun:
    exposures: Path  # directory with exposures-000.jsonl
    data: Path  # data directory: events (click, add_to_cart, purchase) and items
    per_user: dict[str, np.ndarray]  # the drawn responses summed per user (`per_user`)


def write_experiment(pop: Population, out_dir: str | Path, variant_of_user: np.ndarray, names: tuple[str, ...],
                     lifts: tuple[float, ...], seed: int = 0, experiment: str = "sim",
                     request_id_share: float = 0.5) -> SimulatedRun:
    """Exposure log (OUT/exposures/exposures-000.jsonl) and events + items (OUT/data/) of one simulated run.

    A share of the outcome events carries the exposure's request_id; the rest are matched by time window."""
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    click, cart, buy = draw_responses(pop, rng, click_multiplier(pop, variant_of_user, lifts))
    exposures = pl.DataFrame({
        "ts": _iso(pop.exposure_ts_ms), "request_id": pop.request_ids,
        "user_id": [pop.user_ids[u] for u in pop.exposure_user], "experiment": experiment,
        "variant": [names[v] for v in variant_of_user[pop.exposure_user]],
        "bundle_version": [f"bundle-{names[v]}" for v in variant_of_user[pop.exposure_user]],
        "item_ids": [[pop.items["item_id"][int(i)] for i in row] for row in pop.shown],
    })
    (out_dir / "exposures").mkdir(parents=True, exist_ok=True)
    exposures.write_ndjson(out_dir / "exposures" / "exposures-000.jsonl")
    e, k = np.nonzero(click)
    t_click = pop.exposure_ts_ms[e] + 3_000 + 2_000 * k + rng.exponential(20_000, e.size).astype(np.int64)
    t_cart = t_click + 5_000 + rng.exponential(45_000, e.size).astype(np.int64)
    t_buy = t_cart + 20_000 + rng.exponential(120_000, e.size).astype(np.int64)
    with_rid = rng.random(e.size) < request_id_share
    frames = []
    for name, mask, ts in (("click", np.ones(e.size, bool), t_click), ("add_to_cart", cart[e, k], t_cart),
                           ("purchase", buy[e, k], t_buy)):
        frames.append(pl.DataFrame({
            "ts": pl.from_epoch(pl.Series(ts[mask]), time_unit="ms").dt.replace_time_zone("UTC"),
            "user_id": [pop.user_ids[u] for u in pop.exposure_user[e[mask]]],
            "item_id": pop.items["item_id"].gather(pop.shown[e[mask], k[mask]]).to_list(),
            "event": name,
            "request_id": [pop.request_ids[x] if r else None for x, r in zip(e[mask], with_rid[mask])],
        }, schema_overrides={"request_id": pl.Utf8}))
    write_dataset(out_dir / "data", pop.items, pl.concat(frames))
    return SimulatedRun(out_dir / "exposures", out_dir / "data", per_user(pop, click, cart, buy))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write a simulated A/B experiment on the synthetic shop.")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--days", type=int, default=28)
    p.add_argument("--lift", type=float, default=0.05, help="relative lift of treatment's click probabilities")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    shop = args.out / "shop"
    synthesize(shop, seed=args.seed, config=SynthConfig(n_users=args.users, n_items=300, n_days=args.days))
    pop = population_from_shop(shop)
    variant = split_users(pop.n_users, np.random.default_rng(args.seed))
    run = write_experiment(pop, args.out, variant, ("control", "treatment"), (0.0, args.lift), seed=args.seed)
    r_c, _ = ctr_moments(pop, 1.0)
    r_t, _ = ctr_moments(pop, 1.0 + args.lift)
    print(json.dumps({"exposures": str(run.exposures), "data": str(run.data), "exposed_users": pop.n_users,
                      "true_ctr_control": r_c, "true_ctr_treatment": r_t, "true_ctr_lift": r_t / r_c - 1.0}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
