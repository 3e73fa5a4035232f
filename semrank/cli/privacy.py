"""`semrank privacy delete-user`: erase shoppers from a state directory, the server stopped, or
through a running server's admin `DeleteUser` RPC (`--server`)."""

from __future__ import annotations

import argparse
import json
import os
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
    if args.server is not None:
        return _delete_on_server(args, list(dict.fromkeys(ids)))
    if args.state_dir is None:
        raise ValueError("give --state-dir STATE (the server stopped) or --server HOST:PORT (a running server)")
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


def _delete_on_server(args, ids: list[str]) -> int:
    """DeleteUser on a running server (ids as callers send them: the server maps them with its key)."""
    import grpc

    from featurizer.errors import ConfigError
    from semrank.ranking.v1 import ranking_service_pb2 as pb
    from semrank.ranking.v1 import ranking_service_pb2_grpc as pb_grpc
    from serving.config import channel_credentials

    metadata = ()
    if args.token_env is not None:
        token = os.environ.get(args.token_env)
        if not token:
            raise ConfigError(f"--token-env {args.token_env}: the variable is not set")
        metadata = (("authorization", f"Bearer {token}"),)
    channel = (grpc.secure_channel(args.server, channel_credentials(args.ca_file)) if args.ca_file is not None
               else grpc.insecure_channel(args.server))
    with channel:
        out = pb_grpc.RankingServiceStub(channel).DeleteUser(
            pb.DeleteUserRequest(user_ids=ids, requested_by=args.requested_by), timeout=args.timeout_s,
            metadata=metadata)
    print(json.dumps({"users": out.users, "events": out.events_erased, "exposures": out.exposures_erased,
                      "data_events": out.data_events, "caught_up": out.events_caught_up, "seconds": out.seconds}))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    privacy = sub.add_parser("privacy", help="shoppers' data: erasure on request").add_subparsers(
        dest="privacy_cmd", required=True)
    s = privacy.add_parser(
        "delete-user", help="erase users from a state directory (the server stopped) or a running server",
        description="Replaces the users' events in the event log by nulls, removes their exposure records, "
                    "deletes the feature snapshot (the next start rebuilds the features without them) and records "
                    "the erasure as keyed hashes (STATE/privacy/erasures.jsonl), which keeps their events in the "
                    "data directory and new ones from coming back (docs/privacy.md). With --server, a running "
                    "server does the same through its admin DeleteUser RPC and rebuilds its features beside the "
                    "serving ones.")
    s.add_argument("--state-dir", type=Path, default=None, help="the server's --state-dir (the server stopped)")
    s.add_argument("--server", default=None, metavar="HOST:PORT",
                   help="a running server: erase through its DeleteUser RPC (admin) instead of --state-dir")
    s.add_argument("--token-env", default=None, metavar="VAR", help="with --server: the variable holding an admin token")
    s.add_argument("--ca-file", type=Path, default=None, help="with --server: TLS, trusting this CA")
    s.add_argument("--timeout-s", type=float, default=900.0,
                   help="with --server: the call's deadline (the rebuild replays the event log; default 900)")
    s.add_argument("--user", action="append", default=[], metavar="ID", help="a user id as callers send it (repeatable)")
    s.add_argument("--users-file", type=Path, default=None, help="a file of user ids, one per line")
    s.add_argument("--requested-by", required=True, help="who asked (recorded with the erasure, e.g. a ticket id)")
    s.add_argument("--pseudonym-key-file", type=Path, default=None,
                   help="the server's pseudonym key (or $SEMRANK_PSEUDONYM_KEY), to find the stored ids")
    s.add_argument("--redis-url", default=None,
                   help="the server's --redis-url: its feature state there is dropped too, to be rebuilt at the next start")
    s.add_argument("--redis-namespace", default="semrank", help="the server's Redis namespace (default semrank)")
    s.set_defaults(func=cmd_delete_user)
