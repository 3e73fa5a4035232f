"""What the sequence model costs a Rank (issue 31 item 3): its numpy forward pass (`ranker.sequence.
SequenceState`), on a cache miss (the user's state after a new history) and on a hit (the candidates'
scores from a cached state), at 100 and 1000 candidates, beside the torch model's own forward in the
same run (the baseline: what serving would pay with torch in the process); then the same through
the path a Rank takes (`serving.ranking.sequence_scores.SequenceScorer` over `OnlineFeatures.sequence`
of an in-process store: the read of the user's sequence, its mapping to the model's catalog, the
forward pass or the cached state, the candidates' scores), with users of full 50-item sequences.

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


def engine_path(state: SequenceState, n_items: int, reps: int) -> dict:
    """Per Rank, `SequenceScorer` over the online state: a miss (each user's first Rank) and a hit
    (the next), at 100 and 1000 candidates; medians and p99 over `reps` users."""
    from datetime import datetime, timedelta, timezone

    import polars as pl

    from featurizer.online.features import OnlineFeatures
    from featurizer.store.in_process import InProcessStore
    from serving.ranking.item_store import ItemStore
    from serving.ranking.sequence_scores import SequenceScorer

    ids = [f"item-{k:06d}" for k in range(n_items)]
    state.item_ids, state.index = ids, {i: k for k, i in enumerate(ids)}
    catalog = pl.DataFrame({"item_id": ids, "title": ids})
    online, items = OnlineFeatures(InProcessStore(), catalog), ItemStore(catalog)
    rng = np.random.default_rng(1)
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    length = online.params.sequence_items
    users = [f"user-{u}" for u in range(reps)]
    online.apply(pl.DataFrame({
        "ts": [t0 + timedelta(seconds=s) for _ in users for s in range(length)],
        "user_id": [u for u in users for _ in range(length)],
        "item_id": [ids[k] for _ in users for k in rng.choice(n_items, length, replace=False)],
        "event": ["click"] * (len(users) * length)}).with_columns(pl.col("ts").cast(pl.Datetime("us", "UTC"))))
    t = t0 + timedelta(days=1)
    out = {}
    for n in (100, 1000):
        rows = items.rows([ids[k] for k in rng.choice(n_items, size=min(n, n_items), replace=False)])
        scorer = SequenceScorer(state, items, cache_size=len(users))
        for kind in ("miss", "hit"):
            ts = []
            for u in users:
                s0 = time.perf_counter()
                user, hit = scorer.user_vector(u, online.sequence(u, t))
                scorer.scores(user, rows)
                ts.append(time.perf_counter() - s0)
                assert hit == (kind == "hit")
            out[f"{kind}_candidates_{n}"] = {"p50_ms": round(float(np.median(ts)) * 1e3, 4),
                                             "p99_ms": round(float(np.quantile(ts, 0.99)) * 1e3, 4)}
    return out


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
    out["engine_path"] = engine_path(state, n_items, a.reps)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
