"""What building a RankResponse costs: the service's `_rank_response` (items made in place in the
repeated field) against the earlier way (each RankedItem made apart, then copied in), in one run.

    .venv/bin/python bench/response_build.py [--reps 300]

Both must serialise to the same bytes (checked); prints JSON: µs per response (median of reps,
serialisation included) at 100 and 1000 candidates, with and without `explain`, and the ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
from machine import machine  # bench/ is sys.path[0]

from featurizer.definitions import FAMILIES
from semrank.ranking.v1 import ranking_service_pb2 as pb
from serving.api.service import _rank_response
from serving.ranking.outcome import RankOutcome


def made_apart(request: pb.RankRequest, request_id: str, outcome: RankOutcome, version: str, experiment: str,
               variant: str) -> pb.RankResponse:
    """The construction before (the baseline)."""
    k = request.top_k or len(outcome.item_ids)
    items = []
    for r, (item_id, score) in enumerate(zip(outcome.item_ids[:k], outcome.scores[:k].tolist())):
        item = pb.RankedItem(item_id=item_id, score=score, rank=r + 1)
        if request.explain and outcome.contributions is not None:
            item.contributions.extend(
                pb.FamilyContribution(family=f, contribution=float(c)) for f, c in zip(FAMILIES, outcome.contributions[r])
            )
            item.contributions.append(pb.FamilyContribution(family="bias", contribution=float(outcome.bias[r])))
        items.append(item)
    return pb.RankResponse(
        request_id=request_id, items=items, model_version=version, missing_ids=outcome.missing_ids,
        experiment=experiment, variant=variant, degraded=outcome.degraded,
        degraded_reason="; ".join(outcome.degraded_reasons),
    )


def median_us(build, args, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        build(*args).SerializeToString()
        times.append(time.perf_counter() - t)
    return round(float(np.median(times)) * 1e6, 1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=300)
    a = p.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for n in (100, 1000):
        ids = [f"item-{k:06d}" for k in range(n)]
        outcome = RankOutcome(ids, rng.random(n), [], False, [], rng.standard_normal((n, len(FAMILIES))),
                              rng.standard_normal(n))
        for explain in (False, True):
            args = (pb.RankRequest(explain=explain), "r" * 32, outcome, "v1", "exp", "control")
            if made_apart(*args).SerializeToString() != _rank_response(*args).SerializeToString():
                raise SystemExit("the two constructions differ")
            before, now = median_us(made_apart, args, a.reps), median_us(_rank_response, args, a.reps)
            rows.append({"candidates": n, "explain": explain, "made_apart_us": before, "in_place_us": now,
                         "ratio": round(before / now, 2)})
    print(json.dumps({"machine": machine(), "reps": a.reps, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
