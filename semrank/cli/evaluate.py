"""`semrank eval`: the offline leave-one-out report (sampled-100 and full ranking).

    semrank eval --dataset amazon-beauty-2014 --protocol both --out-dir runs/eval/beauty \
        [--encoder encoder-finetuned=runs/beauty/bundle/encoder ...] [--json runs/eval/beauty.json] \
        [--ranker ranker-full=runs/beauty-ranker-full ...]

See docs/evaluation.md for the protocols.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)

PROTOCOL_CHOICES = ("sampled-100", "full", "both")
# Kept in step with training.evaluation.rankers (not imported here: building the parser stays light).
FIRST_STAGES = ("encoder", "encoder+cooc", "encoder+popularity", "sequence", "encoder+cooc+sequence",
                "encoder+ease", "encoder+ease+sequence")
DEFAULT_FIRST_STAGE = "encoder+cooc"
DEFAULT_RERANK_K = 200
SEQUENCE_STAGES = ("sequence", "encoder+cooc+sequence", "encoder+ease+sequence")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def register(sub) -> None:
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
    s.add_argument("--tower", choices=("pooled", "text"), action="append", default=None,
                   help="user tower(s) of the pretrained encoder-frozen model and of --encoder directories that "
                        "record none (repeatable; default pooled): pooled item vectors or the history text "
                        "(ranker.user_tower; a bundle's or a fine-tuned encoder's own tower wins)")
    s.add_argument("--history-items", type=_positive_int, default=None,
                   help="recent items of those towers (default: 10 pooled, 5 text)")
    s.add_argument("--compare", action="append", default=[], metavar="A:B",
                   help="a paired bootstrap of model A's NDCG@10 against model B's on the same users "
                        "(relative difference with its 95%% interval; repeatable)")
    s.add_argument("--encoder", action="append", default=[], metavar="NAME=DIR",
                   help="an extra encoder model: a transformers model dir or a bundle dir (repeatable)")
    s.add_argument("--no-frozen", action="store_true", help="skip the pretrained encoder-frozen model")
    s.add_argument("--ranker", action="append", default=[], metavar="NAME=BUNDLE",
                   help="a LightGBM bundle, scored on candidates only: the 101 of sampled-100, and in full the "
                        "first stage's top K (repeatable)")
    s.add_argument("--sequence", action="append", default=[], metavar="NAME=DIR",
                   help="a sequence model of `semrank train sequence` trained on this dataset (repeatable)")
    s.add_argument("--first-stage", choices=FIRST_STAGES, default=DEFAULT_FIRST_STAGE,
                   help=f"first stage of the rankers in full ranking (default {DEFAULT_FIRST_STAGE}); "
                        "sequence and encoder+cooc+sequence use the --sequence model (exactly one)")
    s.add_argument("--rerank-k", type=_positive_int, default=DEFAULT_RERANK_K,
                   help=f"items the first stage hands to a ranker in full ranking (default {DEFAULT_RERANK_K})")
    s.add_argument("--cache-dir", type=Path, default=None,
                   help="item-embedding cache (default OUT_DIR/cache/embeddings)")
    s.add_argument("--bootstrap", type=_positive_int, default=1000, help="bootstrap resamples for the CIs")
    s.add_argument("--batch-size", type=_positive_int, default=512, help="users scored per batch")
    s.add_argument("--out-dir", required=True, type=Path, help="reports, dataset import and embedding cache go here")
    s.add_argument("--json", type=Path, default=None, metavar="OUT",
                   help="also write the JSON here (with both protocols: OUT with the protocol before .json)")
    s.set_defaults(func=cmd_eval)


def _dataset_dir(args) -> tuple[str, Path]:
    from training.data.importers import import_dataset

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
    from training.evaluation.models import (
        EncoderSpec,
        PopularityScorer,
        load_encoder_scorer,
        parse_encoder_arg,
        parse_named_path,
        resolve_encoder_spec,
    )

    towers = default_towers(args)
    specs = [] if args.no_frozen else [
        EncoderSpec("encoder-frozen" if len(towers) == 1 else f"encoder-frozen-{t.kind}", "base", tower=t) for t in towers]
    for arg in args.encoder:
        name, path = parse_encoder_arg(arg)
        specs.append(resolve_encoder_spec(name, path, tower=towers[0]))
    names = ["popularity"] + [s.name for s in specs]
    models = [PopularityScorer(split.train_item_counts("test"))]
    if args.sequence:
        from training.sequence.sasrec import SASRecScorer

        for arg in args.sequence:
            name, path = parse_named_path(arg, "--sequence", "sasrec-ce=runs/seq/beauty-sasrec-id")
            names.append(name)
            models.append(SASRecScorer.load(name, path, split.item_ids))
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"model name(s) used twice: {', '.join(dupes)}; give each --encoder / --sequence a distinct NAME")
    loaded: dict = {}  # one encoder and its item embeddings for the specs that differ only in the tower
    for spec in specs:
        log.info("loading %s (%s)", spec.name, spec.source)
        models.append(load_encoder_scorer(spec, item_texts, split.titles, dataset, _cache_dir(args), loaded=loaded))
    return models


def default_towers(args) -> list:
    """The towers of --tower (default pooled), each with --history-items or its kind's default."""
    from ranker.user_tower import UserTower

    kinds = list(dict.fromkeys(args.tower or ["pooled"]))
    return [UserTower.text(args.history_items or 5) if k == "text" else UserTower.pooled(args.history_items or 10)
            for k in kinds]


def _cache_dir(args) -> Path:
    return args.cache_dir if args.cache_dir is not None else args.out_dir / "cache" / "embeddings"


def run_rankers(args, ds, split, models: list, item_texts: list[str], dataset: str, config):
    """Evaluate the --ranker bundles (grouped by encoder) on the users of `evaluate`; a list of RankerRun."""
    from training.evaluation.models import (
        EncoderSpec,
        display_path,
        load_encoder_scorer,
    )
    from training.evaluation.rankers import (
        evaluate_rankers,
        load_ranker,
        parse_ranker_arg,
        text_side_for,
    )
    from training.evaluation.protocol import FULL
    from training.lambdarank.first_stage import FirstStage
    from training.sequence.sasrec import SASRecScorer

    rankers = []
    for arg in args.ranker:
        name, path = parse_ranker_arg(arg)
        rankers.append(load_ranker(name, path, display_path(path)))
    names = [m.name for m in models] + [r.name for r in rankers]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"model name(s) used twice: {', '.join(dupes)}; give each --encoder / --ranker a distinct NAME")
    loaded: dict[str, object] = {}

    def load(name: str, model_dir: str, max_length: int):
        if name not in loaded:
            spec = EncoderSpec(name, model_dir, max_length, source=display_path(model_dir))
            loaded[name] = load_encoder_scorer(spec, item_texts, split.titles, dataset, _cache_dir(args))
        return loaded[name]

    groups: dict[tuple, tuple] = {}
    for r in rankers:
        side = text_side_for(r, models, load)
        key = (id(side.encoder), side.tower.key)
        groups.setdefault(key, (side, []))[1].append(r)
    sequences = [m for m in models if isinstance(m, SASRecScorer)]  # (at most one: check_first_stage)
    stage = FirstStage(split, "test") if FULL in config.protocols and groups else None  # one solve for every group
    return [evaluate_rankers(ds, split, group, side, config, args.first_stage, args.rerank_k,
                             sequence=sequences[0] if sequences else None, stage=stage)
            for side, group in groups.values()]


def parse_compare_arg(arg: str) -> tuple[str, str]:
    """`A:B` -> (A, B)."""
    a, sep, b = arg.partition(":")
    if not sep or not a.strip() or not b.strip():
        raise ValueError(f"--compare expects A:B, two model names of the run (e.g. ranker-pooled:ranker-text), got {arg!r}")
    return a.strip(), b.strip()


def _note_applies(note: str, protocol: str) -> bool:
    """Notes that start with "<protocol>," belong to that protocol's report only."""
    return not note.startswith(tuple(f"{p}," for p in ("sampled-100", "full"))) or note.startswith(f"{protocol},")


def machine_note() -> str:
    """CPU count and load at the start: timings on shared machines mean little without them."""
    import os

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"machine: {cpus} CPUs, 1-min load average {load:.1f} at the start (timings depend on it)"


def check_first_stage(args) -> None:
    """The sequence first stages fuse the one --sequence model (its stages' recall is reported
    whenever one is given with --ranker)."""
    if args.ranker and len(args.sequence) > 1:
        raise ValueError(f"{len(args.sequence)} --sequence models given with --ranker; the rankers' first stage fuses "
                         "one: give one --sequence")
    if args.first_stage in SEQUENCE_STAGES and not args.sequence:
        raise ValueError(f"--first-stage {args.first_stage} needs a --sequence model of this dataset")


def cmd_eval(args) -> int:
    from featurizer.contracts.schema import read_dataset
    from featurizer.text import item_text_expr
    from training.data.loo import loo_data
    from training.evaluation.protocol import PROTOCOLS, EvalConfig, evaluate, user_slices
    from training.evaluation.report import build_report, markdown, write_report

    check_first_stage(args)
    t0 = time.perf_counter()
    machine = machine_note()
    protocols = PROTOCOLS if args.protocol == "both" else (args.protocol,)
    config = EvalConfig(protocols=protocols, users=args.users, seed=args.seed, batch_size=args.batch_size,
                        bootstrap=args.bootstrap)
    dataset, data_dir = _dataset_dir(args)
    ds, split = loo_data(read_dataset(data_dir))
    log.info("%s: %d items, %d users with a test target, %d short users (training only)", dataset,
             len(split.item_ids), len(split.users), len(split.train_only))
    item_texts = ds.items.select(item_text_expr())["item_text"].to_list()
    models = build_models(args, split, item_texts, dataset)
    if (data_dir / "truth" / "meta.json").is_file():  # a synthetic shop: its ground truth joins the table
        from training.evaluation.models import TrueInterestScorer
        from training.lambdarank.leave_one_out import sequence_times

        test_times = [int(t[-1]) for t in sequence_times(ds, split)]
        models.append(TrueInterestScorer(data_dir, split, test_times))
    compare = [parse_compare_arg(a) for a in args.compare]
    run = evaluate(split, models, config)
    ranker_runs = run_rankers(args, ds, split, models, item_texts, dataset, config) if args.ranker else []
    towers = {m.name: m.tower.describe() for m in models if getattr(m, "tower", None) is not None}
    towers |= {name: desc for extra in ranker_runs for name, desc in extra.towers.items()}
    notes = [machine]
    from training.evaluation.rankers import merge, subset_notes

    if ranker_runs:
        for extra in ranker_runs:
            run = merge(run, extra)
            notes += extra.notes
        subset, subset_lines = subset_notes(run, ~ranker_runs[0].same_day,
                                            "users whose test and validation items fall in different clock ticks")
        notes += subset_lines
    slices = {}
    for label, keep in user_slices(split, run.users).items():  # where item text should matter most
        slices[label], lines = subset_notes(run, keep, label)
        notes += lines
    seconds = time.perf_counter() - t0
    for protocol in protocols:
        report = build_report(dataset, protocol, run, len(split.users), args.seed, towers, seconds,
                              n_negatives=config.n_negatives, n_boot=config.bootstrap,
                              extra_notes=[n for n in notes if _note_applies(n, protocol)], compare=compare)
        report["slices"] = {label: by_protocol.get(protocol, {}) for label, by_protocol in slices.items()}
        if ranker_runs:
            report["different_timestamp_subset"] = subset.get(protocol, {})
            if protocol == "full":
                report["two_stage"] = [extra.two_stage for extra in ranker_runs]
        paths = write_report(report, args.out_dir, args.json, several_protocols=len(protocols) > 1)
        print(markdown(report))
        log.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return 0
