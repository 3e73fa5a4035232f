"""What the sequence model costs a Rank (issue 31 item 3): its numpy forward pass (`ranker.sequence.
SequenceState`), on a cache miss (the user's state after a new history) and on a hit (the candidates'
scores from a cached state), at 100 and 1000 candidates, beside the torch model's own forward in the
same run (the baseline: what serving would pay with torch in the process).

    .venv/bin/python bench/sequence_cost.py [--model DIR] [--items 12086] [--reps 300]

Without --model, a model of the default configuration (50 items of history, dim 64, 2 blocks) with
random weights over --items items: the cost depends on the shapes, not on the weights. Prints one
JSON object: medians and p99 in ms over --reps calls, and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as the serving workers run (issue 29 item 6)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from machine import machine  # noqa: E402  (bench/ is sys.path[0])

from ranker.sequence import SASRecConfig, SequenceState  # noqa: E402
from ranker.sequence_torch import SASRec, last_scores, load  # noqa: E402


def timed(f, reps: int) -> dict[str, float]:
    f()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return {"p50_ms": round(float(np.median(ts)) * 1e3, 4), "p99_ms": round(float(np.quantile(ts, 0.99)) * 1e3, 4)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a model directory of `semrank train sequence`")
    p.add_argument("--items", type=int, default=12086, help="catalog size of the random model (Beauty's)")
    p.add_argument("--reps", type=int, default=300)
    a = p.parse_args()
    torch.set_num_threads(1)
    if a.model:
        model, _ = load(a.model)
        state, _ = SequenceState.load(a.model)
    else:
        torch.manual_seed(0)
        model = SASRec(a.items, SASRecConfig()).eval()
        state = SequenceState(model.cfg, {k: v.numpy() for k, v in model.state_dict().items()})
    n_items = model.n_items
    rng = np.random.default_rng(0)
    out = {"machine": machine(), "model": {"items": n_items, "max_len": model.cfg.max_len, "dim": model.cfg.dim,
                                           "layers": model.cfg.layers}, "reps": a.reps, "miss": {}, "hit": {}}
    for length in (10, model.cfg.max_len):
        h = rng.integers(0, n_items, length)
        out["miss"][f"history_{length}"] = {"numpy": timed(lambda: state.user_vector(h), a.reps),
                                             "torch_full_catalog": timed(lambda: last_scores(model, [h]), a.reps)}
    user = state.user_vector(rng.integers(0, n_items, model.cfg.max_len))
    for n in (100, 1000):
        cands = rng.choice(n_items, size=min(n, n_items), replace=False)
        out["hit"][f"candidates_{n}"] = timed(lambda: state.scores(user, cands), a.reps)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
