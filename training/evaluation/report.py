"""Reports of `training.evaluation.protocol`: JSON, a Markdown table with published numbers, a PNG chart.

One report per (dataset, protocol):
    {"dataset", "protocol", "users", "models": {NAME: {"hr@10", "hr@10_ci", "ndcg@10", ...}},
     "comparisons": [{"a", "b", "metric", "relative", "relative_ci", ...}], "seed", "tie_rule",
     "user_towers": {NAME: description}, "seconds", "notes"}
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from training.evaluation.protocol import (
    FULL,
    METRICS,
    SAMPLED,
    TIE_RULE,
    EvalRun,
    paired_difference,
    summarize,
)
from training.figures import pyplot, save_figure, write_report_files

log = logging.getLogger(__name__)

METRIC_LABELS = {"hr@10": "HR@10", "ndcg@10": "NDCG@10", "ndcg@5": "NDCG@5", "mrr": "MRR"}

_TIGER = "Rajput et al., Recommender Systems with Generative Retrieval (TIGER), NeurIPS 2023, Table 1 (via shared/data/README.md)"
_SASREC = "Kang & McAuley, Self-Attentive Sequential Recommendation (SASRec), ICDM 2018 (via shared/data/README.md)"
_SASREC_DIFF = (
    "SASRec: 100 negatives drawn with replacement from items outside the user's training part (reference code), "
    "ties broken arbitrarily, 10,000 random users when there are more; here: 100 distinct negatives outside the "
    "whole sequence, pessimistic ties."
)


def _tiger(rows: dict[str, tuple[float, float, float, float]]) -> dict[str, dict[str, float]]:
    """(Recall@5, NDCG@5, Recall@10, NDCG@10) -> our keys; Recall = HR for one target."""
    return {m: {"hr@5": r5, "ndcg@5": n5, "hr@10": r10, "ndcg@10": n10} for m, (r5, n5, r10, n10) in rows.items()}


PUBLISHED: dict[tuple[str, str], dict[str, Any]] = {
    ("amazon-beauty-2014", SAMPLED): {
        "source": _SASREC,
        "rows": {"SASRec": {"hr@10": 0.4854, "ndcg@10": 0.3219}},
        "differences": "SASRec built its Beauty set from the full review files with its own filtering, so users "
                       "and items differ from this 5-core copy; a rough sanity range only. " + _SASREC_DIFF,
    },
    ("movielens-1m", SAMPLED): {
        "source": _SASREC,
        "rows": {"SASRec": {"hr@10": 0.8245, "ndcg@10": 0.5905}},
        "differences": "SASRec's ML-1M filtering matches this set closely (6,040 users, 3,416 items). " + _SASREC_DIFF,
    },
    ("amazon-beauty-2014", FULL): {
        "source": _TIGER,
        "rows": _tiger({
            "P5": (0.0163, 0.0107, 0.0254, 0.0136), "Caser": (0.0205, 0.0131, 0.0347, 0.0176),
            "HGN": (0.0325, 0.0206, 0.0512, 0.0266), "GRU4Rec": (0.0164, 0.0099, 0.0283, 0.0137),
            "BERT4Rec": (0.0203, 0.0124, 0.0347, 0.0170), "FDSA": (0.0267, 0.0163, 0.0407, 0.0208),
            "SASRec": (0.0387, 0.0249, 0.0605, 0.0318), "S3-Rec": (0.0387, 0.0244, 0.0647, 0.0327),
            "TIGER": (0.0454, 0.0321, 0.0648, 0.0384),
        }),
        "differences": "TIGER reports Recall@K, which equals HR@K with one target. Their Beauty 5-core has 22,363 "
                       "users / 12,101 items; this copy 22,332 / 12,086 (items without a title removed). They "
                       "evaluate every user; whether history items are masked is not stated in the table.",
    },
    ("amazon-toys-2014", FULL): {
        "source": _TIGER,
        "rows": _tiger({
            "P5": (0.0070, 0.0050, 0.0121, 0.0066), "Caser": (0.0166, 0.0107, 0.0270, 0.0141),
            "HGN": (0.0321, 0.0221, 0.0497, 0.0277), "GRU4Rec": (0.0097, 0.0059, 0.0176, 0.0084),
            "BERT4Rec": (0.0116, 0.0071, 0.0203, 0.0099), "FDSA": (0.0228, 0.0140, 0.0381, 0.0189),
            "SASRec": (0.0463, 0.0306, 0.0675, 0.0374), "S3-Rec": (0.0443, 0.0294, 0.0700, 0.0376),
            "TIGER": (0.0521, 0.0371, 0.0712, 0.0432),
        }),
        "differences": "TIGER reports Recall@K, which equals HR@K with one target. Their Toys 5-core has 19,412 "
                       "users / 11,924 items / 167,597 interactions; this copy 19,124 / 11,758 / 165,247 (items "
                       "without a title removed). They evaluate every user; whether history items are masked is "
                       "not stated in the table.",
    },
}
PLOT_REFERENCES = ("SASRec", "TIGER")  # published rows drawn as lines on the chart


def protocol_notes(protocol: str, n_users: int, n_total: int, seed: int, n_negatives: int) -> list[str]:
    sample = (f"a seeded uniform sample of {n_users} of the {n_total} users with a test target (seed {seed})"
              if n_users < n_total else f"all {n_total} users with a test target")
    notes = [
        "leave-one-out per user over engaged items: last = test target, second-to-last = validation, rest = "
        "history; same-timestamp ties ordered by seq_pos (then file order); only the test target is evaluated, "
        "models see the history including the validation item",
        f"users: {sample}",
    ]
    if protocol == SAMPLED:
        notes.append(f"{SAMPLED}: the target against {n_negatives} negatives drawn uniformly without replacement "
                     "(seeded per user) from items the user never interacted with (whole sequence incl. target "
                     "excluded), as in SASRec")
    else:
        notes.append("full: the target against all catalog items; the user's history items are excluded "
                     "(masked), the usual practice")
    notes.append(f"ties: {TIE_RULE}")
    notes.append("95% CIs: percentile bootstrap over users, 1000 resamples unless stated, fixed seed")
    return notes


def build_report(dataset: str, protocol: str, run: EvalRun, n_total_users: int, seed: int,
                 user_towers: dict[str, str], seconds: float, n_negatives: int = 100, n_boot: int = 1000,
                 extra_notes: list[str] | None = None, compare: list[tuple[str, str]] = ()) -> dict[str, Any]:
    """The JSON report of one protocol of an `EvalRun`; `compare` (A, B) pairs get a paired
    bootstrap of A's NDCG@10 against B's."""
    if protocol not in run.ranks:
        raise ValueError(f"protocol {protocol!r} was not evaluated (have {', '.join(run.ranks)})")
    ranks = run.ranks[protocol]
    unknown = sorted({n for pair in compare for n in pair if n not in ranks})
    if unknown:
        raise ValueError(f"--compare names model(s) not in the run: {', '.join(unknown)} (have {', '.join(ranks)})")
    models = {name: summarize(r, n_boot=n_boot, seed=seed) for name, r in ranks.items()}
    comparisons = [{"a": a, "b": b, **paired_difference(ranks[a], ranks[b], n_boot, seed)} for a, b in compare]
    notes = protocol_notes(protocol, int(run.users.size), n_total_users, seed, n_negatives)
    if n_boot != 1000:
        notes.append(f"bootstrap resamples: {n_boot}")
    if protocol == SAMPLED and run.short_negatives:
        notes.append(f"{run.short_negatives} users had fewer than {n_negatives} eligible negatives and were ranked "
                     "against all of them")
    notes += [f"model {d}" for d in run.descriptions.values()]
    notes.append("scoring seconds (both protocols share one pass): "
                 + ", ".join(f"{k} {v:.1f}" for k, v in run.seconds.items()))
    notes += list(extra_notes or [])
    return {"dataset": dataset, "protocol": protocol, "users": int(run.users.size), "models": models,
            "comparisons": comparisons, "seed": seed, "tie_rule": TIE_RULE, "user_towers": user_towers,
            "seconds": round(seconds, 1), "notes": notes}


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.4f}"


def markdown(report: dict[str, Any]) -> str:
    """Our models with CIs, then the published numbers for this dataset and protocol, then notes."""
    lines = [f"### {report['dataset']} — {report['protocol']} ({report['users']} users, seed {report.get('seed')})",
             "", "| model | " + " | ".join(METRIC_LABELS[m] for m in METRICS) + " |",
             "|---|" + "---:|" * len(METRICS)]
    for name, m in report["models"].items():
        cells = [f"{m[k]:.4f} [{m[k + '_ci'][0]:.4f}, {m[k + '_ci'][1]:.4f}]" for k in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if report.get("comparisons"):
        lines += ["", "| paired comparison (same users) | A | B | (A - B) / B [95% paired bootstrap] |",
                  "|---|---:|---:|---:|"]
        for c in report["comparisons"]:
            lo, hi = c["relative_ci"]
            lines.append(f"| {c['a']} vs {c['b']}, {METRIC_LABELS[c['metric']]} | {c['mean_a']:.4f} | {c['mean_b']:.4f} "
                         f"| {c['relative']:+.1%} [{lo:+.1%}, {hi:+.1%}] |")
    pub = PUBLISHED.get((report["dataset"], report["protocol"]))
    lines.append("")
    if pub:
        lines += [f"Published ({pub['source']}); not the same evaluation, see below:", "",
                  "| model | HR@5 | HR@10 | NDCG@10 | NDCG@5 | MRR |", "|---|---:|---:|---:|---:|---:|"]
        for name, r in pub["rows"].items():
            lines.append(f"| {name} (published) | {_fmt(r.get('hr@5'))} | {_fmt(r.get('hr@10'))} | "
                         f"{_fmt(r.get('ndcg@10'))} | {_fmt(r.get('ndcg@5'))} | {_fmt(r.get('mrr'))} |")
        lines += ["", f"Protocol differences: {pub['differences']}", ""]
    else:
        lines += [f"No published numbers for {report['dataset']} under {report['protocol']} in shared/data/README.md.", ""]
    lines.append("Notes:")
    lines += [f"- {n}" for n in report.get("notes", [])]
    if "seconds" in report:
        lines.append(f"- wall time of the whole evaluation run: {report['seconds']:.1f} s")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: str | Path) -> Path:
    """Bar chart of NDCG@10 and HR@10 per model with CI error bars; published SASRec/TIGER as lines."""
    plt = pyplot()
    import numpy as np

    names = list(report["models"])
    pub = PUBLISHED.get((report["dataset"], report["protocol"]), {"rows": {}})
    fig, axes = plt.subplots(1, 2, figsize=(max(6.0, 2.0 + 1.6 * len(names)), 4.0))
    for ax, metric in zip(axes, ("ndcg@10", "hr@10")):
        vals = np.array([report["models"][n][metric] for n in names])
        ci = np.array([report["models"][n][f"{metric}_ci"] for n in names]).reshape(-1, 2)
        err = np.clip(np.stack([vals - ci[:, 0], ci[:, 1] - vals]), 0, None)
        ax.bar(range(len(names)), vals, yerr=err, capsize=4, color="tab:blue", alpha=0.8)
        for k, ref in enumerate(r for r in PLOT_REFERENCES if r in pub["rows"]):
            ax.axhline(pub["rows"][ref][metric], ls="--", lw=1, color=("tab:red", "tab:green")[k % 2],
                       label=f"{ref} (published)")
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
        ax.set_title(METRIC_LABELS[metric])
        ax.set_ylim(bottom=0)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"{report['dataset']} — {report['protocol']} ({report['users']} users, 95% bootstrap CI)")
    return save_figure(fig, path)


def json_path_for(json_out: str | Path, protocol: str, several: bool) -> Path:
    """`--json OUT` as given for one protocol; with several, the protocol goes before the suffix."""
    p = Path(json_out)
    if not several:
        return p
    suffix = p.suffix or ".json"
    return p.with_name(f"{p.name[: -len(p.suffix)] if p.suffix else p.name}.{protocol}{suffix}")


def write_report(report: dict[str, Any], out_dir: str | Path, json_out: str | Path | None = None,
                 several_protocols: bool = False) -> dict[str, Path]:
    """`OUT_DIR/<dataset>.<protocol>.{json,md,png}` (and `--json OUT`); returns the paths."""
    extra = None if json_out is None else json_path_for(json_out, report["protocol"], several_protocols)
    return write_report_files(report, out_dir, f"{report['dataset']}.{report['protocol']}", markdown, plot, extra)
