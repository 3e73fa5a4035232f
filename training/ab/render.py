"""The A/B report as files: Markdown (the verdict first), a chart per metric, and the interval over
time (`semrank ab report --timeline`); the report itself is `training.ab.report.build_report`'s.

    paths = write_report(report, out_dir)   # OUT_DIR/ab-<experiment>.{json,md,png}
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from training.ab.report import METRICS, PRIMARY_METRIC
from training.figures import pyplot, save_figure, write_report_files


# --------------------------------------------------------------------------- Markdown


def _fmt_value(kind: str, x: float) -> str:
    return f"{x:.2f}" if kind == "mean" else f"{x:.4f}"


def _pct(x: float) -> str:
    return f"{x:+.1%}"


def _fmt_p(p: float) -> str:
    return "<1e-6" if p < 1e-6 else f"{p:.3g}"


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# A/B report: {report['experiment']}", ""]
    if report["srm"]["flagged"]:
        lines += [f"> **WARNING — {report['warnings'][0]}**", ""]
    lines += _verdict_lines(report)
    rows = []
    for v, pref in report.get("interleaving", {}).items():
        if "delta" not in pref:
            lines += [f"**Interleaved arm {v}**: {pref['note']}.", ""]
            continue
        who = {"A": pref["team_a"], "B": pref["team_b"]}
        call = (f"users prefer **{who[pref['favours']]}**" if pref["favours"] else "no detectable preference")
        lines += [f"**Interleaved arm {v}** (A = {pref['team_a']}, B = {pref['team_b']}): {call}.", ""]
        rows.append(f"| {v} | {pref['team_a']} | {pref['team_b']} | {pref['users']} | {pref['wins_a']} | {pref['wins_b']} "
                    f"| {pref['ties']} | {pref['delta']:+.3f} [{pref['ci'][0]:+.3f}, {pref['ci'][1]:+.3f}] | "
                    f"{_fmt_p(pref['p_value'])} |")
    if rows:
        lines += ["| interleaved arm | A | B | users | clicked more on A | on B | tied | preference [95% CI] | p (sign test) |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|", *rows, ""]
    if report.get("cuped") and report["cuped"]["variance_reduction"]:
        cu = report["cuped"]
        fell = ", ".join(f"{labels_by_key(k)} {min(v.values()):.0%}" + (f"-{max(v.values()):.0%}" if len(v) > 1 else "")
                         for k, v in cu["variance_reduction"].items())
        pre = ", ".join(f"{v} {n}" for v, n in cu["users_with_pre_period"].items())
        lines += [f"CUPED on each user's {cu['lookback_days']:g} days before their first exposure (users with such "
                  f"history: {pre}): the variance of each difference fell by {fell}.", ""]
    lines += [f"Exposures {report['time_range'][0]} to {report['time_range'][1]}; {report['users']} users, "
              f"{report['exposures']} exposures; attribution window {report['window']}; control "
              f"**{report['control']}**; 95% intervals; users are the unit of analysis.", "",
              "| variant | users | exposures | lost before the log | bundle versions |", "|---|---:|---:|---:|---|"]
    for v, d in report["variants"].items():
        lost = f"{d.get('lost_exposures', 0)} ({d.get('lost_share', 0.0):.2%})"
        lines.append(f"| {v} | {d['users']} | {d['exposures']} | {lost} | "
                     f"{', '.join(d['bundle_versions']) or '(holdout)'} |")
    decides = "always-valid CI of the difference" if report.get("sequential") else "adjusted p"
    lines += ["", f"| metric | variant | value [95% CI] | lift vs control [95% CI] | p | {decides} | MDE (80% power) | test |",
              "|---|---|---:|---:|---:|---:|---:|---|"]
    kinds = {m.key: m for m in METRICS}
    for key in report["metric_definitions"]:
        m = kinds[key]
        for v, d in report["variants"].items():
            est = d["metrics"].get(key)
            if est is None:
                continue
            cell = f"{_fmt_value(m.kind, est['value'])} [{_fmt_value(m.kind, est['ci'][0])}, {_fmt_value(m.kind, est['ci'][1])}]"
            c = report["comparisons"].get(v, {}).get(key)
            if c is None:
                lines.append(f"| {m.label} | {v} | {cell} | (control) | | | | |")
                continue
            lift = "—" if c["lift"] is None else _pct(c["lift"])
            if c["lift_ci"] is not None:
                lift += f" [{_pct(c['lift_ci'][0])}, {_pct(c['lift_ci'][1])}]"
            base = report["variants"][report["control"]]["metrics"][key]["value"]
            mde = f"±{c['mde'] / base:.1%}" if base > 0 else _fmt_value(m.kind, c["mde"])
            p = _fmt_p(c["p_value"])
            adj = "guardrail" if c.get("guardrail") else _fmt_p(c.get("p_adjusted", c["p_value"]))
            if "cs" in c:  # sequential: the always-valid interval of the difference decides
                adj = f"[{_fmt_value(m.kind, c['cs'][0])}, {_fmt_value(m.kind, c['cs'][1])}]"
            if c["significant"]:
                lift, adj = f"**{lift}**", f"**{adj}**" if not c.get("guardrail") else "**guardrail moved**"
            lines.append(f"| {m.label} | {v} | {cell} | {lift} | {p} | {adj} | {mde} | {c['test']} |")
    srm = report["srm"]
    verdict = "**MISMATCH**" if srm["flagged"] else "ok"
    lines += ["", f"**Sample ratio** ({srm['source']}): " + ", ".join(
        f"{v} {srm['observed'][v]} vs {srm['expected'][v]:.0f} expected" for v in srm["observed"])
        + f"; chi-square {srm['chi2']:.2f}, p = {_fmt_p(srm['p_value'])} → {verdict} (flagged below p {srm['alpha']}).",
        "", f"Bold: {'the sequence excludes 0' if report.get('sequential') else 'adjusted p < ' + str(report['alpha'])} "
        f"({_correction_text(report)}); a guardrail is bold when its own test is. MDE: the relative change each test would detect with 80% power at "
        "these sample sizes; a non-significant result says little about smaller effects.", ""]
    if report["warnings"]:
        lines += ["Warnings:"] + [f"- {w}" for w in report["warnings"]] + [""]
    lines += ["Metrics:"] + [f"- `{k}`: {d}" for k, d in report["metric_definitions"].items()]
    lines += ["", "Notes:"] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def labels_by_key(key: str) -> str:
    return next((m.label for m in METRICS if m.key == key), key)


def _correction_text(report: dict[str, Any]) -> str:
    c = report["correction"]
    if report.get("sequential"):
        seq = report["sequential"]
        return (f"always-valid confidence sequences tuned for {seq['n_star']} users, each goal metric at "
                f"alpha / {c['family_size']} (Bonferroni), so the report may be read at any time")
    what = {"holm": "Holm: the chance of any false call in the family stays under alpha",
            "bh": "Benjamini-Hochberg: the expected share of false calls among the calls stays under alpha",
            "none": "no correction: each test alone"}[c["method"]]
    return f"{what}; the family is every non-guardrail metric x every variant, {c['family_size']} tests"


def _verdict_lines(report: dict[str, Any]) -> list[str]:
    v = report["verdict"]
    if v["status"] == "withheld":
        return ["**No verdict yet**: " + "; ".join(v["reasons"]) + ".", ""]
    out = [f"**Verdict** ({v['basis']}):"]
    for name, call in v["variants"].items():
        primary = next((m.label for m in METRICS if m.key == report["primary_metric"]), report["primary_metric"])
        text = f"- **{name}**: {call['primary']} on {primary}"
        if call["moved"]:
            text += "; also " + ", ".join(call["moved"])
        if call["guardrails_moved"]:
            text += "; **guardrail moved**: " + ", ".join(call["guardrails_moved"])
        out.append(text + ".")
    return out + [""]


# --------------------------------------------------------------------------- chart and files


def plot(report: dict[str, Any], path: str | Path) -> Path:
    """One panel per metric: a bar per variant with its 95% interval; the control in grey."""
    plt = pyplot()

    keys = list(report["metric_definitions"])
    names = list(report["variants"])
    labels = {m.key: m.label for m in METRICS}
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols, 3.3 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        have = [n for n in names if key in report["variants"][n]["metrics"]]
        vals = np.array([report["variants"][n]["metrics"][key]["value"] for n in have])
        ci = np.array([report["variants"][n]["metrics"][key]["ci"] for n in have]).reshape(-1, 2)
        err = np.clip(np.stack([vals - ci[:, 0], ci[:, 1] - vals]), 0, None)
        colours = ["tab:gray" if n == report["control"] else
                   ("tab:green" if report["comparisons"].get(n, {}).get(key, {}).get("significant") else "tab:blue")
                   for n in have]
        ax.bar(range(len(have)), vals, yerr=err, capsize=4, color=colours, alpha=0.85)
        ax.set_xticks(range(len(have)), have, rotation=15, ha="right")
        ax.set_title(labels[key], fontsize=10)
        ax.set_ylim(bottom=0)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    title = f"{report['experiment']}: 95% CI per variant (green: p < 0.05 vs {report['control']})"
    if report["srm"]["flagged"]:
        title = "SAMPLE-RATIO MISMATCH — " + title
    fig.suptitle(title, color="red" if report["srm"]["flagged"] else "black", fontsize=11)
    return save_figure(fig, path)


def report_stem(experiment: str) -> str:
    return "ab-" + (re.sub(r"[^A-Za-z0-9._-]+", "_", experiment) or "experiment")


def write_report(report: dict[str, Any], out_dir: str | Path, json_out: str | Path | None = None) -> dict[str, Path]:
    """OUT_DIR/ab-<experiment>.{json,md,png} (and --json OUT); returns the paths."""
    return write_report_files(report, out_dir, report_stem(report["experiment"]), markdown, plot, json_out)



# --------------------------------------------------------------------------- the interval over time


def plot_timeline(looks: list[dict], report: dict[str, Any], path: str | Path) -> Path:
    """The primary metric's difference per look: the fixed-horizon 95% interval (valid for one look only)
    and the always-valid sequence, narrowing as users arrive."""
    plt = pyplot()
    names = sorted({v for look in looks for v in look["variants"]})
    fig, axes = plt.subplots(1, len(names), figsize=(6.0 * len(names), 3.8), squeeze=False)
    for ax, v in zip(axes.flat, names):
        pts = [(i, look["variants"][v]) for i, look in enumerate(looks) if v in look["variants"]]
        x = np.array([i + 1 for i, _ in pts])  # the look: day 1, 2, ... (users keep coming back, so not users)
        diff = np.array([c["diff"] for _, c in pts])
        ci = np.array([c["diff_ci"] for _, c in pts])
        ax.fill_between(x, ci[:, 0], ci[:, 1], alpha=0.35, color="tab:blue", label="fixed-horizon 95% CI (one look)")
        if all("cs" in c for _, c in pts):
            cs = np.array([c["cs"] for _, c in pts])
            ax.plot(x, cs[:, 0], color="tab:red", lw=1.2, label="confidence sequence (any look)")
            ax.plot(x, cs[:, 1], color="tab:red", lw=1.2)
        ax.plot(x, diff, color="black", lw=1, label="difference")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("look (end of day)")
        ax.set_title(f"{v} - {report['control']}: {PRIMARY_METRIC}", fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle(f"{report['experiment']}: the interval as the experiment ran", fontsize=11)
    return save_figure(fig, path)
