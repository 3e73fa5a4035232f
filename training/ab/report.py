"""The A/B report: a verdict first, then metrics per variant with 95% intervals, tests against control
(adjusted for the family of tests), SRM check.

    {"experiment", "window", "control", "alpha", "primary_metric", "time_range", "users", "exposures",
     "variants": {NAME: {"users", "exposures", "bundle_versions", "metrics": {METRIC: {"value", "ci"}}}},
     "comparisons": {NAME: {METRIC: {"test", "diff", "diff_ci", "lift", "lift_ci", "statistic", "p_value",
                                     "p_adjusted", "guardrail", "mde", "significant"}}},
     "correction": {"method", "family_size", "min_users_with_event"},
     "verdict": {"status": "ready" | "withheld", "reasons", "basis",
                 "variants": {NAME: {"primary": "better" | "worse" | "no detectable difference", "moved",
                                     "guardrails_moved"}}},
     "srm": {"observed", "expected", "shares", "source", "chi2", "df", "p_value", "flagged"},
     "metric_definitions", "warnings", "notes"}

Written as OUT_DIR/ab-<experiment>.{json,md,png} by `training.ab.render`. docs/ab_testing.md explains the choices.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import polars as pl

from training.ab import stats as ab_stats
from training.ab.prepare import Prepared, format_window


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    kind: str  # ab_stats estimate kind
    column: str  # per-user column (numerator of a ratio, the successes of a proportion, the value of a mean)
    definition: str
    guardrail: bool = False  # watched, not a goal: outside the corrected family, flagged on its own


METRICS: tuple[Metric, ...] = (
    Metric("ctr", "CTR", "ratio", "click_exposures",
           "exposures with >= 1 attributed click / exposures; per-user sums, delta-method variance, z-test"),
    Metric("add_to_cart_rate", "add-to-cart rate", "ratio", "cart_exposures",
           "exposures with >= 1 attributed add_to_cart / exposures; as CTR"),
    Metric("conversion_rate", "conversion rate", "ratio", "purchase_exposures",
           "exposures with >= 1 attributed purchase / exposures; as CTR"),
    Metric("users_with_click", "users with a click", "proportion", "click_exposures",
           "share of exposed users with >= 1 attributed click; Wilson interval, pooled two-proportion z-test"),
    Metric("users_with_purchase", "users with a purchase", "proportion", "purchase_exposures",
           "share of exposed users with >= 1 attributed purchase; as users with a click"),
    Metric("revenue_per_user", "revenue per user", "mean", "revenue",
           "sum of item prices of attributed purchases per exposed user (0 when none); t interval, Welch t-test"),
    Metric("exposures_per_user", "exposures per user", "mean", "exposures",
           "Rank answers per exposed user; a guardrail: the rates above divide by exposures, so a variant that "
           "changes how often users come back changes their denominator; t interval, Welch t-test", guardrail=True),
)
PRIMARY_METRIC = "ctr"
SMALL_VARIANT = 100  # users; below it the normal approximations are rough
MIN_USERS_WITH_EVENT = 100  # per arm: no verdict before each arm has this many users with an attributed event
MAX_LOST_SHARE = 0.01  # exposures a writer dropped, per arm: above it no verdict


def _estimate(metric: Metric, users: pl.DataFrame, alpha: float) -> ab_stats.Estimate:
    col = users[metric.column].to_numpy().astype(float)
    if metric.kind == "ratio":
        return ab_stats.ratio(col, users["exposures"].to_numpy(), alpha)
    if metric.kind == "proportion":
        return ab_stats.proportion(int((col > 0).sum()), users.height, alpha)
    return ab_stats.mean(col, alpha)


def resolve_control(variants: list[str], control: str | None) -> str:
    """`control` if given (must have users), else a variant named "control", else the first variant."""
    if control is not None:
        if control not in variants:
            raise ValueError(f"--control {control!r} has no users; variants: {', '.join(variants)}")
        return control
    return "control" if "control" in variants else variants[0]


def build_report(prep: Prepared, window: timedelta, control: str | None = None,
                 shares: dict[str, float] | None = None, shares_source: str | None = None,
                 alpha: float = ab_stats.ALPHA, correction: str = "holm",
                 min_users: int = MIN_USERS_WITH_EVENT, sequential: int | None = None,
                 lost: dict[str, int] | None = None, max_lost_share: float = MAX_LOST_SHARE,
                 cuped_days: float | None = None) -> dict[str, Any]:
    """The report (module docstring). `correction` adjusts the p-values of the family (every
    non-guardrail metric x every variant against control): "holm" (default), "bh" or "none";
    `min_users`: users with an attributed event each arm needs before a verdict is given.
    `sequential` (the users expected at the end): calls come from always-valid confidence sequences
    instead (`ab_stats.cs_halfwidth`, Bonferroni over the family), so the report may be read daily.
    `lost`: exposures per variant that the servers' writers dropped or failed to write
    (`featurizer.contracts.exposures.read_losses`); above `max_lost_share` of a variant's the verdict
    is withheld: the lost Ranks are not a random sample of that arm's. `cuped_days`: the lookback the
    users' pre-period columns were made with (`prepare(cuped_lookback=...)`); the comparisons are then
    CUPED-adjusted (`_cuped`)."""
    if correction not in ab_stats.CORRECTIONS:
        raise ValueError(f"correction {correction!r}: expected one of {', '.join(ab_stats.CORRECTIONS)}")
    users = prep.users
    observed = dict(users.group_by("variant").len().iter_rows())
    order = [v for v in (shares or {}) if v in observed] + sorted(v for v in observed if v not in (shares or {}))
    if shares is None:
        shares, shares_source = {v: 1.0 for v in order}, "equal shares (no --shares or --experiments given)"
    srm = ab_stats.sample_ratio_mismatch(observed, shares)
    control = resolve_control(order, control)
    order = [control] + [v for v in order if v != control]
    metrics = [m for m in METRICS if m.key != "revenue_per_user" or prep.prices]
    warnings, notes = list(prep.warnings), list(prep.notes)
    if srm.flagged:
        warnings.insert(0, srm_message(srm, shares_source))
    if len(order) < 2:
        warnings.append(f"only one variant ({control}) has users; nothing to compare")
    variants: dict[str, Any] = {}
    estimates: dict[str, dict[str, ab_stats.Estimate]] = {}
    for v in order:
        part = users.filter(pl.col("variant") == v)
        if part.height < SMALL_VARIANT:
            warnings.append(f"variant {v} has {part.height} users; intervals and p-values rely on normal "
                            "approximations that need more")
        if part.height >= 2:
            estimates[v] = {m.key: _estimate(m, part, alpha) for m in metrics}
        variants[v] = {
            "users": part.height, "exposures": int(part["exposures"].sum()),
            "users_with_event": int(((part["click_exposures"] + part["cart_exposures"] + part["purchase_exposures"])
                                     > 0).sum()),
            "lost_exposures": (lost or {}).get(v, 0),
            "bundle_versions": prep.bundle_versions.get(v, []),
            "metrics": {k: {"value": e.value, "ci": list(e.ci)} for k, e in estimates.get(v, {}).items()},
        }
    comparisons = {}
    for v in order[1:]:
        if v in estimates and control in estimates:
            comparisons[v] = {m.key: _comparison_json(ab_stats.compare(estimates[v][m.key], estimates[control][m.key],
                                                                       alpha)) for m in metrics}
    cuped = _cuped(users, order, control, metrics, comparisons, estimates, alpha, notes) if cuped_days else None
    if cuped is not None:
        cuped["lookback_days"] = cuped_days
    family = _correct(comparisons, metrics, correction, alpha)
    if sequential is not None:
        _sequential(comparisons, metrics, variants, control, alpha, family, sequential)
    if not prep.prices:
        notes.append("no item prices (pass --items or a data directory with items), so no revenue metric")
    return {
        "experiment": prep.experiment, "window": format_window(window), "window_seconds": window.total_seconds(),
        "control": control, "alpha": alpha, "primary_metric": PRIMARY_METRIC,
        "correction": {"method": correction, "family_size": family, "min_users_with_event": min_users},
        "cuped": cuped,
        "sequential": None if sequential is None else {
            "n_star": sequential, "alpha_per_test": alpha / max(family, 1),
            "method": "asymptotic confidence sequence (normal mixture), Bonferroni over the family"},
        "interleaving": {v: _preference_json(prep, v, t, alpha) for v, t in prep.interleaving.items()},
        "verdict": _verdict(order, variants, comparisons, metrics, srm.flagged, min_users,
                            "confidence-sequence (Bonferroni)" if sequential else correction, family, max_lost_share),
        "time_range": list(prep.time_range), "users": users.height, "exposures": prep.exposures,
        "variants": variants, "comparisons": comparisons,
        "srm": {**asdict(srm), "source": shares_source, "alpha": ab_stats.SRM_ALPHA},
        "metric_definitions": {m.key: m.definition for m in metrics},
        "warnings": warnings, "notes": notes,
    }


# The pre-period columns (training.ab.prepare.pre_period) each metric is adjusted with, besides `has_pre`.
CUPED_COVARIATES = {
    "ctr": ("pre_clicks", "pre_lists"), "add_to_cart_rate": ("pre_carts", "pre_lists"),
    "conversion_rate": ("pre_purchases", "pre_lists"), "users_with_click": ("pre_clicks",),
    "users_with_purchase": ("pre_purchases",), "revenue_per_user": ("pre_revenue",),
    "exposures_per_user": ("pre_lists",),
}


def _influence(metric: Metric, part: pl.DataFrame, est: ab_stats.Estimate) -> np.ndarray:
    """Per-user influence values of an arm's estimate: mean 0, var / n = the estimate's variance."""
    col = part[metric.column].to_numpy().astype(float)
    if metric.kind == "ratio":
        den = part["exposures"].to_numpy().astype(float)
        return (col - est.value * den) / den.mean()
    if metric.kind == "proportion":
        return (col > 0).astype(float) - est.value
    return col - col.mean()


def _cuped(users: pl.DataFrame, order: list[str], control: str, metrics: list[Metric],
           comparisons: dict[str, dict[str, Any]], estimates: dict[str, dict[str, ab_stats.Estimate]], alpha: float,
           notes: list[str]) -> dict[str, Any] | None:
    """Replace each comparison by its CUPED-adjusted one (`ab_stats.cuped`, the covariates of
    CUPED_COVARIATES plus has_pre: users without a pre-period get zeros and the indicator, so they are
    neither dropped nor biased). Returns what the report says about it."""
    from training.ab.prepare import PRE_COLUMNS

    if not set(PRE_COLUMNS) <= set(users.columns):
        raise ValueError("CUPED needs the users' pre-period columns: prepare(..., cuped_lookback=...)")
    arms = [v for v in order if v in estimates]
    parts = {v: users.filter(pl.col("variant") == v) for v in arms}
    with_pre = {v: int(parts[v]["has_pre"].sum()) for v in arms}
    if not sum(with_pre.values()):
        notes.append("CUPED: no user has events before their first exposure in the lookback; not adjusted")
        return {"users_with_pre_period": with_pre, "variance_reduction": {}}
    reduction: dict[str, dict[str, float]] = {}
    for m in metrics:
        cols = [*CUPED_COVARIATES[m.key], "has_pre"]
        adj, _ = ab_stats.cuped({v: (estimates[v][m.key].value, _influence(m, parts[v], estimates[v][m.key]),
                                     parts[v].select(cols).to_numpy()) for v in arms})
        if control not in adj:
            continue
        c = ab_stats.normal_estimate(m.kind, adj[control].value, adj[control].var, estimates[control][m.key].n, alpha)
        for v in arms:
            if v == control or v not in comparisons:
                continue
            t = ab_stats.normal_estimate(m.kind, adj[v].value, adj[v].var, estimates[v][m.key].n, alpha)
            comparisons[v][m.key] = _comparison_json(ab_stats.compare_adjusted(t, c, alpha))
            share = 1.0 - (adj[v].var + adj[control].var) / max(adj[v].raw_var + adj[control].raw_var, 1e-300)
            comparisons[v][m.key]["variance_reduction"] = share
            reduction.setdefault(m.key, {})[v] = share
    return {"users_with_pre_period": with_pre, "variance_reduction": reduction}


def _correct(comparisons: dict[str, dict[str, Any]], metrics: list[Metric], method: str, alpha: float) -> int:
    """Adjust the p-values of the family in place (`p_adjusted`, `significant` from it); guardrails keep
    their own p-value and are marked `guardrail`. Returns the family's size."""
    guard = {m.key for m in metrics if m.guardrail}
    family = [(v, k) for v, per in comparisons.items() for k in per if k not in guard]
    adjusted = ab_stats.adjust([comparisons[v][k]["p_value"] for v, k in family], method)
    for (v, k), p in zip(family, adjusted):
        comparisons[v][k].update(p_adjusted=p, significant=bool(p < alpha), guardrail=False)
    for v, per in comparisons.items():
        for k in guard & set(per):
            per[k].update(p_adjusted=None, guardrail=True)  # `significant`: its own p < alpha
    return len(family)


def _preference_json(prep: Prepared, variant: str, credit: pl.DataFrame, alpha: float) -> dict[str, Any]:
    """An interleaved arm's per-user preference between its two bundles (`ab_stats.preference`)."""
    versions = prep.bundle_versions.get(variant, [])
    a_b = versions[0].split("+", 1) if len(versions) == 1 and "+" in versions[0] else ["A", "B"]
    out: dict[str, Any] = {"team_a": a_b[0], "team_b": a_b[1], "users": credit.height}
    if credit.height < 2:
        return {**out, "note": "fewer than 2 users in the arm: no test"}
    pref = ab_stats.preference(credit["a_clicks"].to_numpy(), credit["b_clicks"].to_numpy(), alpha)
    favours = ("A" if pref.delta > 0 else "B") if pref.significant else None
    return {**out, "wins_a": pref.wins, "wins_b": pref.losses, "ties": pref.ties, "delta": pref.delta,
            "ci": list(pref.ci), "p_value": pref.p_value, "significant": pref.significant, "favours": favours,
            "test": "sign test of users preferring A against users preferring B (ties: no click or equal clicks)"}


def _sequential(comparisons: dict[str, dict[str, Any]], metrics: list[Metric], variants: dict[str, Any], control: str,
                alpha: float, family: int, n_star: int) -> None:
    """Add each comparison's confidence sequence (`cs`) and make `significant` mean "it excludes 0".
    Goal metrics share alpha / family (Bonferroni: valid under any dependence, at every look);
    a guardrail gets alpha alone."""
    guard = {m.key for m in metrics if m.guardrail}
    for v, per in comparisons.items():
        n = variants[v]["users"] + variants[control]["users"]
        for k, c in per.items():
            a = alpha if k in guard else alpha / max(family, 1)
            h = ab_stats.cs_halfwidth(c["se"], n, a, n_star)
            c["cs"] = [c["diff"] - h, c["diff"] + h]
            c["significant"] = bool(c["cs"][0] > 0 or c["cs"][1] < 0)


def _verdict(order: list[str], variants: dict[str, Any], comparisons: dict[str, dict[str, Any]], metrics: list[Metric],
             srm: bool, min_users: int, correction: str, family: int,
             max_lost_share: float = MAX_LOST_SHARE) -> dict[str, Any]:
    """What a product manager reads first: per variant, the primary metric's call, the other metrics
    that moved, the guardrails that moved; or why no call is made yet."""
    short = {v: d["users_with_event"] for v, d in variants.items() if d["users_with_event"] < min_users}
    reasons = []
    for v, d in variants.items():
        share = d["lost_exposures"] / max(d["exposures"] + d["lost_exposures"], 1)
        d["lost_share"] = share
        if share > max_lost_share:
            reasons.append(f"the servers dropped {d['lost_exposures']} of {v}'s exposures ({share:.1%} > "
                           f"{max_lost_share:.0%}) before logging them; the rest are not a random sample of the arm")
    if srm:
        reasons.append("the sample ratio does not match the configured shares (see the warning)")
    if short:
        reasons.append("too few users with an attributed event yet: " + ", ".join(f"{v} {n}" for v, n in short.items())
                       + f" (each arm needs {min_users})")
    if len(order) < 2:
        reasons.append("only one variant has users")
    calls = {}
    labels = {m.key: m.label for m in metrics}
    for v, per in comparisons.items():
        primary = per.get(PRIMARY_METRIC)
        call = "no detectable difference"
        if primary is not None and primary["significant"]:
            call = "better" if primary["diff"] > 0 else "worse"
        calls[v] = {
            "primary": call,
            "moved": [labels[k] + (" up" if c["diff"] > 0 else " down") for k, c in per.items()
                      if c["significant"] and not c["guardrail"] and k != PRIMARY_METRIC],
            "guardrails_moved": [labels[k] + (" up" if c["diff"] > 0 else " down") for k, c in per.items()
                                 if c["guardrail"] and c["significant"]],
        }
    return {"status": "withheld" if reasons else "ready", "reasons": reasons, "variants": calls,
            "basis": f"{labels.get(PRIMARY_METRIC, PRIMARY_METRIC)} against {order[0]}; {correction} correction over {family} tests"}


def _comparison_json(c: ab_stats.Comparison) -> dict[str, Any]:
    d = asdict(c)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def srm_message(srm: ab_stats.SampleRatio, source: str | None) -> str:
    parts = ", ".join(f"{v} {srm.observed[v]} (expected {srm.expected[v]:.0f})" for v in srm.observed)
    return (f"SAMPLE-RATIO MISMATCH: users per variant {parts} do not match the shares of {source} "
            f"(chi-square {srm.chi2:.1f}, df {srm.df}, p = {srm.p_value:.2g} < {ab_stats.SRM_ALPHA}). Assignment, "
            "exposure logging or filtering is broken; the comparisons below are not trustworthy until it is explained.")


# --------------------------------------------------------------------------- replays over time


def as_of(exposures: pl.DataFrame, events: pl.DataFrame, at) -> tuple[pl.DataFrame, pl.DataFrame]:
    """What the logs held at `at` (a datetime, naive = UTC): exposures and events up to it."""
    from datetime import timezone

    at = at if at.tzinfo is not None else at.replace(tzinfo=timezone.utc)
    cut = pl.lit(at).dt.convert_time_zone("UTC") if exposures["ts"].dtype.time_zone else pl.lit(at.replace(tzinfo=None))
    return exposures.filter(pl.col("ts") <= cut), events.filter(pl.col("ts") <= cut)


def timeline(exposures: pl.DataFrame, events: pl.DataFrame, items: pl.DataFrame | None, window: timedelta,
             experiment: str | None, report_kw: dict[str, Any], step: timedelta = timedelta(days=1),
             cuped_lookback: timedelta | None = None) -> list[dict]:
    """The report replayed at the end of each `step` from the first exposure on: per look, the users,
    and each variant's difference on the primary metric with its fixed-horizon interval and, with
    `sequential`, its confidence sequence. What a team that looks daily would have seen."""
    from training.ab.prepare import prepare

    start, end = exposures["ts"].min(), exposures["ts"].max()
    looks, t = [], start + step
    while True:
        t = min(t, end)
        exp_t, ev_t = as_of(exposures, events, t)
        try:
            rep = build_report(prepare(exp_t, ev_t, items, window, experiment, cuped_lookback), window, **report_kw)
        except ValueError:  # too few users yet for an estimate
            rep = None
        if rep is not None:
            looks.append({"as_of": f"{t:%Y-%m-%dT%H:%M:%SZ}", "users": rep["users"],
                          "variants": {v: {k: c[PRIMARY_METRIC][k] for k in ("diff", "diff_ci", "cs", "significant")
                                           if k in c[PRIMARY_METRIC]}
                                       for v, c in rep["comparisons"].items()}})
        if t >= end:
            return looks
        t += step
