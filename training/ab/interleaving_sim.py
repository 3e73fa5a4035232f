"""How many users interleaving needs against an A/B split, on the synthetic shop that knows every true interest.

    .venv/bin/python -m training.ab.interleaving_sim [--shop DIR] [--reps 300] [--out runs/interleaving]
    .venv/bin/python -m training.ab.interleaving_sim --shop DIR --bundle-a BUNDLE --bundle-b BUNDLE --out ...

With `--bundle-a`/`--bundle-b`, two trained bundles are the rankers: each re-orders the lists after
both bundles' training data by its own scores (`training.ab.bundle_rankers`). Otherwise:

Two rankers reorder each of the shop's logged lists (`Population`): each sorts the shown items by
their true attractiveness with multiplicative noise fixed per (list, item), **A** with less
(`--noise-a` 1.0) and **B** with more (`--noise-b` 2.0): the planted difference, a ranker that errs
more. (B = the shop's logged order is an option, `--noise-b -1`; interleaving then needs about 20
users.) Clicks follow the shop's click model: position bias x attractiveness, so a better order
earns more clicks.
- **A/B**: half the users see A's lists, half B's; CTR per exposure, delta-method z-test.
- **Interleaving**: every user sees team-draft lists of A and B (`featurizer.contracts.interleaving`,
  coins from the request id); each click counts for its item's team; the per-user preference's sign
  test (`ab_stats.preference`).
For each user count of a grid, `--reps` random user samples and click draws give each method's power
at alpha 0.05; the users each needs for 80% power are interpolated on log users, and their ratio gets
a bootstrap interval (the replicates resampled). The A/A check: A against itself, interleaved, over
`--aa-runs` runs, must call a difference at about alpha. Prints JSON; writes it and a PNG to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featurizer.contracts.interleaving import TEAM_A, team_draft
from training.ab import stats as ab_stats
from training.ab.simulation import Population, shop_population
from training.data.synth import position_bias

ALPHA = 0.05


@dataclass(frozen=True)
class Setup:
    """Per exposure (row): the candidates' attractiveness, each arm's order, the interleaved order and teams."""

    att: np.ndarray  # exposures x K: click probability at the top position (position bias of 1)
    order_a: np.ndarray  # exposures x K: candidate columns, best first
    order_b: np.ndarray
    inter: np.ndarray  # exposures x K: candidate columns of the team-draft list
    team_a: np.ndarray  # exposures x K: True where that position's item is A's


def attractiveness(pop: Population) -> np.ndarray:
    """Click probability at the top position of every shown item (the logged lists were shown in column order)."""
    return pop.p_click / position_bias(np.arange(pop.shown.shape[1]))[None, :]


def make_setup(pop: Population, noise_a: float, noise_b: float | None, seed: int, b_same_as_a: bool = False) -> Setup:
    """Ranker X orders each list by log(true attractiveness) + noise_X x a standard normal draw fixed per
    (list, item): a fixed ranker that errs. `noise_b` None: B is the order the shop logged."""
    att = attractiveness(pop)
    rng = np.random.default_rng(seed)

    def noisy(noise: float) -> np.ndarray:
        return np.argsort(-(np.log(att) + noise * rng.standard_normal(att.shape)), axis=1, kind="stable")

    order_a = noisy(noise_a)
    if b_same_as_a:
        order_b = order_a.copy()
    elif noise_b is None:
        order_b = np.broadcast_to(np.arange(att.shape[1]), att.shape).copy()
    else:
        order_b = noisy(noise_b)
    return setup_from_orders(pop, order_a, order_b)


def setup_from_orders(pop: Population, order_a: np.ndarray, order_b: np.ndarray) -> Setup:
    """The setup of two given rankers' orders (exposures x K columns, best first): e.g. two trained
    bundles' (`training.ab.bundle_rankers`)."""
    att = attractiveness(pop)
    inter = np.empty_like(order_a)
    team_a = np.empty(att.shape, dtype=bool)
    for e in range(att.shape[0]):
        items, teams = team_draft([str(c) for c in order_a[e]], [str(c) for c in order_b[e]], "sim", pop.request_ids[e])
        inter[e] = [int(c) for c in items]
        team_a[e] = [t == TEAM_A for t in teams]
    return Setup(att, order_a, order_b, inter, team_a)


def _click_probability(att_rows: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Per position of lists shown in `order`: position bias x the item's attractiveness, at most 1."""
    return np.minimum(position_bias(np.arange(order.shape[1]))[None, :] * np.take_along_axis(att_rows, order, axis=1), 1.0)


def _clicks(att_rows: np.ndarray, order: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Clicks per position of lists shown in `order`."""
    p = _click_probability(att_rows, order)
    return rng.random(p.shape) < p


def ab_p(pop: Population, s: Setup, users: np.ndarray, rng: np.random.Generator) -> float:
    """One A/B run on `users`: a random half sees A; CTR per exposure by arm, delta-method z-test."""
    arm = np.zeros(pop.n_users, dtype=np.int8) - 1
    arm[users] = rng.permutation(np.arange(users.size) % 2)
    rows = np.flatnonzero(arm[pop.exposure_user] >= 0)
    in_a = arm[pop.exposure_user[rows]] == 0
    order = np.where(in_a[:, None], s.order_a[rows], s.order_b[rows])
    clicked = _clicks(s.att[rows], order, rng).any(axis=1).astype(float)
    u = pop.exposure_user[rows]
    est = []
    for a in (0, 1):
        mine = arm[users] == a
        num = np.bincount(u, weights=clicked, minlength=pop.n_users)[users[mine]]
        den = np.bincount(u, minlength=pop.n_users)[users[mine]].astype(float)
        est.append(ab_stats.ratio(num, den))
    return ab_stats.compare(est[0], est[1]).p_value


def interleaving_p(pop: Population, s: Setup, users: np.ndarray, rng: np.random.Generator) -> float:
    """One interleaved run on `users`: every list team-drafted; per-user preference, sign test."""
    chosen = np.zeros(pop.n_users, dtype=bool)
    chosen[users] = True
    rows = np.flatnonzero(chosen[pop.exposure_user])
    clicks = _clicks(s.att[rows], s.inter[rows], rng)
    u = pop.exposure_user[rows]
    a = np.bincount(u, weights=(clicks & s.team_a[rows]).sum(axis=1), minlength=pop.n_users)[users]
    b = np.bincount(u, weights=(clicks & ~s.team_a[rows]).sum(axis=1), minlength=pop.n_users)[users]
    return ab_stats.preference(a, b).p_value


def power_curve(pop: Population, s: Setup, grid: list[int], reps: int, seed: int) -> dict[str, np.ndarray]:
    """Detections (reps x grid) per method: p < ALPHA on a random sample of n users."""
    rng = np.random.default_rng(seed)
    hits = {"ab": np.zeros((reps, len(grid)), dtype=bool), "interleaving": np.zeros((reps, len(grid)), dtype=bool)}
    for j, n in enumerate(grid):
        for r in range(reps):
            users = rng.choice(pop.n_users, size=n, replace=False)
            hits["ab"][r, j] = ab_p(pop, s, users, rng) < ALPHA
            hits["interleaving"][r, j] = interleaving_p(pop, s, users, rng) < ALPHA
    return hits


def users_for_power(grid: list[int], power: np.ndarray, target: float = 0.8) -> float:
    """Users where the power curve crosses `target`, interpolated on log users; inf when it never does."""
    above = np.flatnonzero(power >= target)
    if not above.size:
        return float("inf")
    j = int(above[0])
    if j == 0:
        return float(grid[0])
    x0, x1, y0, y1 = np.log(grid[j - 1]), np.log(grid[j]), power[j - 1], power[j]
    return float(np.exp(x0 + (target - y0) * (x1 - x0) / max(y1 - y0, 1e-9)))


def ratio_interval(grid: list[int], hits: dict[str, np.ndarray], boot: int, seed: int) -> tuple[float, float]:
    """95% bootstrap interval of users(A/B) / users(interleaving) for 80% power (replicates resampled)."""
    rng = np.random.default_rng(seed)
    reps = hits["ab"].shape[0]
    ratios = []
    for _ in range(boot):
        pick = rng.integers(0, reps, size=reps)
        n_ab = users_for_power(grid, hits["ab"][pick].mean(axis=0))
        n_il = users_for_power(grid, hits["interleaving"][pick].mean(axis=0))
        ratios.append(n_ab / n_il)
    lo, hi = np.percentile(ratios, [2.5, 97.5], method="nearest")  # no interpolation: a ratio may be inf
    return float(lo), float(hi)


def true_ctr(pop: Population, order: np.ndarray) -> float:
    """The expected share of lists with a click when every list is shown in `order`."""
    return float(np.mean(1.0 - np.prod(1.0 - _click_probability(attractiveness(pop), order), axis=1)))


def aa_rate(pop: Population, runs: int, seed: int, noise_a: float, order_a: np.ndarray | None = None) -> float:
    """A against itself, interleaved, on every user: the share of runs that call a difference
    (`order_a`: A's given orders; else A is the noisy ranker)."""
    s = (make_setup(pop, noise_a, None, seed, b_same_as_a=True) if order_a is None
         else setup_from_orders(pop, order_a, order_a.copy()))
    rng = np.random.default_rng(seed + 1)
    users = np.arange(pop.n_users)
    return float(np.mean([interleaving_p(pop, s, users, rng) < ALPHA for _ in range(runs)]))


def run(pop: Population, grid: list[int], reps: int, noise_a: float, noise_b: float | None, aa_runs: int,
        seed: int = 0, boot: int = 1000, orders: tuple[np.ndarray, np.ndarray] | None = None,
        rankers: dict[str, str] | None = None) -> dict:
    """`orders`: A's and B's given orders of every list (two bundles), else the noisy rankers of
    `noise_a` and `noise_b`; `rankers` names A and B in the result."""
    grid = [n for n in grid if n <= pop.n_users]
    s = make_setup(pop, noise_a, noise_b, seed) if orders is None else setup_from_orders(pop, *orders)
    hits = power_curve(pop, s, grid, reps, seed + 1)
    power = {m: h.mean(axis=0) for m, h in hits.items()}
    need = {m: users_for_power(grid, p) for m, p in power.items()}
    lo, hi = ratio_interval(grid, hits, boot, seed + 2)
    if rankers is None:
        rankers = {"a": f"true attractiveness, noise {noise_a}",
                   "b": "the logged order" if noise_b is None else f"true attractiveness, noise {noise_b}"}
    return {
        "rankers": rankers, "users": pop.n_users, "lists": int(pop.shown.shape[0]),
        "true_ctr": {"a": true_ctr(pop, s.order_a), "b": true_ctr(pop, s.order_b)},
        "grid_users": grid, "reps": reps, "alpha": ALPHA, "noise_a": noise_a, "noise_b": noise_b,
        "power": {m: [round(float(x), 4) for x in p] for m, p in power.items()},
        "users_for_80pct_power": need,
        "ratio_ab_over_interleaving": need["ab"] / need["interleaving"], "ratio_ci95": [lo, hi],
        "aa_interleaving_false_positive_rate": (aa_rate(pop, aa_runs, seed + 3, noise_a, None if orders is None
                                                        else orders[0]) if aa_runs else None),
        "aa_runs": aa_runs,
    }


def plot(result: dict, path: Path) -> None:
    from training.figures import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for m, label in (("ab", "A/B split (CTR, delta method)"), ("interleaving", "team-draft interleaving (sign test)")):
        ax.plot(result["grid_users"], result["power"][m], marker="o", label=label)
    ax.axhline(0.8, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("users")
    ax.set_ylabel(f"power at alpha {result['alpha']}")
    ax.set_title(f"A: {result['rankers']['a']}\nB: {result['rankers']['b']}\nusers for 80% power, "
                 f"A/B / interleaving = {result['ratio_ab_over_interleaving']:.1f}x", fontsize=8)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shop", type=Path, default=None, help="a synthesized shop (default: make one, seed 0)")
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--reps", type=int, default=300)
    p.add_argument("--grid", type=int, nargs="+", default=[10, 20, 40, 80, 160, 320, 640, 1280, 2000])
    p.add_argument("--noise-a", type=float, default=1.0, help="ranker A's noise on log true attractiveness")
    p.add_argument("--noise-b", type=float, default=2.0, help="ranker B's (the planted difference); < 0: the logged order")
    p.add_argument("--aa-runs", type=int, default=1000)
    p.add_argument("--bundle-a", type=Path, default=None,
                   help="two trained bundles as the rankers (with --bundle-b; --shop must be the shop they were "
                        "trained on): each re-orders the lists after both bundles' training data")
    p.add_argument("--bundle-b", type=Path, default=None)
    p.add_argument("--out", type=Path, default=Path("runs/interleaving"))
    args = p.parse_args(argv)
    pop = shop_population(args.shop, args.out, args.users)
    orders = rankers = None
    if (args.bundle_a is None) != (args.bundle_b is None) or (args.bundle_a is not None and args.shop is None):
        p.error("--bundle-a and --bundle-b go together, with the --shop they were trained on")
    if args.bundle_a is not None:
        from ranker.bundle import load_bundle
        from training.ab.bundle_rankers import bundle_orders, held_out_exposures

        bundles = [load_bundle(args.bundle_a), load_bundle(args.bundle_b)]
        pop = held_out_exposures(pop, bundles)
        orders = tuple(bundle_orders(args.shop, pop, bundles))
        rankers = {k: f"{b.manifest.get('variant', '?')} bundle {b.version}" for k, b in zip("ab", bundles)}
    result = run(pop, args.grid, args.reps, args.noise_a, None if args.noise_b < 0 else args.noise_b, args.aa_runs,
                 orders=orders, rankers=rankers)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "interleaving.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out / "interleaving.png")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
