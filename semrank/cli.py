"""The `semrank` command line (filled in as the pieces land)."""
import sys


def main(argv=None) -> int:
    print("semrank: work in progress", file=sys.stderr)
    return 2
