"""`semrank privacy delete-user`: erase shoppers from a state directory, the server stopped."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def cmd_delete_user(args) -> int:
    from featurizer.erasure import Erasures
    from featurizer.privacy import Pseudonyms
    from serving.ingest.erase import erase_users

    ids = list(args.user)
    if args.users_file is not None:
        ids += [line.strip() for line in Path(args.users_file).read_text().splitlines() if line.strip()]
    if not ids:
        raise ValueError("no user to erase: give --user ID (repeatable) or --users-file FILE")
    if not Path(args.state_dir).is_dir():
        raise FileNotFoundError(f"--state-dir {args.state_dir}: not a directory")
    names = Pseudonyms.load(args.pseudonym_key_file)
    stored = [names(u) for u in dict.fromkeys(ids)]  # the ids the state holds
    redis = None
    if args.redis_url:
        from featurizer.store.config import RedisConfig

        redis = RedisConfig(url=args.redis_url, namespace=args.redis_namespace)
    out = erase_users(args.state_dir, stored, Erasures.open(args.state_dir, names, create=True), args.requested_by,
                      redis)
    print(json.dumps(out))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    privacy = sub.add_parser("privacy", help="shoppers' data: erasure on request").add_subparsers(
        dest="privacy_cmd", required=True)
    s = privacy.add_parser(
        "delete-user", help="erase users from a state directory (the server stopped)",
        description="Replaces the users' events in the event log by nulls, removes their exposure records, "
                    "deletes the feature snapshot (the next start rebuilds the features without them) and records "
                    "the erasure as keyed hashes (STATE/privacy/erasures.jsonl), which keeps their events in the "
                    "data directory and new ones from coming back (docs/privacy.md).")
    s.add_argument("--state-dir", required=True, type=Path, help="the server's --state-dir")
    s.add_argument("--user", action="append", default=[], metavar="ID", help="a user id as callers send it (repeatable)")
    s.add_argument("--users-file", type=Path, default=None, help="a file of user ids, one per line")
    s.add_argument("--requested-by", required=True, help="who asked (recorded with the erasure, e.g. a ticket id)")
    s.add_argument("--pseudonym-key-file", type=Path, default=None,
                   help="the server's pseudonym key (or $SEMRANK_PSEUDONYM_KEY), to find the stored ids")
    s.add_argument("--redis-url", default=None,
                   help="the server's --redis-url: its feature state there is dropped too, to be rebuilt at the next start")
    s.add_argument("--redis-namespace", default="semrank", help="the server's Redis namespace (default semrank)")
    s.set_defaults(func=cmd_delete_user)
