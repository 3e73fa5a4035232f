"""`semrank`: the command line. Every subcommand has --help."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path

log = logging.getLogger("semrank")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


# ---------------------------------------------------------------- data


def cmd_data_synth(args) -> int:
    from training.data.synth import SynthConfig, synthesize

    cfg = SynthConfig(n_users=args.users, n_items=args.items, n_days=args.days)
    summary = synthesize(args.out, seed=args.seed, config=cfg, progress=True)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_data_import(args) -> int:
    from training.data.importers import import_dataset

    summary = import_dataset(args.name, args.out, args.shared)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_data_validate(args) -> int:
    from featurizer.contracts.schema import read_dataset

    ds = read_dataset(args.data)
    print(f"items: {ds.items.height}, events: {ds.events.height}; {ds.report}")
    return 0


# ---------------------------------------------------------------- train


def cmd_train_ranker(args) -> int:
    from featurizer.contracts.schema import read_dataset
    from ranker.encoder import TextEncoder
    from training.lambdarank.impression_lists import RankerTrainConfig, format_table, train_ranker

    encoder_dir = args.encoder or ("encoder" if (args.out / "encoder" / "config.json").is_file() else "base")
    cfg = RankerTrainConfig(seed=args.seed, test_days=args.test_days, valid_days=args.valid_days, encoder_dir=encoder_dir,
                            variant=args.variant)
    ds = read_dataset(args.data)
    log.info("data: %s; encoder: %s", ds.report, encoder_dir)
    from training.lambdarank.leave_one_out import has_impression_lists, train_from_args

    if not has_impression_lists(ds.events):  # interactions only: target + sampled negatives per group
        return train_from_args(args, ds, encoder_dir)
    model_dir = "base" if encoder_dir == "base" else args.out / encoder_dir
    encoder = ProgressEncoder(TextEncoder(model_dir, max_length=cfg.max_length))
    extra = train_ranker(ds, args.out, cfg, encoder, data_source=str(args.data))
    print(f"\nbundle written to {args.out}\nheld-out lists (last {cfg.test_days:g} days):\n")
    print(format_table(extra["metrics"]["test"]))
    return 0


class ProgressEncoder:
    """Wraps an encoder with a progress bar over batches."""

    def __init__(self, encoder, batch_size: int = 256):
        self.encoder, self.batch_size = encoder, batch_size

    def encode(self, texts: list[str]):
        import numpy as np
        from tqdm import tqdm

        parts = [
            self.encoder.encode(texts[i : i + self.batch_size])
            for i in tqdm(range(0, len(texts), self.batch_size), desc="encode", unit="batch", leave=False)
        ]
        return np.concatenate(parts) if parts else self.encoder.encode([])


# ---------------------------------------------------------------- serve


def cmd_serve(args) -> int:
    from featurizer.store.base import RedisConfig
    from ranker.bundle import load_bundle
    from serving.observability.request_logging import configure_logging
    from serving.api.auth import TlsConfig, TokenAuth
    from serving.server import RankingServer, ServeConfig
    from serving.api.validation import Limits

    for h in list(logging.getLogger().handlers):  # replace main()'s plain handler
        logging.getLogger().removeHandler(h)
    configure_logging(args.log_level, json=args.log_json)
    data = args.data
    if data is None:
        source = load_bundle(args.bundle).manifest.get("training_data", {}).get("source")
        if not source:
            print("semrank serve: --data is required (the bundle does not name its training data)", file=sys.stderr)
            return 2
        data = Path(source)
    if bool(args.tls_cert) != bool(args.tls_key):
        print("semrank serve: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    tokens = None
    if args.tokens_file:
        tokens = TokenAuth.from_file(args.tokens_file)
    elif args.tokens_env:
        spec = os.environ.get(args.tokens_env)
        if not spec:
            print(f"semrank serve: --tokens-env {args.tokens_env}: the variable is not set", file=sys.stderr)
            return 2
        tokens = TokenAuth.from_spec(spec, source=f"${args.tokens_env}")
    store = RedisConfig(url=args.redis_url) if args.redis_url else None
    cfg = ServeConfig(
        bundle_dir=Path(args.bundle),
        data_dir=Path(data),
        state_dir=args.state_dir,
        host=args.host,
        port=args.port,
        experiments_file=args.experiments,
        store=store,
        metrics_port=args.metrics_port,
        tls=TlsConfig(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None,
        tokens=tokens,
        reload_poll_s=args.reload_poll_s,
        max_concurrent_rpcs=args.max_concurrent_rpcs,
        encoder_timeout_s=args.encoder_timeout_ms / 1000,
        limits=Limits(max_candidates=args.max_candidates, max_text_chars=args.max_text_chars,
                      max_message_bytes=args.max_message_bytes),
    )
    async def run() -> None:
        server = RankingServer(cfg)
        await server.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        print(f"semrank serving on {cfg.host}:{server.port}" + (f", metrics on :{server.metrics_port}" if server.metrics_port else ""), flush=True)
        await stop.wait()
        log.info("shutting down: draining calls, flushing logs, stopping Triton")
        await server.stop()

    asyncio.run(run())
    return 0


# ---------------------------------------------------------------- demo


def cmd_demo(args) -> int:
    from semrank.demo import run_demo

    return run_demo(Path(args.workdir), seed=args.seed, users=args.users, items=args.items, days=args.days)


# ---------------------------------------------------------------- parser


def _plugins():
    """Subcommands defined beside their code: each module has `register(sub, train_sub)`."""
    import importlib

    for name in PLUGIN_MODULES:
        yield importlib.import_module(name).register


# Modules that add subcommands (imported only to build the parser; heavy imports stay inside handlers).
PLUGIN_MODULES: list[str] = ["semrank.cli.evaluate", "semrank.cli.export", "semrank.cli.train_encoder", "semrank.cli.ab", "semrank.cli.score"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="semrank", description="Text-semantic ranking service for e-commerce.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="create, import and validate datasets").add_subparsers(dest="data_cmd", required=True)
    s = data.add_parser("synth", help="generate a synthetic shop with ground truth")
    s.add_argument("--out", required=True, type=Path, help="output directory")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--users", type=int, default=1500)
    s.add_argument("--items", type=int, default=800)
    s.add_argument("--days", type=int, default=28)
    s.set_defaults(func=cmd_data_synth)
    s = data.add_parser("import", help="convert a dataset from ../shared/data to the data contract")
    s.add_argument("name", help="amazon-beauty-2014 | amazon-toys-2014 | movielens-1m | movielens-latest-small")
    s.add_argument("--out", required=True, type=Path)
    s.add_argument("--shared", type=Path, default=None, help="folder holding the shared datasets (default ../shared/data)")
    s.set_defaults(func=cmd_data_import)
    s = data.add_parser("validate", help="check a data directory against the data contract")
    s.add_argument("data", type=Path)
    s.set_defaults(func=cmd_data_validate)

    train = sub.add_parser("train", help="train models").add_subparsers(dest="train_cmd", required=True)

    s = train.add_parser("ranker", help="train the LightGBM lambdarank bundle on impression lists",
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
    g = s.add_argument_group("data without impression lists (leave-one-out targets + sampled negatives)")
    g.add_argument("--negatives", type=int, default=16,
                   help="popularity-weighted and uniform negatives per group (default 16)")
    g.add_argument("--hard-negatives", type=int, default=16,
                   help="negatives per group from the first stage's top --hard-k (encoder+cooc; default 16, 0: none)")
    g.add_argument("--hard-k", type=int, default=200, help="first-stage items hard negatives are drawn from (default 200)")
    g.add_argument("--popularity-share", type=float, default=0.5,
                   help="share of the negatives drawn in proportion to popularity, the rest uniform (default 0.5)")
    g.add_argument("--max-users", type=int, default=20000, help="seeded sample of users (default 20000)")
    g.add_argument("--positions-per-user", type=int, default=3,
                   help="training targets per user before the validation item, recent ones favoured (default 3)")
    g.add_argument("--embedding-cache", type=Path, default=None, metavar="DIR",
                   help="item-embedding cache, e.g. runs/eval/NAME/cache/embeddings of `semrank eval`")
    s.set_defaults(func=cmd_train_ranker)

    s = sub.add_parser("serve", help="serve RankingService over gRPC with a Triton encoder")
    s.add_argument("--bundle", required=True, type=Path, help="bundle directory (watched: hot-reloads when its files change)")
    s.add_argument("--data", type=Path, default=None, help="items/events the online state starts from (default: the bundle's training data)")
    s.add_argument("--state-dir", type=Path, default=Path("semrank-state"),
                   help="event log, exposure log, item embeddings, feature snapshot (default: ./semrank-state)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=50051)
    s.add_argument("--experiments", type=Path, default=None, help="A/B experiments file (TOML or JSON)")
    s.add_argument("--redis-url", default=None, help="keep the online features in Redis (default: in-process, snapshotted)")
    s.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port (0: a free one)")
    s.add_argument("--tls-cert", type=Path, default=None)
    s.add_argument("--tls-key", type=Path, default=None)
    s.add_argument("--tls-client-ca", type=Path, default=None, help="require client certificates signed by this CA (mutual TLS)")
    s.add_argument("--tokens-file", type=Path, default=None, help='bearer tokens: {"tokens": [{"token", "role", "name"}]}')
    s.add_argument("--tokens-env", default=None, help="name of an environment variable holding tok:role,tok:role")
    s.add_argument("--reload-poll-s", type=float, default=2.0, help="bundle watcher period; 0 turns it off")
    s.add_argument("--max-concurrent-rpcs", type=int, default=128, help="beyond it calls get RESOURCE_EXHAUSTED")
    s.add_argument("--encoder-timeout-ms", type=float, default=250.0, help="Triton deadline on the request path")
    s.add_argument("--max-candidates", type=int, default=2000)
    s.add_argument("--max-text-chars", type=int, default=4096)
    s.add_argument("--max-message-bytes", type=int, default=4 * 1024 * 1024)
    s.add_argument("--log-level", default="INFO")
    s.add_argument("--log-json", action="store_true", help="JSON log lines (with request_id)")
    s.set_defaults(func=cmd_serve)

    for register in _plugins():
        register(sub, train)

    s = sub.add_parser("demo", help="synth -> train -> serve -> rank through gRPC -> held-out table")
    s.add_argument("--workdir", type=Path, default=Path("demo-out"))
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--users", type=int, default=1500)
    s.add_argument("--items", type=int, default=800)
    s.add_argument("--days", type=int, default=28)
    s.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    # Before torch loads OpenMP: busy-waiting threads made encoding up to 10x slower on shared
    # 2-core machines (bench/encoder.py); an explicit setting in the environment wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
