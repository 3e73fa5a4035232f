"""`semrank score` (offline batch scoring) and `semrank embed-catalog` (item embeddings ahead of serving).

    semrank embed-catalog --bundle B --data D --state-dir S
    semrank score --bundle B --data D --state-dir S --input IN.parquet --output OUT.parquet [--engine ray]

See docs/batch_scoring.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from datetime import datetime
from pathlib import Path

from semrank.cli.common import add_triton_args, data_dir, external_triton

log = logging.getLogger(__name__)


def _as_of(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO time such as 2024-05-01T12:00:00Z ({e})") from None


def cmd_score(args) -> int:
    from featurizer.privacy import Pseudonyms
    from serving.batch.job import ScoreJob, run_score_job
    from serving.batch.scorer import ScoreConfig

    data = data_dir(args)
    job = ScoreJob(
        score=ScoreConfig(bundle_dir=args.bundle, data_dir=data, state_dir=args.state_dir, as_of=args.as_of,
                          encoder=_encoder(args), threads=args.threads, triton=external_triton(args),
                          pseudonyms=Pseudonyms.load(args.pseudonym_key_file)),
        input=args.input, output=args.output, chunk_candidates=args.batch_size, engine=args.engine,
        overwrite=args.overwrite, progress=not args.no_progress, ray_address=args.ray_address,
        ray_actors=args.ray_actors, ray_cpus_per_actor=args.ray_cpus_per_actor,
    )
    summary = run_score_job(job)
    summary["computed"] = len(summary["computed"])
    print(json.dumps(summary, indent=2))
    return 0


def cmd_embed_catalog(args) -> int:
    from serving.batch.catalog_embed import embed_catalog

    summary = asyncio.run(embed_catalog(args.bundle, data_dir(args), args.state_dir, encoder=_encoder(args),
                                        chunk_size=args.chunk_size, progress=not args.no_progress,
                                        threads=args.threads, triton=external_triton(args)))
    print(json.dumps(summary, indent=2))
    return 0


def _encoder(args) -> str:
    """--triton-url means the Triton encoder (an explicit --encoder inprocess beside it is an error)."""
    if args.triton_url is None:
        return args.encoder or "inprocess"
    if args.encoder == "inprocess":
        from featurizer.errors import ConfigError

        raise ConfigError("--triton-url goes with --encoder triton (or no --encoder), not --encoder inprocess")
    return "triton"


def _common(s: argparse.ArgumentParser) -> None:
    s.add_argument("--bundle", required=True, type=Path, help="bundle directory")
    s.add_argument("--data", type=Path, default=None,
                   help="data directory the online state starts from (default: the bundle's training data)")
    s.add_argument("--state-dir", type=Path, default=Path("semrank-state"),
                   help="the service's state directory: event log, feature snapshot, item embeddings "
                        "(default: ./semrank-state, as semrank serve)")
    s.add_argument("--encoder", choices=("inprocess", "triton"), default=None,
                   help="inprocess: the encoder in this process (default); triton: a Triton child process, as the "
                        "service, or the one --triton-url names")
    add_triton_args(s)
    s.add_argument("--threads", type=int, default=None, help="torch threads of the in-process encoder")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "score", help="batch-score a parquet file of candidates with the service's features and model",
        description="Scores requests from a parquet file with the same engine as `semrank serve` (features read "
                    "at one instant, --as-of) and writes OUT/part-<chunk>.parquet plus OUT/_manifest.json. Input: "
                    "rows (user_id, item_id[, request_id][, title, category, ...]); a request is a run of "
                    "consecutive rows with the same request_id (else user_id); or lists (user_id, item_ids). "
                    "A rerun resumes by chunk. See docs/batch_scoring.md.")
    _common(s)
    s.add_argument("--input", required=True, type=Path, help="parquet file, or a directory of parquet files")
    s.add_argument("--output", required=True, type=Path, help="output directory (OUT.parquet/part-*.parquet)")
    s.add_argument("--engine", choices=("local", "ray"), default="local")
    s.add_argument("--batch-size", type=int, default=100_000, metavar="N",
                   help="candidates per chunk (whole requests; default 100000): bounds memory and is the resume unit")
    s.add_argument("--as-of", type=_as_of, default=None, metavar="ISO",
                   help="read features as of this instant (UTC if no zone); default: the state's latest event + 1 µs")
    s.add_argument("--overwrite", action="store_true",
                   help="delete the output's parts when they belong to another job (bundle, as-of, input, chunking)")
    s.add_argument("--ray-address", default=None, help="Ray cluster to join (e.g. auto); default: a local Ray")
    s.add_argument("--ray-actors", type=int, default=2, help="scoring actors (default 2)")
    s.add_argument("--ray-cpus-per-actor", type=float, default=1.0)
    s.add_argument("--pseudonym-key-file", type=Path, default=None,
                   help="the serving state's pseudonym key (default: $SEMRANK_PSEUDONYM_KEY, else off): input user ids "
                        "are mapped to the stored ids before their features are read; the output keeps the input's ids")
    s.set_defaults(func=cmd_score)

    s = sub.add_parser(
        "embed-catalog", help="embed the catalog items the bundle's encoder lacks, into the state directory",
        description="Embeds missing or stale catalog items (data dir + upserted items) with the bundle's encoder, in "
                    "chunks persisted as they finish (an interrupted run resumes); a server on the same state "
                    "directory then embeds nothing at start.")
    _common(s)
    s.add_argument("--chunk-size", type=int, default=4096, help="items per persisted chunk (default 4096)")
    s.set_defaults(func=cmd_embed_catalog)
