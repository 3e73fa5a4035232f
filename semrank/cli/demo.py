"""`semrank demo`: synth -> train -> serve -> rank through gRPC -> held-out table (semrank.demo)."""

from __future__ import annotations

from pathlib import Path


def cmd_demo(args) -> int:
    from semrank.demo import run_demo

    return run_demo(Path(args.workdir), seed=args.seed, users=args.users, items=args.items, days=args.days)


def register(sub) -> None:
    s = sub.add_parser("demo", help="synth -> train -> serve -> rank through gRPC -> held-out table")
    s.add_argument("--workdir", type=Path, default=Path("demo-out"))
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--users", type=int, default=1500)
    s.add_argument("--items", type=int, default=800)
    s.add_argument("--days", type=int, default=28)
    s.set_defaults(func=cmd_demo)
