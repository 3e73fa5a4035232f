"""Is the A/B analysis honest? Simulations on the synthetic shop, which knows every user's true interest.

    .venv/bin/python -m training.ab.validity [--shop DIR] [--runs 1000] [--out runs/ab_validity]

Prints (and writes as JSON and Markdown) the false-positive tables of docs/ab_testing.md, each rate
with the 99.9% binomial interval around alpha that it must fall in:
- fixed-horizon tests with CUPED, one look, per metric (`cuped_aa`): the shop's second fortnight is the
  experiment, the first its history;
- a team that looks every day for 28 days (`peeking_aa`): the fixed-horizon z-test against the
  confidence sequence, on CTR.
The interleaving A/A and the sample-size comparison are `training.ab.interleaving_sim`. The tests in
tests/training/ab/ run the same functions.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import polars as pl
from scipy import stats

from training.ab import stats as ab_stats
from training.ab.prepare import Prepared
from training.ab.report import build_report
from training.ab.simulation import Population, draw_responses, shop_population, split_users

ALPHA = 0.05
GOAL_METRICS = ("ctr", "add_to_cart_rate", "conversion_rate", "users_with_click", "users_with_purchase",
                "revenue_per_user")


def binomial_band(n: int, p: float, level: float = 0.999) -> tuple[float, float]:
    lo, hi = stats.binom.interval(level, n, p)
    return lo / n, hi / n


def rate_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """The Clopper-Pearson interval of a rate of k in n (each measured false-positive rate carries one)."""
    ci = stats.binomtest(int(k), n).proportion_ci(confidence_level=level, method="exact")
    return float(ci.low), float(ci.high)


def mean_interval(values, level: float = 0.95) -> tuple[float, float]:
    """A normal interval of a mean over independent runs."""
    v = np.asarray(values, dtype=float)
    half = stats.norm.ppf(0.5 + level / 2) * v.std(ddof=1) / np.sqrt(v.size)
    return float(v.mean() - half), float(v.mean() + half)


def pre_post_users(pop, variant: np.ndarray, names, rng, start_day: int = 14, lookback_days: int = 14) -> Prepared:
    """The shop's lists before `start_day` are history, those after it the experiment: per user the
    experiment's sums and, as `training.ab.prepare.pre_period` makes them from events, the
    `lookback_days` before their first exposure."""
    day = (pop.exposure_ts_ms - pop.exposure_ts_ms.min()) // 86_400_000
    click, cart, buy = draw_responses(pop, rng)
    post = day >= start_day
    u = pop.exposure_user
    first = np.full(pop.n_users, np.iinfo(np.int64).max)
    np.minimum.at(first, u[post], pop.exposure_ts_ms[post])
    pre = ~post & (pop.exposure_ts_ms < first[u]) & (pop.exposure_ts_ms >= first[u] - lookback_days * 86_400_000)
    n = pop.n_users
    revenue = (buy * pop.prices[pop.shown]).sum(axis=1)

    def sums(mask, x):
        return np.bincount(u[mask], weights=x[mask], minlength=n)

    ones = np.ones(len(u))
    users = pl.DataFrame({
        "user_id": pop.user_ids, "variant": [names[k] for k in variant],
        "exposures": sums(post, ones), "click_exposures": sums(post, click.any(axis=1).astype(float)),
        "cart_exposures": sums(post, cart.any(axis=1).astype(float)),
        "purchase_exposures": sums(post, buy.any(axis=1).astype(float)), "revenue": sums(post, revenue),
        "pre_lists": sums(pre, ones), "pre_clicks": sums(pre, click.sum(axis=1).astype(float)),
        "pre_carts": sums(pre, cart.sum(axis=1).astype(float)), "pre_purchases": sums(pre, buy.sum(axis=1).astype(float)),
        "pre_revenue": sums(pre, revenue),
    }).with_columns((pl.col("pre_lists") > 0).cast(pl.Float64).alias("has_pre")).filter(pl.col("exposures") > 0)
    return Prepared(users=users, experiment="cuped", exposures=int(users["exposures"].sum()),
                    bundle_versions={v: ["v1"] for v in names}, time_range=("t0", "t1"), prices=True)


def daily_ctr_looks(pop, variant: np.ndarray, click: np.ndarray, alpha: float, n_star: int):
    """Per day of the experiment: did the fixed-horizon z-test, and did the confidence sequence, call
    the CTR difference? Each look uses every exposure up to that day's end (vectorised over days)."""
    day = ((pop.exposure_ts_ms - pop.exposure_ts_ms.min()) // 86_400_000).astype(int)
    n_days = int(day.max()) + 1
    shape = (pop.n_users, n_days)
    exp_cum = np.zeros(shape)
    clk_cum = np.zeros(shape)
    np.add.at(exp_cum, (pop.exposure_user, day), 1.0)
    np.add.at(clk_cum, (pop.exposure_user, day), click.any(axis=1).astype(float))
    exp_cum, clk_cum = exp_cum.cumsum(axis=1), clk_cum.cumsum(axis=1)
    est = {}
    for arm in (0, 1):
        num, den = clk_cum[variant == arm], exp_cum[variant == arm]
        seen = den > 0
        n = seen.sum(axis=0)
        r = num.sum(axis=0) / np.maximum(den.sum(axis=0), 1)
        resid = np.where(seen, num - r * den, 0.0)
        mean_den = den.sum(axis=0) / np.maximum(n, 1)
        var = (resid ** 2).sum(axis=0) / np.maximum(n - 1, 1) / np.maximum(n * mean_den ** 2, 1e-12)
        est[arm] = (r, var, n)
    diff = est[1][0] - est[0][0]
    se = np.sqrt(est[1][1] + est[0][1])
    n = est[0][2] + est[1][2]
    ok = n >= 20
    fixed = ok & (np.abs(diff) > 1.959964 * se)
    half = np.array([ab_stats.cs_halfwidth(s, int(k), alpha, n_star) if k else np.inf for s, k in zip(se, n)])
    seq = ok & (np.abs(diff) > half)
    return fixed.any(), seq.any(), n_days


def cuped_aa(pop: Population, runs: int, seed: int = 31) -> dict:
    """A/A splits of the second fortnight, CUPED on the first: the share of runs each metric's
    fixed-horizon test calls, and the mean variance reduction."""
    rng = np.random.default_rng(seed)
    rejected = {k: 0 for k in GOAL_METRICS}
    reduction: dict[str, list[float]] = {k: [] for k in GOAL_METRICS}
    for _ in range(runs):
        variant = split_users(pop.n_users, rng)
        report = build_report(pre_post_users(pop, variant, ("control", "treatment"), rng), timedelta(minutes=30),
                              cuped_days=14, correction="none", min_users=1)
        for k in GOAL_METRICS:
            c = report["comparisons"]["treatment"][k]
            rejected[k] += c["p_value"] < ALPHA
            reduction[k].append(c["variance_reduction"])
    return {"runs": runs, "rates": {k: v / runs for k, v in rejected.items()},
            "rates_ci95": {k: rate_interval(v, runs) for k, v in rejected.items()},
            "variance_reduction": {k: float(np.mean(v)) for k, v in reduction.items()},
            "variance_reduction_ci95": {k: mean_interval(v) for k, v in reduction.items()},
            "band": binomial_band(runs, ALPHA), "last_report": report}


def peeking_aa(pop: Population, runs: int, seed: int = 17) -> dict:
    """A/A runs looked at after every day: the share that any look calls, fixed-horizon vs sequence."""
    rng = np.random.default_rng(seed)
    fixed = seq = 0
    days = 0
    for _ in range(runs):
        variant = split_users(pop.n_users, rng)
        click, _, _ = draw_responses(pop, rng)
        f, s, days = daily_ctr_looks(pop, variant, click, ALPHA, n_star=pop.n_users)
        fixed += f
        seq += s
    return {"runs": runs, "looks": days, "fixed_horizon_rate": fixed / runs, "sequence_rate": seq / runs,
            "fixed_horizon_ci95": rate_interval(fixed, runs), "sequence_ci95": rate_interval(seq, runs),
            "band": binomial_band(runs, ALPHA)}


def markdown(cuped: dict, peeking: dict) -> str:
    lo, hi = cuped["band"]
    ci = lambda lh: f"[{lh[0]:.3f}, {lh[1]:.3f}]"  # noqa: E731
    lines = [f"Fixed-horizon A/A with CUPED, {cuped['runs']} runs (alpha {ALPHA}; 99.9% band [{lo:.3f}, {hi:.3f}]):", "",
             "| metric | false-positive rate [95% CI] | variance of the difference, reduction [95% CI] |",
             "|---|---:|---:|"]
    lines += [f"| {k} | {cuped['rates'][k]:.3f} {ci(cuped['rates_ci95'][k])} | {cuped['variance_reduction'][k]:.1%} "
              f"[{cuped['variance_reduction_ci95'][k][0]:.1%}, {cuped['variance_reduction_ci95'][k][1]:.1%}] |"
              for k in GOAL_METRICS]
    lo, hi = peeking["band"]
    lines += ["", f"Looking after each of {peeking['looks']} days, {peeking['runs']} A/A runs (band [{lo:.3f}, {hi:.3f}]):", "",
              "| method | runs with a call at any look [95% CI] |", "|---|---:|",
              f"| fixed-horizon z-test | {peeking['fixed_horizon_rate']:.3f} {ci(peeking['fixed_horizon_ci95'])} |",
              f"| confidence sequence | {peeking['sequence_rate']:.3f} {ci(peeking['sequence_ci95'])} |"]
    return "\n".join(lines) + "\n"


def plot(cuped: dict, peeking: dict, path: Path) -> None:
    """The false-positive rates with their intervals against alpha's band, and CUPED's variance reduction."""
    from training.figures import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), gridspec_kw={"width_ratios": [3, 1.3, 3]})
    names = list(GOAL_METRICS)
    bars = [(cuped["rates"][k], cuped["rates_ci95"][k]) for k in names]
    bars += [(peeking["fixed_horizon_rate"], peeking["fixed_horizon_ci95"]),
             (peeking["sequence_rate"], peeking["sequence_ci95"])]
    for ax, part, labels, title in (
            (axes[0], bars[: len(names)], names, f"A/A, one look, CUPED ({cuped['runs']} runs)"),
            (axes[1], bars[len(names):], ["z-test", "sequence"], f"A/A, a look a day ({peeking['runs']} runs)")):
        x = np.arange(len(part))
        rates = np.array([r for r, _ in part])
        err = np.array([[r - lh[0], lh[1] - r] for r, lh in part]).T
        ax.bar(x, rates, yerr=err, capsize=3, color="tab:blue")
        ax.axhspan(*cuped["band"], color="grey", alpha=0.25, label="99.9% band around alpha")
        ax.axhline(ALPHA, color="black", lw=0.8)
        ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("false-positive rate (95% CI)")
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=8)
    red = [cuped["variance_reduction"][k] for k in names]
    err = np.array([[r - cuped["variance_reduction_ci95"][k][0], cuped["variance_reduction_ci95"][k][1] - r]
                    for r, k in zip(red, names)]).T
    axes[2].bar(np.arange(len(names)), red, yerr=err, capsize=3, color="tab:green")
    axes[2].set_xticks(np.arange(len(names)), names, rotation=30, ha="right", fontsize=8)
    axes[2].set_ylabel("variance of the difference: reduction (95% CI)")
    axes[2].set_title("CUPED, 14-day lookback", fontsize=9)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shop", type=Path, default=None, help="a synthesized shop (default: make one, seed 0)")
    p.add_argument("--runs", type=int, default=1000)
    p.add_argument("--out", type=Path, default=Path("runs/ab_validity"))
    args = p.parse_args(argv)
    pop = shop_population(args.shop, args.out)
    cuped, peeking = cuped_aa(pop, args.runs), peeking_aa(pop, args.runs)
    cuped.pop("last_report")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ab_validity.json").write_text(json.dumps({"cuped_aa": cuped, "peeking_aa": peeking}, indent=2) + "\n")
    text = markdown(cuped, peeking)
    (args.out / "ab_validity.md").write_text(text)
    plot(cuped, peeking, args.out / "ab_validity.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
