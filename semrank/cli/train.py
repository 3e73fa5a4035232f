"""`semrank train ranker`, `semrank train encoder` and `semrank train sequence`."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from ranker.sequence import BUNDLE_DIR as SEQUENCE_BUNDLE_DIR
from semrank.cli.evaluate import FIRST_STAGES

log = logging.getLogger(__name__)

# training.lambdarank.params.FEATURE_CHUNK_ROWS (the parser does not import training; tested equal)
FEATURE_CHUNK_ROWS = 250_000


def ranker_tower(args, encoder_dir: str):
    """The bundle's user tower: --tower when given, else the one the encoder was fine-tuned with
    (`training.encoder.tower.encoder_tower`), else the pooled default."""
    from ranker.user_tower import UserTower
    from training.encoder.tower import encoder_tower

    trained = None if encoder_dir == "base" else encoder_tower(args.out / encoder_dir)
    if trained is not None and args.tower in (None, trained.kind) and args.history_items in (None, trained.history_items):
        return trained
    kind = args.tower or "pooled"
    tower = UserTower.text(args.history_items or 5) if kind == "text" else UserTower.pooled(args.history_items or 10,
                                                                                           args.tower_decay)
    if trained is not None and trained != tower:
        log.warning("the encoder was fine-tuned with another user tower (%s); the bundle uses %s",
                    trained.describe(), tower.describe())
    return tower


def _tracked(args, command: str):
    """The command's tracked run (training.tracking): TensorBoard under OUT/tensorboard/, MLflow with --mlflow-uri."""
    from training.tracking import tracked_run

    params = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "func"}
    return tracked_run(args.out, command, params, mlflow_uri=args.mlflow_uri, mlflow_experiment=args.mlflow_experiment,
                       mlflow_artifacts=args.mlflow_artifacts)


def cmd_train_ranker(args) -> int:
    with _tracked(args, "train-ranker") as run:
        code, metrics = _train_ranker(args)
        run.finish(metrics, artifacts=args.out)
    return code


def _train_ranker(args) -> tuple[int, dict]:
    from featurizer.contracts.schema import has_impression_lists, read_dataset

    if args.sequence_serve is not None and args.sequence is None:
        raise ValueError("--sequence-serve is the refit of a --sequence model: give both")
    encoder_dir = args.encoder or ("encoder" if (args.out / "encoder" / "config.json").is_file() else "base")
    ds = read_dataset(args.data)
    tower = ranker_tower(args, encoder_dir)
    log.info("data: %s; encoder: %s; %s", ds.report, encoder_dir, tower.describe())
    # Interactions only, or a sequence model's ranker (trained on the items its model held out): the
    # leave-one-out targets plus sampled negatives per group; a log's impression lists are not read then.
    if not has_impression_lists(ds.events) or args.sequence is not None:
        if args.sequence is not None and has_impression_lists(ds.events):
            log.info("--sequence: leave-one-out targets from the engagements (the impression lists are not used)")
        return _train_leave_one_out(args, ds, encoder_dir, tower)
    from ranker.encoder import ProgressEncoder, TextEncoder
    from training.lambdarank.booster import format_table
    from training.lambdarank.impression_lists import train_ranker
    from training.lambdarank.params import RankerTrainConfig

    cfg = RankerTrainConfig(seed=args.seed, test_days=args.test_days, valid_days=args.valid_days, encoder_dir=encoder_dir,
                            variant=args.variant, **_engine(args))
    model_dir = "base" if encoder_dir == "base" else args.out / encoder_dir
    encoder = ProgressEncoder(TextEncoder(model_dir, max_length=cfg.max_length))
    extra = train_ranker(ds, args.out, cfg, encoder, data_source=str(args.data), tower=tower)
    _write_probes(args.out)
    print(f"\nbundle written to {args.out}\nheld-out lists (last {cfg.test_days:g} days):\n")
    print(format_table(extra["metrics"]["test"]))
    return 0, {"test": extra["metrics"]["test"]}


def _engine(args) -> dict:
    """Where LightGBM trains (`training.lambdarank.distributed` for ray), and how many example rows are
    featurized at once (both modes; peak memory follows it, docs/training_at_scale.md)."""
    return {"engine": args.engine, "ray_workers": args.ray_workers, "ray_address": args.ray_address,
            "feature_chunk_rows": args.chunk_rows}


def _write_probes(out: Path) -> None:
    """The encoder's probe embeddings beside the model (ranker.encoder_probes), when it scores text:
    what a service checks an external Triton against."""
    import json

    from ranker.bundle import MANIFEST
    from ranker.encoder_probes import write_probes

    if "interest_score" in json.loads((out / MANIFEST).read_text())["feature_names"]:
        write_probes(out, force=True)


def _train_leave_one_out(args, ds, encoder_dir: str, tower) -> tuple[int, dict]:
    """`semrank train ranker` on data without impression lists."""
    from training.data.loo import loo_data
    from training.lambdarank.booster import format_table
    from training.lambdarank.leave_one_out import (
        TRAINING_MODE,
        load_text_side,
        train_loo_ranker,
    )
    from training.lambdarank.params import LooRankerConfig

    held_out = _sequence_hold_out(args.sequence) if args.sequence is not None else (args.last_positions or 0)
    if args.sequence is not None and args.last_positions not in (None, held_out):
        raise ValueError(f"--last-positions {args.last_positions}: with --sequence the targets are the {held_out} "
                         "item(s) the sequence model held out")
    cfg = LooRankerConfig(variant=args.variant, max_users=args.max_users, positions_per_user=args.positions_per_user,
                          negatives=args.negatives, popularity_share=args.popularity_share,
                          hard_negatives=args.hard_negatives, hard_k=args.hard_k, hard_from=args.hard_from,
                          seed=args.seed,
                          encoder_dir=encoder_dir, sequence_dir=SEQUENCE_BUNDLE_DIR if args.sequence is not None else None,
                          held_out_targets=held_out, **_engine(args))  # (refuses a model without a hold-out)
    if args.sequence is not None:
        if args.sequence_serve is not None:
            _sequence_hold_out(args.sequence_serve)  # (a clear error when no model is there)
        _copy_sequence_model(args.sequence_serve or args.sequence, args.out / SEQUENCE_BUNDLE_DIR)
    ds, split = loo_data(ds)
    log.info("no impression lists: %s training (%s variant) on %d users with a leave-one-out split",
             TRAINING_MODE, cfg.variant, len(split.users))
    encoder = item_emb = text_cache = None
    if cfg.needs_encoder:
        encoder, item_emb, text_cache = load_text_side(ds, args.out, cfg, args.embedding_cache, Path(args.data).resolve().name)
    extra = train_loo_ranker(ds, split, args.out, cfg, encoder, item_emb, data_source=str(args.data), text_cache=text_cache,
                             tower=tower, sequence_source=args.sequence if args.sequence_serve is not None else None)
    _write_probes(args.out)
    best = extra["hyper_parameters"]["best_iteration"]
    print(f"\nbundle ({TRAINING_MODE}, {cfg.variant}) written to {args.out}; best iteration {best}, "
          f"{extra['train_seconds']:.0f} s\nvalidation groups (the early-stopping set, so optimistic):\n")
    print(format_table(extra["metrics"]["valid"]))
    return 0, {"valid": extra["metrics"]["valid"]}


def _sequence_hold_out(src: Path) -> int:
    """The items the --sequence model held out before each validation item (the ranker's targets)."""
    import json

    from ranker.sequence import CONFIG_FILE, MODEL_FILE

    if not (src / CONFIG_FILE).is_file() or not (src / MODEL_FILE).is_file():
        raise FileNotFoundError(f"--sequence {src}: no sequence model there ({CONFIG_FILE} and {MODEL_FILE} of "
                                "`semrank train sequence`)")
    return int(json.loads((src / CONFIG_FILE).read_text())["config"].get("hold_out", 0))


def _copy_sequence_model(src: Path, dst: Path) -> None:
    import shutil

    from ranker.sequence import CONFIG_FILE, MODEL_FILE

    dst.mkdir(parents=True, exist_ok=True)
    for name in (CONFIG_FILE, MODEL_FILE):
        shutil.copyfile(src / name, dst / name)


def cmd_train_encoder(args: argparse.Namespace) -> int:
    from featurizer.contracts.schema import read_dataset
    from training.encoder.train import EncoderTrainConfig, train_encoder

    cfg = EncoderTrainConfig(
        method=args.method,
        seed=args.seed,
        max_minutes=args.max_minutes,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        tower=args.tower,
        history_items=args.history_items,
        tower_decay=args.tower_decay,
        learn_tower=not args.fixed_tower,
        history_grad=args.history_grad,
        max_length_user=args.max_length_user,
        max_length_item=args.max_length_item,
        val_users=args.val_users,
        eval_every=args.eval_every,
        test_days=args.test_days,
        valid_days=args.valid_days,
    )
    ds = read_dataset(args.data)
    log.info("data: %s", ds.report)
    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun process 0 tracks, saves and reports
        train_encoder(ds, args.out, cfg, data_source=str(args.data))
        return 0
    with _tracked(args, "train-encoder") as run:
        s = train_encoder(ds, args.out, cfg, data_source=str(args.data))
        run.finish(s["metrics"], artifacts=Path(args.out) / "encoder")
    m = s["metrics"]
    print(f"\nencoder written to {Path(args.out) / 'encoder'} ({s['method']}, {s['steps']} steps, "
          f"{s['train_loop_seconds']:.0f} s, {s['examples_per_second']} examples/s)")
    print(f"validation, sampled-{cfg.val_negatives} ({m['frozen']['users']} users):")
    print("| model | ndcg@10 | hr@10 |\n|---|---:|---:|")
    for name, key in (("frozen", "frozen"), ("final", "final"), (f"best (step {m['best']['step']})", "best")):
        print(f"| {name} | {m[key]['ndcg@10']:.4f} | {m[key]['hr@10']:.4f} |")
    return 0


def cmd_train_sequence(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from featurizer.contracts.schema import read_dataset
    from training.data.loo import loo_data
    from ranker.sequence import SASRecConfig
    from training.sequence.sasrec import train_sasrec

    cfg = replace(SASRecConfig(), max_len=args.max_len, dim=args.dim, layers=args.layers, heads=args.heads,
                  dropout=args.dropout, lr=args.lr, batch_size=args.batch_size, epochs=args.epochs,
                  max_minutes=args.max_minutes, eval_every=args.eval_every, patience=args.patience,
                  valid_users=args.valid_users, seed=args.seed, text=args.text_encoder is not None,
                  hold_out=args.hold_out)
    ds, split = loo_data(read_dataset(args.data))
    vectors = None
    if args.text_encoder is not None:
        from featurizer.text import item_text_expr
        from training.evaluation.models import EncoderSpec, load_encoder_scorer, parse_named_path, resolve_encoder_spec

        spec = (EncoderSpec("encoder-frozen", "base") if args.text_encoder == "base" else resolve_encoder_spec(
            *parse_named_path(args.text_encoder, "--text-encoder", "base, or encoder-finetuned=runs/enc-D/encoder")))
        texts = ds.items.select(item_text_expr())["item_text"].to_list()
        vectors = load_encoder_scorer(spec, texts, split.titles, Path(args.data).name, args.embedding_cache).item_embeddings
    with _tracked(args, "train-sequence") as run:
        _, s = train_sasrec(split, cfg, args.out, text_vectors=vectors)
        run.finish({"best_valid_ndcg@10": s["best_valid_ndcg@10"]}, artifacts=args.out)
    print(f"\nsequence model written to {args.out} ({len(s['curve'])} validations, stopped by {s['stopped_by']}, "
          f"{s['train_seconds']:.0f} s)")
    print("| epoch | loss | valid ndcg@10 | valid hr@10 |\n|---:|---:|---:|---:|")
    for c in s["curve"]:
        print(f"| {c['epoch']} | {c['loss']:.4f} | {c['ndcg@10']:.4f} | {c['hr@10']:.4f} |")
    return 0


def _register_sequence(train_sub) -> None:
    from ranker.sequence import SASRecConfig

    d = SASRecConfig()
    s = train_sub.add_parser(
        "sequence", help="train the SASRec-CE sequence model (item ids, optionally item text) on leave-one-out data",
        description="A causal transformer over each user's item sequence, full-softmax cross-entropy; trained on the "
                    "sequences before each user's validation item, early-stopped on full-ranking NDCG@10 of it "
                    "(training/sequence/sasrec.py). `semrank eval --sequence NAME=OUT` evaluates it.")
    s.add_argument("--data", required=True, type=Path, help="a data directory in the contract (e.g. OUT_DIR/data/NAME "
                                                            "of `semrank eval --dataset`)")
    s.add_argument("--out", required=True, type=Path, help="model directory to write")
    s.add_argument("--text-encoder", default=None, metavar="base|NAME=DIR",
                   help="add the items' text vectors to their id embeddings: the pretrained encoder (base) or a "
                        "fine-tuned one (NAME=DIR); default: ids only")
    s.add_argument("--embedding-cache", type=Path, default=None, metavar="DIR",
                   help="item-embedding cache, e.g. runs/eval/NAME/cache/embeddings of `semrank eval`")
    for flag, typ in (("max_len", int), ("dim", int), ("layers", int), ("heads", int), ("dropout", float), ("lr", float),
                      ("batch_size", int), ("epochs", int), ("max_minutes", float), ("eval_every", int),
                      ("patience", int), ("valid_users", int), ("seed", int)):
        s.add_argument("--" + flag.replace("_", "-"), type=typ, default=getattr(d, flag), help=f"default {getattr(d, flag)}")
    s.add_argument("--hold-out", type=int, default=d.hold_out,
                   help="items before each validation item left out of training (default 0); 1 makes a model for "
                        "`semrank train ranker --sequence`, whose training targets are those items")
    _tracking_args(s)
    s.set_defaults(func=cmd_train_sequence)


def register(sub) -> None:
    from training.encoder.train import DEFAULT_METHOD, METHODS, EncoderTrainConfig

    train_sub = sub.add_parser("train", help="train models").add_subparsers(dest="train_cmd", required=True)
    _register_ranker(train_sub)
    _register_sequence(train_sub)
    d = EncoderTrainConfig()
    s = train_sub.add_parser(
        "encoder",
        help="fine-tune the text encoder (two-tower contrastive, from all-MiniLM-L6-v2)",
        description="Writes OUT/encoder/ (safetensors BertModel + tokenizer + training.json) and loss/validation "
        "curves; updates OUT/manifest.json when the bundle has one. Data-parallel on several processes or machines: "
        "start it with torchrun, e.g. `torchrun --nproc-per-node 2 .venv/bin/semrank train encoder ...` "
        "(--batch-size is the global batch; docs/training_at_scale.md).",
    )
    s.add_argument("--data", required=True, type=Path, help="data directory (items + events)")
    s.add_argument("--out", required=True, type=Path, help="bundle directory; the encoder goes to OUT/encoder/")
    s.add_argument("--max-minutes", type=float, default=d.max_minutes, help="wall-time cap of the training loop, validation included")
    s.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (default: time only)")
    s.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD, help="full fine-tuning or LoRA adapters (merged on save)")
    s.add_argument("--seed", type=int, default=d.seed)
    s.add_argument("--batch-size", type=int, default=d.batch_size)
    s.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 5e-5 full, 5e-4 lora)")
    s.add_argument("--tower", choices=("pooled", "text"), default=d.tower,
                   help="the user tower trained through (ranker.user_tower; recorded in OUT/encoder/ for `semrank "
                        "train ranker`): pooled item vectors (default) or the history text")
    s.add_argument("--history-items", type=int, default=None, help="recent items of the tower (default: 10 pooled, 5 text)")
    s.add_argument("--tower-decay", type=float, default=d.tower_decay,
                   help="pooled: initial weight decay^i of the i-th most recent item (default 0.5)")
    s.add_argument("--fixed-tower", action="store_true", help="pooled: keep the position weights fixed (not trained)")
    s.add_argument("--history-grad", type=int, default=d.history_grad,
                   help=f"pooled: history positions whose item vectors get gradients (default {d.history_grad}; 0 none, "
                        f"10 all); the others come from every item's vector, re-embedded every {d.history_cache_steps} steps")
    s.add_argument("--max-length-user", type=int, default=d.max_length_user, help="token budget of the user text")
    s.add_argument("--max-length-item", type=int, default=d.max_length_item, help="token budget of the item text")
    s.add_argument("--val-users", type=int, default=d.val_users, help="validation users (fixed, seeded subset)")
    s.add_argument("--eval-every", type=int, default=d.eval_every, help="validate every this many steps")
    s.add_argument("--test-days", type=float, default=d.test_days, help="impression data: last days never read (the ranker's test)")
    s.add_argument("--valid-days", type=float, default=d.valid_days, help="impression data: days before the test days, for validation")
    _tracking_args(s)
    s.set_defaults(func=cmd_train_encoder)


def _tracking_args(s) -> None:
    g = s.add_argument_group("tracking (TensorBoard event files always go to OUT/tensorboard/)")
    g.add_argument("--mlflow-uri", default=None,
                   help="also log the run to MLflow at this tracking URI (e.g. sqlite:///mlflow.db, http://host:5000); "
                        "needs pip install 'semrank[mlflow]'")
    g.add_argument("--mlflow-experiment", default="semrank", help="the MLflow experiment (default semrank)")
    g.add_argument("--mlflow-artifacts", default=None,
                   help="where a new MLflow experiment keeps its artifacts (a directory or URI; default: MLflow's, "
                        "which for a database store is ./mlruns under the current directory)")


def _register_ranker(train_sub) -> None:
    s = train_sub.add_parser("ranker", help="train the LightGBM lambdarank bundle on impression lists",
                         description="Trains on shown impression lists; on data without them (interactions only, "
                                     "e.g. imported datasets) on leave-one-out targets plus sampled negatives.")
    s.add_argument("--data", required=True, type=Path)
    s.add_argument("--out", required=True, type=Path, help="bundle directory to write")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--test-days", type=float, default=4.0, help="last days held out for the test table")
    s.add_argument("--valid-days", type=float, default=3.0, help="days before the test days, for early stopping")
    s.add_argument(
        "--encoder",
        default=None,
        help="encoder directory relative to --out (default: 'encoder' if `semrank train encoder` wrote one there, else the pretrained 'base')",
    )
    s.add_argument("--variant", choices=("full", "behavioural"), default="full",
                   help="full: every feature; behavioural: no text features (no interest_score)")
    s.add_argument("--tower", choices=("pooled", "text"), default=None,
                   help="user side of the interest score (ranker.user_tower): pooled item vectors (no encoder call "
                        "per event) or the history text; default: the tower the encoder was fine-tuned with, else pooled")
    s.add_argument("--history-items", type=int, default=None, help="recent items of the tower (default: 10 pooled, 5 text)")
    s.add_argument("--tower-decay", type=float, default=0.5, help="the pooled tower's recency weight per position (default 0.5)")
    s.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="where LightGBM trains: one process, or LightGBM's data-parallel mode on Ray workers (whole "
                        "query groups per worker; docs/training_at_scale.md)")
    s.add_argument("--ray-workers", type=int, default=2, help="LightGBM workers on Ray (default 2)")
    s.add_argument("--ray-address", default=None, help="Ray cluster to join (e.g. auto); default: a local Ray")
    s.add_argument("--chunk-rows", type=int, default=FEATURE_CHUNK_ROWS,
                   help=f"example rows featurized at once, whole groups (default {FEATURE_CHUNK_ROWS:,}); peak memory "
                        "follows it, the model does not (docs/training_at_scale.md). The examples are kept on disk "
                        "under TMPDIR until LightGBM has read them")
    g = s.add_argument_group("data without impression lists (leave-one-out targets + sampled negatives)")
    g.add_argument("--negatives", type=int, default=16,
                   help="popularity-weighted and uniform negatives per group (default 16)")
    g.add_argument("--hard-negatives", type=int, default=16,
                   help="negatives per group from the first stage's top --hard-k (encoder+cooc; default 16, 0: none)")
    g.add_argument("--hard-k", type=int, default=200, help="first-stage items hard negatives are drawn from (default 200)")
    g.add_argument("--hard-from", default="encoder+cooc", choices=FIRST_STAGES,
                   help="the first stage hard negatives come from: the one `semrank eval --first-stage` will re-order "
                        "(default encoder+cooc; the sequence ones need --sequence)")
    g.add_argument("--popularity-share", type=float, default=0.5,
                   help="share of the negatives drawn in proportion to popularity, the rest uniform (default 0.5)")
    g.add_argument("--max-users", type=int, default=20000, help="seeded sample of users (default 20000)")
    g.add_argument("--positions-per-user", type=int, default=3,
                   help="training targets per user before the validation item, recent ones favoured (default 3)")
    g.add_argument("--embedding-cache", type=Path, default=None, metavar="DIR",
                   help="item-embedding cache, e.g. runs/eval/NAME/cache/embeddings of `semrank eval`")
    g.add_argument("--last-positions", type=int, default=None, metavar="K",
                   help="training targets: exactly the last K positions before each validation item (instead of "
                        "--positions-per-user sampled ones); what --sequence implies, without the feature")
    g.add_argument("--sequence", type=Path, default=None, metavar="DIR",
                   help="a sequence model of `semrank train sequence --hold-out K` on this data: copied into the "
                        "bundle, its score becomes the feature sequence_score, and the training targets are the K "
                        "items it held out (one group per user and held-out item, instead of --positions-per-user); "
                        "on data with impression lists too, whose lists are then not read")
    g.add_argument("--sequence-serve", type=Path, default=None, metavar="DIR",
                   help="the bundle carries this sequence model instead of --sequence's: the same recipe trained "
                        "with a smaller hold-out (--hold-out 0: every item before the validation one), its refit. "
                        "The ranker still learns sequence_score from --sequence's held-out scores; evaluation and "
                        "serving use this one (docs/evaluation.md, the refit)")
    _tracking_args(s)
    s.set_defaults(func=cmd_train_ranker)
