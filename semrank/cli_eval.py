"""`semrank eval`: the offline leave-one-out report (sampled-100 and full ranking).

    semrank eval --dataset amazon-beauty-2014 --protocol both --out-dir runs/eval/beauty \
        [--encoder encoder-finetuned=runs/beauty/bundle/encoder ...] [--json runs/eval/beauty.json]

See docs/evaluation.md for the protocols.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

PROTOCOL_CHOICES = ("sampled-100", "full", "both")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def register(sub, train_sub) -> None:  # noqa: ARG001 (train_sub: the plugin signature)
    s = sub.add_parser("eval", help="offline leave-one-out evaluation (sampled-100 / full ranking) with bootstrap CIs",
                       description="Rank each user's last item (leave-one-out) against 100 sampled negatives "
                                   "and/or the full catalog; HR@10, NDCG@10, NDCG@5, MRR with 95% bootstrap CIs.")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="a shared dataset (amazon-beauty-2014 | amazon-toys-2014 | movielens-1m | "
                                       "movielens-latest-small), imported into OUT_DIR/data/NAME once")
    src.add_argument("--data", type=Path, help="a data directory in the contract (items + events)")
    s.add_argument("--shared", type=Path, default=None, help="folder holding the shared datasets (default ../shared/data)")
    s.add_argument("--protocol", choices=PROTOCOL_CHOICES, default="both")
    s.add_argument("--users", type=_positive_int, default=5000,
                   help="evaluate a seeded random sample of this many users (all if fewer); default 5000")
    s.add_argument("--seed", type=int, default=0, help="seed of the user sample, negatives and bootstrap")
    s.add_argument("--history-items", type=_positive_int, default=5,
                   help="titles in the user text of encoder models, most recent first (a bundle's own value wins)")
    s.add_argument("--encoder", action="append", default=[], metavar="NAME=DIR",
                   help="an extra encoder model: a transformers model dir or a bundle dir (repeatable)")
    s.add_argument("--no-frozen", action="store_true", help="skip the pretrained encoder-frozen model")
    s.add_argument("--bootstrap", type=_positive_int, default=1000, help="bootstrap resamples for the CIs")
    s.add_argument("--batch-size", type=_positive_int, default=512, help="users scored per batch")
    s.add_argument("--out-dir", required=True, type=Path, help="reports, dataset import and embedding cache go here")
    s.add_argument("--json", type=Path, default=None, metavar="OUT",
                   help="also write the JSON here (with both protocols: OUT with the protocol before .json)")
    s.set_defaults(func=cmd_eval)


def _dataset_dir(args) -> tuple[str, Path]:
    from training.importers import import_dataset

    if args.data is not None:
        if not args.data.is_dir():
            raise FileNotFoundError(f"--data {args.data}: not a directory")
        return args.data.resolve().name, args.data
    target = args.out_dir / "data" / args.dataset
    # summary.json is written last by import_dataset, so its presence marks a complete import.
    have = all((target / f).is_file() for f in ("items.parquet", "events.parquet", "summary.json"))
    if have:
        log.info("using the imported dataset in %s", target)
    else:
        log.info("importing %s into %s", args.dataset, target)
        import_dataset(args.dataset, target, args.shared)
    return args.dataset, target


def build_models(args, split, item_texts: list[str], dataset: str) -> list:
    from training.eval_models import (EncoderSpec, PopularityScorer, load_encoder_scorer, parse_encoder_arg,
                                      resolve_encoder_spec)

    specs = [] if args.no_frozen else [EncoderSpec("encoder-frozen", "base", history_items=args.history_items)]
    for arg in args.encoder:
        name, path = parse_encoder_arg(arg)
        specs.append(resolve_encoder_spec(name, path, history_items=args.history_items))
    names = ["popularity"] + [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"model name(s) used twice: {', '.join(dupes)}; give each --encoder a distinct NAME")
    models = [PopularityScorer(split.train_item_counts("test"))]
    for spec in specs:
        log.info("loading %s (%s)", spec.name, spec.source)
        models.append(load_encoder_scorer(spec, item_texts, split.titles, dataset, args.out_dir / "cache" / "embeddings"))
    return models


def machine_note() -> str:
    """CPU count and load at the start: timings on shared machines mean little without them."""
    import os

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"machine: {cpus} CPUs, 1-min load average {load:.1f} at the start (timings depend on it)"


def cmd_eval(args) -> int:
    try:
        return run_eval(args)
    except (ValueError, FileNotFoundError) as e:
        log.debug("semrank eval failed", exc_info=True)  # the traceback with -v
        print(f"semrank eval: {e}", file=sys.stderr)
        return 2


def run_eval(args) -> int:
    from featurizer.schema import read_dataset
    from featurizer.text import item_text_expr
    from training.eval_report import build_report, markdown, write_report
    from training.evaluation import PROTOCOLS, EvalConfig, evaluate
    from training.loo import loo_split

    t0 = time.perf_counter()
    machine = machine_note()
    protocols = PROTOCOLS if args.protocol == "both" else (args.protocol,)
    config = EvalConfig(protocols=protocols, users=args.users, seed=args.seed, batch_size=args.batch_size,
                        bootstrap=args.bootstrap)
    dataset, data_dir = _dataset_dir(args)
    ds = read_dataset(data_dir)
    split = loo_split(ds)
    log.info("%s: %d items, %d users with a test target, %d short users (training only)", dataset,
             len(split.item_ids), len(split.users), len(split.train_only))
    item_texts = ds.items.select(item_text_expr())["item_text"].to_list()
    models = build_models(args, split, item_texts, dataset)
    run = evaluate(split, models, config)
    seconds = time.perf_counter() - t0
    for protocol in protocols:
        report = build_report(dataset, protocol, run, len(split.users), args.seed, args.history_items, seconds,
                              n_negatives=config.n_negatives, n_boot=config.bootstrap,
                              extra_notes=[machine])
        paths = write_report(report, args.out_dir, args.json, several_protocols=len(protocols) > 1)
        print(markdown(report))
        log.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return 0
