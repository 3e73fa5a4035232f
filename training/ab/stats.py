"""Statistics of A/B reports: estimates with 95% intervals, tests against control, sample-ratio mismatch.

Users are the randomisation unit, so every estimate here takes per-user aggregates and treats users
as independent. A user's exposures are not independent of each other (the same person, the same
tastes), so a rate per exposure is a ratio of two per-user sums; its variance comes from the delta
method (Deng, Lu & Litz, "Applying the Delta Method in Metric Analytics", KDD 2018). A naive
two-proportion z-test over exposures ignores that clustering and rejects a true null too often
(tests/training/ab/test_prepare.py measures by how much).

- `ratio`:      sum(num) / sum(den) over users, delta-method variance (rates per exposure).
- `proportion`: a share of users, Wilson interval; compared with the pooled two-proportion z-test.
- `mean`:       a mean per user, t interval; compared with Welch's t-test (revenue per user).

Relative lift is (treatment / control - 1); its interval is the delta-method interval of the log
ratio, exponentiated, so it is asymmetric and never below -100%. The p-value tests the difference,
so in rare borderline cases it and the lift interval can disagree about significance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

ALPHA = 0.05
SRM_ALPHA = 0.001  # a sample-ratio mismatch is flagged below this p-value


@dataclass(frozen=True)
class Estimate:
    """A metric in one variant: value, the variance of that value, 95% interval."""

    kind: str  # "ratio" | "proportion" | "mean"
    value: float
    var: float  # variance of the estimate (not of the per-user values)
    ci: tuple[float, float]
    n: int  # users
    count: float = math.nan  # proportion: successes
    df: float = math.inf  # mean: degrees of freedom of var (n - 1)
    sample_var: float = math.nan  # mean: variance of the per-user values


@dataclass(frozen=True)
class Comparison:
    """Treatment against control for one metric."""

    test: str
    diff: float
    diff_ci: tuple[float, float]
    lift: float | None  # relative, None when the control value is 0
    lift_ci: tuple[float, float] | None
    statistic: float
    p_value: float
    mde: float  # absolute difference detectable with 80% power at ALPHA, at these sizes
    significant: bool
    se: float = math.nan  # standard error of the difference (the one its test and interval use)


def _z(alpha: float) -> float:
    return float(stats.norm.ppf(1.0 - alpha / 2.0))


def ratio(num: np.ndarray, den: np.ndarray, alpha: float = ALPHA, bounds: tuple[float, float] | None = (0.0, 1.0)) -> Estimate:
    """sum(num) / sum(den) over users with the delta-method variance; `bounds` clip the interval."""
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    n = num.size
    if n < 2 or den.sum() <= 0:
        raise ValueError(f"a ratio needs at least 2 users and a positive denominator (got {n} users)")
    r = num.sum() / den.sum()
    resid = num - r * den  # per-user linearisation of the ratio
    var = float(resid.var(ddof=1) / (n * den.mean() ** 2))
    half = _z(alpha) * math.sqrt(var)
    lo, hi = r - half, r + half
    if bounds is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    return Estimate("ratio", float(r), var, (float(lo), float(hi)), n)


def proportion(successes: int, n: int, alpha: float = ALPHA) -> Estimate:
    """A share of users with its Wilson interval (sound near 0 and 1, unlike Wald's)."""
    if n < 1:
        raise ValueError("a proportion needs at least one user")
    p = successes / n
    z = _z(alpha)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return Estimate("proportion", p, p * (1 - p) / n, (centre - half, centre + half), n, count=float(successes))


def mean(values: np.ndarray, alpha: float = ALPHA) -> Estimate:
    """A mean per user with its t interval."""
    x = np.asarray(values, dtype=float)
    n = x.size
    if n < 2:
        raise ValueError(f"a mean with an interval needs at least 2 users (got {n})")
    s2 = float(x.var(ddof=1))
    var = s2 / n
    half = float(stats.t.ppf(1 - alpha / 2, n - 1)) * math.sqrt(var)
    m = float(x.mean())
    return Estimate("mean", m, var, (m - half, m + half), n, df=n - 1, sample_var=s2)


def _log_lift(t: Estimate, c: Estimate, alpha: float) -> tuple[float | None, tuple[float, float] | None]:
    if c.value <= 0:
        return None, None
    lift = t.value / c.value - 1.0
    if t.value <= 0:
        return lift, None
    se = math.sqrt(t.var / t.value**2 + c.var / c.value**2)
    z = _z(alpha)
    return lift, (math.exp(math.log(t.value / c.value) - z * se) - 1.0, math.exp(math.log(t.value / c.value) + z * se) - 1.0)


def minimum_detectable_effect(se: float, alpha: float = ALPHA, power: float = 0.8) -> float:
    """Smallest absolute difference a two-sided z-test with this standard error detects with `power`."""
    return (_z(alpha) + float(stats.norm.ppf(power))) * se


def z_test_power(delta: float, se: float, alpha: float = ALPHA) -> float:
    """Power of a two-sided z-test at level alpha when the true difference is `delta`."""
    if se <= 0:
        raise ValueError("se must be positive")
    z, shift = _z(alpha), abs(delta) / se
    return float(stats.norm.cdf(shift - z) + stats.norm.cdf(-shift - z))


def _compare(test: str, t: Estimate, c: Estimate, se: float, statistic: float, p: float, crit: float,
             alpha: float) -> Comparison:
    diff = t.value - c.value
    lift, lift_ci = _log_lift(t, c, alpha)
    mde = minimum_detectable_effect(math.sqrt(t.var + c.var), alpha)
    return Comparison(test, diff, (diff - crit * se, diff + crit * se), lift, lift_ci, statistic, p, mde,
                      bool(p < alpha), se)


def compare_ratios(t: Estimate, c: Estimate, alpha: float = ALPHA) -> Comparison:
    """z-test of the difference of two delta-method ratios (users independent between variants)."""
    se = math.sqrt(t.var + c.var)
    z = (t.value - c.value) / se if se > 0 else 0.0
    p = float(2 * stats.norm.sf(abs(z)))
    return _compare("delta-method z-test", t, c, se, z, p, _z(alpha), alpha)


def two_proportion_ztest(x_t: float, n_t: int, x_c: float, n_c: int) -> tuple[float, float]:
    """Pooled two-proportion z-test: (z, two-sided p)."""
    pooled = (x_t + x_c) / (n_t + n_c)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_t + 1 / n_c))
    if se == 0:
        return 0.0, 1.0
    z = (x_t / n_t - x_c / n_c) / se
    return z, float(2 * stats.norm.sf(abs(z)))


def compare_proportions(t: Estimate, c: Estimate, alpha: float = ALPHA) -> Comparison:
    """Pooled two-proportion z-test; the interval of the difference is Wald's (unpooled)."""
    z, p = two_proportion_ztest(t.count, t.n, c.count, c.n)
    return _compare("two-proportion z-test", t, c, math.sqrt(t.var + c.var), z, p, _z(alpha), alpha)


def welch_ttest(t: Estimate, c: Estimate) -> tuple[float, float, float]:
    """Welch's t-test on two `mean` estimates: (t, Welch-Satterthwaite df, two-sided p)."""
    se2 = t.var + c.var
    if se2 == 0:
        return 0.0, math.inf, 1.0
    stat = (t.value - c.value) / math.sqrt(se2)
    df = se2**2 / (t.var**2 / t.df + c.var**2 / c.df)
    return stat, df, float(2 * stats.t.sf(abs(stat), df))


def compare_means(t: Estimate, c: Estimate, alpha: float = ALPHA) -> Comparison:
    stat, df, p = welch_ttest(t, c)
    crit = float(stats.t.ppf(1 - alpha / 2, df)) if math.isfinite(df) else _z(alpha)
    return _compare("Welch t-test", t, c, math.sqrt(t.var + c.var), stat, p, crit, alpha)


def compare(t: Estimate, c: Estimate, alpha: float = ALPHA) -> Comparison:
    if t.kind != c.kind:
        raise ValueError(f"cannot compare a {t.kind} with a {c.kind}")
    return {"ratio": compare_ratios, "proportion": compare_proportions, "mean": compare_means}[t.kind](t, c, alpha)


@dataclass(frozen=True)
class SampleRatio:
    """Chi-square goodness of fit of users per variant against the configured shares."""

    observed: dict[str, int]
    expected: dict[str, float]
    shares: dict[str, float]  # normalised to sum to 1
    chi2: float
    df: int
    p_value: float
    flagged: bool


def sample_ratio_mismatch(observed: dict[str, int], shares: dict[str, float], alpha: float = SRM_ALPHA) -> SampleRatio:
    """Users per variant against `shares` (normalised); flagged when p < alpha.

    Every variant in `observed` must have a share; a configured variant with no users counts as 0
    observed (which is itself a mismatch)."""
    unknown = sorted(set(observed) - set(shares))
    if unknown:
        raise ValueError(f"variant(s) {', '.join(unknown)} have users but no configured share "
                         f"(configured: {', '.join(shares)}); fix --shares or the experiments file")
    if any(s <= 0 for s in shares.values()):
        raise ValueError(f"shares must be positive: {shares}")
    total_share = sum(shares.values())
    norm = {k: v / total_share for k, v in shares.items()}
    n = sum(observed.values())
    obs = {k: int(observed.get(k, 0)) for k in norm}
    exp = {k: n * s for k, s in norm.items()}
    if len(norm) < 2 or n == 0:
        return SampleRatio(obs, exp, norm, 0.0, 0, 1.0, False)
    chi2 = float(sum((obs[k] - exp[k]) ** 2 / exp[k] for k in norm))
    df = len(norm) - 1
    p = float(stats.chi2.sf(chi2, df))
    return SampleRatio(obs, exp, norm, chi2, df, p, bool(p < alpha))


# --------------------------------------------------------------------------- many tests at once

CORRECTIONS = ("holm", "bh", "none")


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (Holm 1979): reject where adjusted < alpha, and the chance of
    any false rejection in the family stays <= alpha under any dependence between the tests."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    out = [1.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        out[i] = running
    return out


def benjamini_hochberg(p_values: list[float]) -> list[float]:
    """Benjamini-Hochberg adjusted p-values (q-values, 1995): reject where adjusted < alpha, and the
    expected share of false rejections among the rejections stays <= alpha (independent or positively
    dependent tests). More rejections than Holm; a weaker promise."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i], reverse=True)
    out = [1.0] * m
    running = 1.0
    for k, i in enumerate(order):
        rank = m - k  # 1-based rank from the smallest
        running = min(running, p_values[i] * m / rank)
        out[i] = min(1.0, running)
    return out


def adjust(p_values: list[float], method: str) -> list[float]:
    """Adjusted p-values of a family of tests: "holm" (default in reports), "bh", or "none"."""
    if method == "holm":
        return holm(p_values)
    if method == "bh":
        return benjamini_hochberg(p_values)
    if method == "none":
        return list(p_values)
    raise ValueError(f"correction {method!r}: expected one of {', '.join(CORRECTIONS)}")


# --------------------------------------------------------------------------- looking every day

def cs_rho(n_star: int, alpha: float = ALPHA) -> float:
    """The mixture's tuning for a confidence sequence that is tightest at `n_star` units (Howard et al.
    2021, eq. (3.12) as GrowthBook uses it): rho^2 = (-2 log alpha + log(-2 log alpha + 1)) / n_star."""
    if n_star < 1:
        raise ValueError(f"n_star={n_star}: the expected number of users must be >= 1")
    a = -2.0 * math.log(alpha)
    return math.sqrt((a + math.log(a + 1.0)) / n_star)


def cs_halfwidth(se: float, n: int, alpha: float = ALPHA, n_star: int = 10_000) -> float:
    """Half-width of the two-sided asymptotic confidence sequence (Waudby-Smith, Arnold, Wu, Howard &
    Ramdas, "Time-uniform central limit theory and asymptotic confidence sequences", Ann. Statist.
    2024: the normal-mixture boundary) for an estimate with standard error `se` from `n` units:
    sigma * sqrt(2 (n rho^2 + 1) / (n^2 rho^2) * log(sqrt(n rho^2 + 1) / alpha)), sigma = se sqrt(n).
    Covers the truth at every n at once with probability >= 1 - alpha (asymptotically), so a team
    may look every day and stop whenever it excludes 0. Wider than the fixed-horizon interval at
    every n; narrowest relative to it near `n_star`."""
    if n < 1 or se < 0:
        raise ValueError(f"cs_halfwidth needs n >= 1 and se >= 0, got n={n}, se={se}")
    rho2 = cs_rho(n_star, alpha) ** 2
    sigma = se * math.sqrt(n)
    return sigma * math.sqrt(2.0 * (n * rho2 + 1.0) / (n * n * rho2) * math.log(math.sqrt(n * rho2 + 1.0) / alpha))


# --------------------------------------------------------------------------- CUPED


@dataclass(frozen=True)
class Adjusted:
    """One arm's estimate after CUPED: the value, its variance, and the variance before."""

    value: float
    var: float
    raw_var: float


def cuped(arms: dict[str, tuple[float, np.ndarray, np.ndarray]]) -> tuple[dict[str, Adjusted], np.ndarray]:
    """CUPED (Deng, Xu, Kohavi & Walker, WSDM 2013) by regression on pre-period covariates, pooled over arms.

    `arms`: name -> (estimate, phi, X): the arm's estimate, its per-user influence values `phi` (mean 0;
    var(phi) / n is the estimate's variance: y - mean for a mean, (num - r den) / mean(den) for a
    delta-method ratio) and the users' covariates `X` (n x k, measured before exposure). theta solves
    the pooled within-arm least squares of phi on X; each arm's estimate moves by
    -(mean X_arm - mean X_all) . theta and its variance becomes var(phi - X_centred theta) / n. Since X
    comes before assignment, the adjustment has mean 0 and the estimate stays unbiased; the variance
    falls by the share of phi that X explains. Columns constant over all users are dropped.
    Returns the adjusted arms and theta (over the kept columns)."""
    xs = {a: np.asarray(x, dtype=float).reshape(len(phi), -1) for a, (_, phi, x) in arms.items()}
    all_x = np.vstack(list(xs.values()))
    keep = all_x.std(axis=0) > 0
    centred = {a: xs[a][:, keep] - xs[a][:, keep].mean(axis=0) for a in arms}
    xtx = sum(c.T @ c for c in centred.values())
    xty = sum(centred[a].T @ np.asarray(phi, dtype=float) for a, (_, phi, _) in arms.items())
    theta = np.linalg.lstsq(xtx, xty, rcond=None)[0] if keep.any() else np.zeros(0)
    grand = all_x[:, keep].mean(axis=0)
    out = {}
    for a, (value, phi, _) in arms.items():
        phi = np.asarray(phi, dtype=float)
        n = phi.size
        resid = phi - centred[a] @ theta
        shift = (xs[a][:, keep].mean(axis=0) - grand) @ theta
        out[a] = Adjusted(float(value - shift), float(resid.var(ddof=1) / n), float(phi.var(ddof=1) / n))
    return out, theta


def compare_adjusted(t: Estimate, c: Estimate, alpha: float = ALPHA) -> Comparison:
    """z-test of two CUPED-adjusted estimates (their variances already adjusted)."""
    se = math.sqrt(t.var + c.var)
    z = (t.value - c.value) / se if se > 0 else 0.0
    p = float(2 * stats.norm.sf(abs(z)))
    return _compare("CUPED z-test", t, c, se, z, p, _z(alpha), alpha)


def normal_estimate(kind: str, value: float, var: float, n: int, alpha: float = ALPHA) -> Estimate:
    half = _z(alpha) * math.sqrt(max(var, 0.0))
    return Estimate(kind, value, var, (value - half, value + half), n)


# --------------------------------------------------------------------------- interleaving


@dataclass(frozen=True)
class Preference:
    """Per-user preference between two interleaved rankers (Chapelle, Joachims, Radlinski & Yue, "Large-scale
    validation and analysis of interleaved search evaluation", TOIS 2012): a user *wins* for A when more
    of their clicks went to A's items, *loses* when more went to B's, ties otherwise (no click included)."""

    users: int
    wins: int
    losses: int
    ties: int
    delta: float  # mean over users of sign(A clicks - B clicks): > 0 favours A
    ci: tuple[float, float]
    p_value: float  # two-sided sign test of wins against losses
    significant: bool


def preference(a_clicks: np.ndarray, b_clicks: np.ndarray, alpha: float = ALPHA) -> Preference:
    """`a_clicks`, `b_clicks`: per user, the clicks credited to each team over their interleaved lists."""
    s = np.sign(np.asarray(a_clicks, dtype=float) - np.asarray(b_clicks, dtype=float))
    n = s.size
    if n < 2:
        raise ValueError(f"a preference needs at least 2 users (got {n})")
    wins, losses = int((s > 0).sum()), int((s < 0).sum())
    delta = float(s.mean())
    half = _z(alpha) * float(s.std(ddof=1)) / math.sqrt(n)
    decided = wins + losses
    p = float(stats.binomtest(wins, decided, 0.5).pvalue) if decided else 1.0
    return Preference(n, wins, losses, n - decided, delta, (delta - half, delta + half), p, bool(p < alpha))
