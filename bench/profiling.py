"""cProfile readings shared by bench/engine_profile.py and bench/fold_profile.py: shares of the
profiled time, not times (the profiler slows everything alike on a shared machine)."""

from __future__ import annotations

import pstats
from pathlib import Path


def shares(stats: pstats.Stats, total: float, watch: list[tuple[str, str, str]]) -> dict[str, dict]:
    """For each (label, function name as cProfile names it, file suffix) in `watch`: the share of
    `total` spent inside the function (cumulative) and in its own code."""
    out = {}
    for (path, _, name), (_, _, tt, ct, _) in stats.stats.items():  # type: ignore[attr-defined]
        for label, fn, suffix in watch:
            if name == fn and path.endswith(suffix):
                out[label] = {"cumulative": round(ct / total, 3), "own": round(tt / total, 3)}
    return out


def top_own(stats: pstats.Stats, total: float, n: int) -> list[dict]:
    """The `n` functions with the most time of their own, as shares of `total`."""
    own = sorted(((tt, f"{Path(path).name}:{line} {name}") for (path, line, name), (_, _, tt, _, _)
                  in stats.stats.items()), reverse=True)[:n]  # type: ignore[attr-defined]
    return [{"share": round(tt / total, 3), "function": f} for tt, f in own]
