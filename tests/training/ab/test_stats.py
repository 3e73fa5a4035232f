"""The A/B statistics against reference implementations and closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from training.ab import stats as ab_stats


def test_welch_and_mean_interval_match_scipy():
    rng = np.random.default_rng(0)
    t_values, c_values = rng.lognormal(1.0, 1.0, 300), rng.lognormal(1.1, 1.5, 200)
    t, c = ab_stats.mean(t_values), ab_stats.mean(c_values)
    ref = stats.ttest_ind(t_values, c_values, equal_var=False)
    cmp = ab_stats.compare(t, c)
    assert cmp.test == "Welch t-test"
    assert cmp.statistic == pytest.approx(ref.statistic) and cmp.p_value == pytest.approx(ref.pvalue)
    lo, hi = stats.t.interval(0.95, 299, loc=t_values.mean(), scale=stats.sem(t_values))
    assert t.ci == pytest.approx((lo, hi))
    _, df, _ = ab_stats.welch_ttest(t, c)
    dci = ref.confidence_interval(0.95)
    assert cmp.diff_ci == pytest.approx((dci.low, dci.high)) and df == pytest.approx(ref.df)


def test_ratio_with_one_exposure_per_user_is_the_plain_proportion():
    clicks = np.array([1, 0, 0, 1, 1, 0, 0, 0, 1, 0] * 30, dtype=float)
    est = ab_stats.ratio(clicks, np.ones_like(clicks))
    p, n = clicks.mean(), clicks.size
    assert est.value == pytest.approx(p)
    assert est.var == pytest.approx(p * (1 - p) / (n - 1))  # ddof=1 of the per-user residuals


def test_ratio_delta_variance_closed_form():
    num, den = np.array([1.0, 3.0, 0.0, 2.0]), np.array([2.0, 4.0, 1.0, 3.0])
    r = 6.0 / 10.0
    resid = num - r * den
    expected = (resid @ resid / 3) / (4 * 2.5**2)
    assert ab_stats.ratio(num, den).var == pytest.approx(expected)
    with pytest.raises(ValueError, match="at least 2 users"):
        ab_stats.ratio(np.array([1.0]), np.array([1.0]))


def test_two_proportion_z_is_the_uncorrected_chi_square():
    z, p = ab_stats.two_proportion_ztest(130, 1000, 100, 1000)
    chi2, p_ref, _, _ = stats.chi2_contingency([[130, 870], [100, 900]], correction=False)
    assert z**2 == pytest.approx(chi2) and p == pytest.approx(p_ref) and z > 0
    assert ab_stats.two_proportion_ztest(0, 10, 0, 10) == (0.0, 1.0)


def test_wilson_interval_closed_form():
    est = ab_stats.proportion(0, 10)
    z2 = stats.norm.ppf(0.975) ** 2
    assert est.ci[0] == pytest.approx(0.0, abs=1e-12) and est.ci[1] == pytest.approx(z2 / (10 + z2))
    est = ab_stats.proportion(50, 100)
    assert est.ci == pytest.approx((0.4038, 0.5962), abs=1e-4)


def test_lift_interval_brackets_the_lift_and_is_undefined_against_zero():
    t, c = ab_stats.proportion(130, 1000), ab_stats.proportion(100, 1000)
    cmp = ab_stats.compare(t, c)
    assert cmp.lift == pytest.approx(0.3)
    lo, hi = cmp.lift_ci
    assert lo < 0.3 < hi and hi - 0.3 > 0.3 - lo  # log scale: wider above
    assert ab_stats.compare(t, ab_stats.proportion(0, 1000)).lift is None
    with pytest.raises(ValueError, match="cannot compare"):
        ab_stats.compare(t, ab_stats.mean(np.array([1.0, 2.0])))


def test_power_and_mde_agree():
    se = 0.01
    assert ab_stats.z_test_power(0.0, se) == pytest.approx(0.05)
    mde = ab_stats.minimum_detectable_effect(se)
    assert mde == pytest.approx((stats.norm.ppf(0.975) + stats.norm.ppf(0.8)) * se)
    assert ab_stats.z_test_power(mde, se) == pytest.approx(0.8, abs=1e-3)  # + the negligible other tail


def test_srm_is_scipys_chi_square_and_normalises_shares():
    srm = ab_stats.sample_ratio_mismatch({"a": 480, "b": 1020, "c": 500}, {"a": 1, "b": 2, "c": 1})
    ref = stats.chisquare([480, 1020, 500], [500, 1000, 500])
    assert srm.chi2 == pytest.approx(ref.statistic) and srm.p_value == pytest.approx(ref.pvalue) and srm.df == 2
    assert srm.shares == {"a": 0.25, "b": 0.5, "c": 0.25} and not srm.flagged
    missing = ab_stats.sample_ratio_mismatch({"a": 500}, {"a": 0.5, "b": 0.5})
    assert missing.observed == {"a": 500, "b": 0} and missing.flagged and math.isclose(missing.chi2, 500.0)
