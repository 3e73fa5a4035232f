"""`semrank`: the command line. Every subcommand has --help.

One module per command group, each with `register(subparsers)`; heavy imports stay inside the
command functions, so `semrank --help` is fast. Errors: a `featurizer.errors.SemrankError` (and
the usage errors ValueError / FileNotFoundError) is printed as one line and the command exits
with status 2; `-v` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from featurizer.errors import SemrankError

# Command groups, in the order `semrank --help` lists them.
COMMAND_MODULES = ("data", "train", "serve", "score", "evaluate", "export", "ab", "privacy", "demo")
USAGE_ERRORS = (SemrankError, ValueError, FileNotFoundError)
EXIT_USAGE = 2


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="semrank", description="Text-semantic ranking service for e-commerce.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, and tracebacks of errors")
    sub = p.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"semrank.cli.{name}").register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    # Before torch loads OpenMP: busy-waiting threads made encoding up to 10x slower on shared
    # 2-core machines (bench/encoder.py); an explicit setting in the environment wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    args.raw_argv = list(argv if argv is not None else sys.argv[1:])  # (serve --workers passes them on)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except USAGE_ERRORS as e:
        if args.verbose:
            raise
        print(f"semrank {_command(args)}: {e}", file=sys.stderr)
        return EXIT_USAGE


def _command(args: argparse.Namespace) -> str:
    """The subcommand's words, e.g. "train ranker"."""
    words = [args.command]
    for key in ("data_cmd", "train_cmd", "ab_cmd", "export_cmd"):
        if getattr(args, key, None):
            words.append(getattr(args, key))
    return " ".join(words)


if __name__ == "__main__":
    sys.exit(main())
