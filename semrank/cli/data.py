"""`semrank data synth | import | validate`: make, import and check data directories."""

from __future__ import annotations

import json
from pathlib import Path


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


def register(sub) -> None:
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
