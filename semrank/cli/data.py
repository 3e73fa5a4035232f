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
    if args.format == "interactions":
        from training.data.interactions import InteractionFormat, import_interactions

        if args.name is not None or args.interactions is None or args.items is None:
            raise ValueError("--format interactions takes --interactions FILE and --items FILE, and no dataset name")
        fmt = InteractionFormat(
            user=args.user_column, item=args.item_column, ts=args.ts_column, ts_unit=args.ts_unit,
            event=args.event_column, event_map=dict(_pair(m, "--event-map") for m in args.event_map),
            order=args.order_column, item_id=args.items_id_column or args.item_column, title=args.title_column,
            unescape_html=args.unescape_html, description=args.description_column, category=args.category_column,
            brand=args.brand_column, price=args.price_column)
        summary = import_interactions(args.interactions, args.items, args.out, fmt)
        print(json.dumps(summary, indent=2, default=str))
        return 0
    from training.data.importers import import_dataset

    if args.name is None:
        raise ValueError("name a dataset (amazon-beauty-2014 | ...), or use --format interactions")
    summary = import_dataset(args.name, args.out, args.shared)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_data_validate(args) -> int:
    from featurizer.contracts.schema import read_dataset

    ds = read_dataset(args.data)
    print(f"items: {ds.items.height}, events: {ds.events.height}; {ds.report}")
    return 0


def _pair(text: str, flag: str) -> tuple[str, str]:
    raw, sep, to = text.partition("=")
    if not sep or not raw or not to:
        raise ValueError(f"{flag} {text!r}: RAW=TYPE")
    return raw, to


def register(sub) -> None:
    data = sub.add_parser("data", help="create, import and validate datasets").add_subparsers(dest="data_cmd", required=True)
    s = data.add_parser("synth", help="generate a synthetic shop with ground truth")
    s.add_argument("--out", required=True, type=Path, help="output directory")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--users", type=int, default=1500)
    s.add_argument("--items", type=int, default=800)
    s.add_argument("--days", type=int, default=28)
    s.set_defaults(func=cmd_data_synth)
    s = data.add_parser("import", help="convert a dataset from ../shared/data, or any interaction log, to the data "
                                       "contract")
    s.add_argument("name", nargs="?", default=None,
                   help="amazon-beauty-2014 | amazon-toys-2014 | movielens-1m | movielens-latest-small (--format named)")
    s.add_argument("--out", required=True, type=Path)
    s.add_argument("--shared", type=Path, default=None, help="folder holding the shared datasets (default ../shared/data)")
    s.add_argument("--format", choices=["named", "interactions"], default="named",
                   help="named: a shared dataset; interactions: a table of user, item, timestamp (CSV, TSV or parquet) "
                        "plus an items table with a title (training/data/interactions.py)")
    i = s.add_argument_group("--format interactions")
    i.add_argument("--interactions", type=Path, help="the interaction log")
    i.add_argument("--items", type=Path, help="the items table (an id and a title per item)")
    i.add_argument("--user-column", default="user_id")
    i.add_argument("--item-column", default="item_id")
    i.add_argument("--ts-column", default="timestamp")
    i.add_argument("--ts-unit", default="auto", choices=["auto", "s", "ms", "us"],
                   help="numeric timestamps: seconds, ms or µs since the epoch (auto: by magnitude); text is ISO 8601")
    i.add_argument("--event-column", default=None, help="the event type (default: every interaction is a purchase)")
    i.add_argument("--event-map", action="append", default=[], metavar="RAW=TYPE",
                   help="map the log's event name RAW to a contract type (impression, click, add_to_cart, purchase); "
                        "repeatable")
    i.add_argument("--order-column", default=None,
                   help="each user's sequence order (same-timestamp ties); default: timestamp, then file order")
    i.add_argument("--items-id-column", default=None, help="the item id in the items table (default: --item-column)")
    i.add_argument("--title-column", default="title")
    i.add_argument("--description-column", default=None)
    i.add_argument("--category-column", default=None)
    i.add_argument("--brand-column", default=None)
    i.add_argument("--price-column", default=None, help="in the items table, else the item's latest price in the log")
    i.add_argument("--unescape-html", action="store_true", help="titles and descriptions: HTML entities to characters")
    s.set_defaults(func=cmd_data_import)
    s = data.add_parser("validate", help="check a data directory against the data contract")
    s.add_argument("data", type=Path)
    s.set_defaults(func=cmd_data_validate)
