"""The serve bench's report: hardware, load average, targets, and the latency plot."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
from machine import machine  # bench/ is sys.path[0]


def hardware() -> dict:
    import grpc
    import lightgbm

    return {
        **machine(),
        "grpcio": grpc.__version__, "lightgbm": lightgbm.__version__, "numpy": np.__version__,
        "note": "client, server and Triton share these CPUs (and whatever else runs on the machine)",
    }


class LoadAvg:
    """os.getloadavg() sampled in the background through the run."""

    def __init__(self, every_s: float = 2.0):
        self.samples: list[tuple[float, float, float]] = []
        self.start = os.getloadavg()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, args=(every_s,), daemon=True)
        self._t.start()

    def _run(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.samples.append(os.getloadavg())

    def report(self) -> dict:
        self._stop.set()
        one = [s[0] for s in self.samples] or [self.start[0]]
        return {"start": [round(x, 2) for x in self.start], "end": [round(x, 2) for x in os.getloadavg()],
                "during_1m": {"min": round(min(one), 2), "mean": round(float(np.mean(one)), 2), "max": round(max(one), 2)}}


TARGETS = {  # (candidates, offered rps or "saturation") -> what the row should reach on 2 cores
    (100, 200.0): {"p99_ms_max": 5.0},
    (300, 200.0): {"p99_ms_max": 12.0},
    (1000, 200.0): {"p99_ms_max": 25.0},
    (100, "saturation"): {"achieved_rps_min": 400.0, "p99_ms_max": 20.0},
}


def check_targets(rows: list[dict]) -> list[dict]:
    """Each target against its rows (at saturation: met by any concurrency that reaches it)."""
    out = []
    for (n, offered), t in TARGETS.items():
        mine = [r for r in rows if r["candidates"] == n and r["offered_rps"] == offered]
        if not mine:
            continue

        def meets(row: dict) -> bool:
            return row["errors"] == 0 and all(
                row["p99_ms"] is not None and row["p99_ms"] <= v if k == "p99_ms_max" else row["achieved_rps"] >= v
                for k, v in t.items()
            )

        hit = next((r for r in mine if meets(r)), None)
        out.append({"candidates": n, "offered_rps": offered, **t, "met": hit is not None,
                    "got": [{k: r[k] for k in ("concurrency", "achieved_rps", "p99_ms")} for r in mine]})
    return out


def check_mixed_targets(mixed_rows: list[dict]) -> list[dict]:
    """Issue 28's targets on each mixed row that has them (not the heavy mixes): no encoder call
    issued by Rank (every bench candidate is a catalog item), at most 0.5% of Ranks degraded, and
    Rank p99 at most 2x the warm phase's p99 at the same candidate count, same run."""
    out = []
    for r in mixed_rows:
        if r.get("heavy"):
            continue
        checks = {
            "rank_encoder_calls_0": r["rank_encoder_calls"] == 0,
            "degraded_at_most_0.5%": r["degraded_share"] is not None and r["degraded_share"] <= 0.005,
            "p99_at_most_2x_warm": r["p99_over_warm_p99"] is not None and r["p99_over_warm_p99"] <= 2.0,
        }
        out.append({"candidates": r["candidates"], "events_per_s": r["events_per_s"], **checks, "met": all(checks.values()),
                    "got": {k: r[k] for k in ("rank_encoder_calls", "degraded_share", "p99_ms", "warm_p99_ms")}})
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    open_rows = sorted((r for r in rows if r["offered_rps"] != "saturation"), key=lambda r: r["candidates"])
    sat_rows = sorted((r for r in rows if r["offered_rps"] == "saturation"), key=lambda r: r["candidates"])
    xs = [r["candidates"] for r in open_rows]
    if open_rows:
        rate = open_rows[0]["offered_rps"]
        for q, style in (("p50", "-o"), ("p95", "--o"), ("p99", ":o")):
            ax.plot(xs, [r[f"{q}_ms"] for r in open_rows], style, label=f"{q}, {rate:g} req/s offered")
        ax.plot(xs, [r["inprocess_p50_ms"] for r in open_rows], "-s", color="grey", label="in-process p50 (no gRPC)")
    for c in sorted({r["concurrency"] for r in sat_rows}):
        mine = [r for r in sat_rows if r["concurrency"] == c]
        ax.plot([r["candidates"] for r in mine], [r["p50_ms"] for r in mine], "-^",
                label=f"p50 at saturation, {c} in flight (" + ", ".join(f"{r['achieved_rps']:.0f}" for r in mine) + " req/s)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(xs or [100, 300, 1000])
    ax.set_xticklabels([str(x) for x in (xs or [100, 300, 1000])])
    ax.set_xlabel("candidates per request")
    ax.set_ylabel("latency (ms)")
    ax.set_title("Rank latency vs candidates")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def generator_verdict(rows: list[dict], processes: int) -> str:
    """Whether the load generator, not the server, could have limited a row."""
    busy = [r for r in rows if r["client_cpu_cores"] > 0.5 * processes]
    late = [r for r in rows if r["send_lag_p99_ms"] is not None and r["p50_ms"] and r["send_lag_p99_ms"] > r["p50_ms"]]
    stalled = [r for r in rows if r.get("p99_ms") and r.get("generator_loop_lag_max_ms", 0) > r["p99_ms"] / 2]
    if busy or late or stalled:
        return (f"the generator may limit {len(busy) + len(late) + len(stalled)} row(s) (over half a core per process, "
                "send lag above the median latency, or its own event loop stalled for over half the p99): rerun "
                "with more --processes")
    return ("not the bottleneck: under half a core per generator process, send lag below the median latency and "
            "its event loop never stalled for half the p99 (generator_loop_lag_max_ms); it still takes that CPU "
            "from the server on a small machine (client_cpu_cores)")


def plot_timeline(timelines: list[tuple[str, dict]], warmup_s: float, path: Path) -> None:
    """Every request's latency against the time it was sent, one panel per phase (the measured
    window; errors in red): a stall shows as a column of slow requests at one moment."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if not timelines:
        return
    cols = 3
    rows = (len(timelines) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 2.6 * rows), squeeze=False)
    for ax, (name, raw) in zip(axes.flat, timelines):
        t_measure = raw["t0"] + warmup_s
        samples = np.array([s[:2] + (s[3],) for part in raw["parts"] for s in part["samples"] if s[0] >= t_measure])
        if samples.size:
            t, lat, err = samples[:, 0] - t_measure, (samples[:, 1] - samples[:, 0]) * 1e3, samples[:, 2] != 0
            ax.scatter(t[~err], lat[~err], s=2, alpha=0.4)
            if err.any():
                ax.scatter(t[err], lat[err], s=4, color="red", label="error")
            ax.set_yscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("s into the phase", fontsize=8)
        ax.set_ylabel("latency ms", fontsize=8)
    for ax in list(axes.flat)[len(timelines):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
