"""LightGBM's own predict against the compiled trees (`ranker.compiled_trees`, lleaves) on one bundle.

    .venv/bin/python bench/trees.py [--bundle runs/bench-serve/bundle] [--reps 300]

Both score the same rows (standard normal, 10% missing; seed 0) at 100 and 1000 rows, one thread,
interleaved per repetition; prints one JSON object with the p50 of each, their ratio, the largest
score difference and the compile time. Make the bench bundle first with
`bench/serve.py --prepare-only`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from serve_report import hardware  # bench/ is sys.path[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, default=Path("runs/bench-serve/bundle"))
    p.add_argument("--reps", type=int, default=300)
    p.add_argument("--rows", type=int, nargs="+", default=[100, 1000])
    a = p.parse_args(argv)
    import ranker.compiled_trees as compiled_trees
    from ranker.bundle import load_bundle

    bundle = load_bundle(a.bundle, compile_trees=False)
    model_path = a.bundle / bundle.manifest.get("model_file", "ranker.txt")
    t = time.perf_counter()
    compiled = compiled_trees.compile_trees(model_path, model_path.read_text())
    compile_s = time.perf_counter() - t
    if compiled is None:
        print("the trees could not be compiled here (see the warning above)", file=sys.stderr)
        return 2
    rng = np.random.default_rng(0)
    out: dict = {"bundle": str(a.bundle), "trees": bundle.booster.num_trees(), "features": len(bundle.feature_names),
                 "compile_s": round(compile_s, 2), "reps": a.reps, "rows": {}}
    for n in a.rows:
        X = rng.standard_normal((n, len(bundle.feature_names))).astype(np.float32)
        X[rng.random(X.shape) < 0.1] = np.nan
        lgb_t, comp_t = [], []
        for _ in range(a.reps):
            t = time.perf_counter()
            want = bundle.booster.predict(X, num_threads=1)
            lgb_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            got = compiled.predict(X)
            comp_t.append(time.perf_counter() - t)
        lgb_ms, comp_ms = float(np.median(lgb_t)) * 1e3, float(np.median(comp_t)) * 1e3
        out["rows"][n] = {"lightgbm_p50_ms": round(lgb_ms, 4), "compiled_p50_ms": round(comp_ms, 4),
                          "speedup": round(lgb_ms / comp_ms, 2), "max_abs_diff": float(np.max(np.abs(want - got)))}
    out["hardware"] = hardware()
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
