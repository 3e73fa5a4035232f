"""Many metrics and variants at once: Holm and Benjamini-Hochberg adjusted p-values, the family a
report corrects over (guardrails apart), and the verdict a report gives or withholds."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from scipy.stats import norm

from training.ab import stats as ab_stats
from training.ab.prepare import Prepared
from training.ab.render import markdown
from training.ab.report import MIN_USERS_WITH_EVENT, build_report
from training.ab.simulation import draw_responses, per_user, population_from_shop, split_users
from training.ab.validity import cuped_aa, peeking_aa
from training.data.synth import SynthConfig, synthesize
from tests.training.ab.test_prepare import WINDOW, _binomial_band

P = [0.01, 0.04, 0.03, 0.005, 0.2]


def test_adjusted_p_values_equal_rs_p_adjust():
    # R: p.adjust(c(0.01, 0.04, 0.03, 0.005, 0.2), "holm") and "BH"
    assert ab_stats.holm(P) == pytest.approx([0.04, 0.09, 0.09, 0.025, 0.2])
    assert ab_stats.benjamini_hochberg(P) == pytest.approx([0.025, 0.05, 0.05, 0.025, 0.2])
    assert ab_stats.adjust(P, "none") == P
    with pytest.raises(ValueError, match="correction 'bonferoni'"):
        ab_stats.adjust(P, "bonferoni")


def test_family_error_rates_hold_on_independent_tests():
    """12 tests per run, 4,000 runs. All null: Holm's chance of any false call <= alpha (uncorrected:
    about 1 - 0.95^12 = 46%). Four real effects: BH's share of false calls <= alpha, and BH calls
    at least what Holm calls."""
    rng = np.random.default_rng(5)
    runs, m, alpha = 4000, 12, 0.05
    null = rng.uniform(size=(runs, m))
    any_raw = np.mean((null < alpha).any(axis=1))
    any_holm = np.mean([min(ab_stats.holm(list(r))) < alpha for r in null])
    lo, hi = _binomial_band(runs, alpha)
    assert any_raw > 0.4 and any_holm <= hi, (any_raw, any_holm)
    z = rng.normal(size=(runs, m))
    z[:, :4] += 3.0  # four true effects
    p = 2 * norm.sf(np.abs(z))
    fdp, holm_calls, bh_calls = [], 0, 0
    for row in p:
        bh = np.array(ab_stats.benjamini_hochberg(list(row))) < alpha
        holm = np.array(ab_stats.holm(list(row))) < alpha
        assert not (holm & ~bh).any()  # BH rejects everything Holm does
        holm_calls, bh_calls = holm_calls + holm.sum(), bh_calls + bh.sum()
        fdp.append(bh[4:].sum() / max(1, bh.sum()))
    assert np.mean(fdp) <= alpha and bh_calls > holm_calls


@pytest.fixture(scope="module")
def population(tmp_path_factory):
    shop = tmp_path_factory.mktemp("ab_shop_corrections")
    synthesize(shop, seed=13, config=SynthConfig(n_users=1500, n_items=300, n_days=28))
    return population_from_shop(shop)


def _prepared(pop, variant_of_user: np.ndarray, names: tuple[str, ...], rng) -> Prepared:
    pu = per_user(pop, *draw_responses(pop, rng))
    users = pl.DataFrame({"user_id": pop.user_ids, "variant": [names[k] for k in variant_of_user],
                          **{k: pu[k] for k in ("exposures", "click_exposures", "cart_exposures", "purchase_exposures",
                                                "revenue")}}).filter(pl.col("exposures") > 0)
    return Prepared(users=users, experiment="aa", exposures=int(users["exposures"].sum()),
                    bundle_versions={n: ["v1"] for n in names}, time_range=("t0", "t1"), prices=True)


def test_aa_with_two_treatments_makes_a_false_call_at_most_alpha_of_the_time_with_holm(population):
    """Control and two treatments, all the same: 6 goal metrics x 2 variants = 12 correlated tests.
    Uncorrected, some test 'wins' in a good share of runs; Holm keeps any false call <= alpha."""
    rng = np.random.default_rng(20261206)
    names, runs = ("control", "b", "c"), 300
    raw = holm = 0
    for _ in range(runs):
        variant = split_users(population.n_users, rng, (1 / 3, 1 / 3, 1 / 3))
        report = build_report(_prepared(population, variant, names, rng), WINDOW, min_users=1)
        calls = [c for per in report["comparisons"].values() for c in per.values() if not c["guardrail"]]
        assert report["correction"]["family_size"] == len(calls) == 12
        raw += any(c["p_value"] < 0.05 for c in calls)
        holm += any(c["significant"] for c in calls)
    lo, hi = _binomial_band(runs, 0.05)
    print(f"\nA/A/A over {runs} splits: any uncorrected call {raw / runs:.3f}, any Holm call {holm / runs:.3f} "
          f"(alpha band [{lo:.3f}, {hi:.3f}])")
    assert raw / runs > hi and holm / runs <= hi


def test_the_verdict_comes_first_and_waits_for_enough_users(population):
    rng = np.random.default_rng(3)
    variant = split_users(population.n_users, rng)
    prep = _prepared(population, variant, ("control", "treatment"), rng)
    ready = build_report(prep, WINDOW)
    assert ready["verdict"]["status"] == "ready" and ready["verdict"]["reasons"] == []
    assert ready["verdict"]["variants"]["treatment"]["primary"] in ("better", "worse", "no detectable difference")
    guard = ready["comparisons"]["treatment"]["exposures_per_user"]
    assert guard["guardrail"] and guard["p_adjusted"] is None
    assert ready["correction"] == {"method": "holm", "family_size": 6, "min_users_with_event": MIN_USERS_WITH_EVENT}
    text = markdown(ready)
    assert text.splitlines()[2].startswith("**Verdict**") and "holm correction over 6 tests" in text
    most = max(d["users_with_event"] for d in ready["variants"].values())
    withheld = build_report(prep, WINDOW, min_users=most + 1, correction="bh")
    assert withheld["verdict"]["status"] == "withheld"
    assert "each arm needs" in withheld["verdict"]["reasons"][0]
    assert markdown(withheld).splitlines()[2].startswith("**No verdict yet**")
    bh = withheld["comparisons"]["treatment"]["ctr"]
    assert bh["p_adjusted"] >= bh["p_value"]
    with pytest.raises(ValueError, match="correction"):
        build_report(prep, WINDOW, correction="sidak")


def test_peeking_daily_inflates_the_fixed_test_and_not_the_confidence_sequence(population):
    """1,000 A/A runs, looked at at the end of every day: stopping at the first fixed-horizon p < 0.05
    calls a difference far more often than alpha; the confidence sequence does so at most alpha."""
    res = peeking_aa(population, runs=1000)
    lo, hi = res["band"]
    print(f"\nA/A over {res['runs']} runs, {res['looks']} daily looks: any fixed-horizon call "
          f"{res['fixed_horizon_rate']:.3f}, any confidence-sequence call {res['sequence_rate']:.3f} "
          f"(alpha band [{lo:.3f}, {hi:.3f}])")
    assert res["fixed_horizon_rate"] > hi and res["sequence_rate"] <= hi


def test_confidence_sequence_is_wider_than_one_look_and_tightest_relative_near_n_star():
    z = 1.959964
    ratios = {n: ab_stats.cs_halfwidth(1 / np.sqrt(n), n, 0.05, 10_000) / (z / np.sqrt(n))
              for n in (100, 1_000, 10_000, 100_000)}
    assert all(r > 1 for r in ratios.values())
    assert min(ratios, key=ratios.get) == 10_000 and ratios[10_000] < 1.6
    with pytest.raises(ValueError, match="n >= 1"):
        ab_stats.cs_halfwidth(0.1, 0)
    with pytest.raises(ValueError, match="n_star"):
        ab_stats.cs_rho(0)


def test_an_arm_that_lost_exposures_before_the_log_gets_no_verdict(population):
    rng = np.random.default_rng(4)
    variant = split_users(population.n_users, rng)
    prep = _prepared(population, variant, ("control", "treatment"), rng)
    logged = int(prep.users.filter(pl.col("variant") == "treatment")["exposures"].sum())
    few = build_report(prep, WINDOW, lost={"treatment": logged // 200})  # 0.5%: under the 1% bound
    assert few["verdict"]["status"] == "ready" and few["variants"]["treatment"]["lost_exposures"] == logged // 200
    many = build_report(prep, WINDOW, lost={"treatment": logged // 50})  # about 2%
    assert many["verdict"]["status"] == "withheld"
    assert "dropped" in many["verdict"]["reasons"][0] and "treatment" in many["verdict"]["reasons"][0]
    assert "| treatment |" in markdown(many) and f"| {logged // 50} (" in markdown(many)


def test_cuped_keeps_the_false_positive_rate_and_reports_how_much_variance_fell(population):
    """1,000 A/A splits of the shop's second fortnight, CUPED on the first: each metric rejects at alpha
    (the covariates come before assignment), and the report states the variance reduction."""
    res = cuped_aa(population, runs=1000)
    lo, hi = res["band"]
    print(f"\nCUPED A/A over {res['runs']} splits: rejection rates {res['rates']} (band [{lo:.3f}, {hi:.3f}]); "
          f"mean variance reduction {res['variance_reduction']}")
    assert all(lo <= r <= hi for r in res["rates"].values()), res["rates"]
    fell = res["variance_reduction"]
    assert fell["ctr"] > 0.05 and all(v > -0.01 for v in fell.values())  # never worse than unadjusted, by more than noise
    report = res["last_report"]
    assert all(c["test"] == "CUPED z-test" for k, c in report["comparisons"]["treatment"].items() if k in fell)
    assert report["cuped"]["users_with_pre_period"]["control"] > 0
    assert "CUPED on each user's 14 days" in markdown(report)


def test_cuped_regression_takes_out_what_the_covariate_explains_and_nothing_else():
    rng = np.random.default_rng(8)
    n = 20_000
    x = rng.normal(size=(2, n))
    y = [0.8 * x[k] + rng.normal(scale=0.6, size=n) for k in range(2)]  # corr(x, y) = 0.8: var falls by 64%
    adj, theta = ab_stats.cuped({a: (float(y[k].mean()), y[k] - y[k].mean(), np.c_[x[k], np.ones(n)])
                                 for k, a in enumerate("ab")})
    assert theta == pytest.approx([0.8], abs=0.02)  # the constant column is dropped
    for a in "ab":
        assert 1 - adj[a].var / adj[a].raw_var == pytest.approx(0.64, abs=0.02)
    noise, _ = ab_stats.cuped({a: (0.0, y[k] - y[k].mean(), rng.normal(size=(n, 1))) for k, a in enumerate("ab")})
    assert all(abs(1 - noise[a].var / noise[a].raw_var) < 0.005 for a in "ab")  # an unrelated covariate: nothing


def test_the_validity_tables_carry_intervals_and_a_plot(population, tmp_path):
    """Issue 17 item 6: each simulated rate carries its Clopper-Pearson interval, each variance reduction
    the interval of its mean, in the Markdown and in a PNG (few runs here; the docs' tables have 1,000)."""
    from training.ab.validity import markdown as validity_markdown, plot, rate_interval

    assert rate_interval(50, 1000) == pytest.approx((0.0373, 0.0654), abs=1e-4)  # R: binom.test(50, 1000)
    cuped, peeking = cuped_aa(population, runs=20), peeking_aa(population, runs=20)
    for k, rate in cuped["rates"].items():
        lo, hi = cuped["rates_ci95"][k]
        assert lo <= rate <= hi
        lo, hi = cuped["variance_reduction_ci95"][k]
        assert lo <= cuped["variance_reduction"][k] <= hi
    assert peeking["sequence_ci95"][0] <= peeking["sequence_rate"] <= peeking["sequence_ci95"][1]
    text = validity_markdown(cuped, peeking)
    assert "false-positive rate [95% CI]" in text and "reduction [95% CI]" in text
    plot(cuped, peeking, tmp_path / "ab_validity.png")
    assert (tmp_path / "ab_validity.png").stat().st_size > 10_000
