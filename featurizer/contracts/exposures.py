"""The exposure log format and its one reader.

Serving writes one JSON line per Rank answer (`serving.experiments.exposure_log.ExposureLog`); `semrank ab
report` (`training.ab.prepare`) reads them. Each line has exactly these keys, in this order:

    {"ts": "2026-12-01T10:00:00.123456Z", "request_id": "...", "user_id": "...", "experiment": "...",
     "variant": "...", "bundle_version": "...", "item_ids": ["best", "second", ...]}

- `ts` is the server's UTC time of the Rank, always with 6 fractional digits (`TS_FORMAT`);
- every other key is a string, `item_ids` a list of strings (as returned, best first);
- `experiment` and `variant` are "" for users in no experiment, so the log doubles as an impression log.
- An interleaved arm's line has one more key at the end, `"teams": ["A", "B", ...]`: each item's team
  (`featurizer.contracts.interleaving`), aligned with `item_ids`. Other lines never carry it; the
  reader gives them an empty `teams`.

Files are `exposures-<UTC yyyymmddTHHMMSS>-<seq>.jsonl` (`FILE_GLOB` finds them). A writer only
appends to a file it created itself and never reopens an older one; a new process starts a new file.

Torn lines: a file's last line that lacks its newline and does not parse is a write cut short (the
writer is mid-write, or crashed). Since no writer ever appends to that file again, such a line is
skipped, counted and logged in *any* file, not only the newest. Every other bad line raises
`ExposureLogError` naming the file and the 1-based line.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from featurizer.errors import SemrankError

log = logging.getLogger(__name__)

FILE_PREFIX = "exposures-"
FILE_SUFFIX = ".jsonl"
FILE_GLOB = f"{FILE_PREFIX}*{FILE_SUFFIX}"
TS_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"  # datetime.strftime; the writer's format
TS_EXAMPLE = "2026-12-01T10:00:00.123456Z"
_TS_PATTERN = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$"
_TS_POLARS = "%Y-%m-%dT%H:%M:%S%.6fZ"
KEYS = ("ts", "request_id", "user_id", "experiment", "variant", "bundle_version", "item_ids")
_KEY_SET = frozenset(KEYS)
TEAMS = "teams"  # the optional last key of an interleaved arm's line
_KEY_SET_TEAMS = _KEY_SET | {TEAMS}
SCHEMA = pl.Schema(
    {
        "ts": pl.Datetime("us", "UTC"),
        "request_id": pl.String,
        "user_id": pl.String,
        "experiment": pl.String,
        "variant": pl.String,
        "bundle_version": pl.String,
        "item_ids": pl.List(pl.String),
        "teams": pl.List(pl.String),
    }
)


class ExposureLogError(SemrankError, ValueError):
    """A line of an exposure file is not a valid exposure record; the message names file:line."""

    grpc_code = "INVALID_ARGUMENT"
    reason = "EXPOSURE_LOG_INVALID"


@dataclass(frozen=True)
class ExposureRead:
    frame: pl.DataFrame  # SCHEMA, rows in file order, files in name order
    files: list[Path]  # the files read
    torn_lines: list[tuple[Path, int]]  # (file, 1-based line) skipped as torn writes


def exposure_files(path: Path | str) -> list[Path]:
    """`path` itself if it is a file, else the `exposures-*.jsonl` files in the directory, sorted by name
    (possibly none). Raises FileNotFoundError when `path` does not exist."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such exposure file or directory")
    return sorted(path.glob(FILE_GLOB)) if path.is_dir() else [path]


def read_exposures(path: Path | str) -> pl.DataFrame:
    """Read one exposure file, or every exposures-*.jsonl in a directory (in name order); see read_exposures_report."""
    return read_exposures_report(path).frame


def read_exposures_report(path: Path | str) -> ExposureRead:
    """Like read_exposures, also returning the files read and the torn lines skipped.

    A directory without exposure files reads as an empty frame. Rows keep file order; nothing is
    sorted or deduplicated here (callers decide, e.g. `training.ab.prepare.read_exposures`).
    """
    files = exposure_files(path)
    cols: dict[str, list] = {k: [] for k in (*KEYS, TEAMS)}
    where: list[tuple[Path, int]] = []
    torn: list[tuple[Path, int]] = []
    for f in files:
        lines = f.read_bytes().split(b"\n")
        unterminated = lines.pop()  # b"" when the file ends with a newline
        for n, line in enumerate(lines, 1):
            _append(cols, _parse_line(line, f, n), f, n)
            where.append((f, n))
        if unterminated:
            n = len(lines) + 1
            try:
                obj = json.loads(unterminated)
            except ValueError:
                torn.append((f, n))
                continue
            _append(cols, _parse_line(unterminated, f, n, obj), f, n)
            where.append((f, n))
    if torn:
        log.warning("skipped %d torn exposure lines (writes cut short): %s", len(torn),
                    ", ".join(f"{p}:{n}" for p, n in torn))
    raw = pl.DataFrame(cols, schema={**SCHEMA, "ts": pl.String})
    ts = raw["ts"].str.strptime(SCHEMA["ts"], _TS_POLARS, strict=False)
    bad = ts.is_null() | ~raw["ts"].str.contains(_TS_PATTERN)
    if bad.any():
        k = int(bad.arg_true()[0])
        f, n = where[k]
        raise ExposureLogError(f"{f}:{n}: ts must look like {TS_EXAMPLE} (UTC, 6 fractional digits), "
                               f"got {raw['ts'][k]!r}")
    return ExposureRead(raw.with_columns(ts=ts), files, torn)


def _parse_line(line: bytes, f: Path, n: int, obj: object = None) -> dict:
    if obj is None:
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise ExposureLogError(f"{f}:{n}: not valid JSON ({e})") from e
    if not isinstance(obj, dict) or obj.keys() not in (_KEY_SET, _KEY_SET_TEAMS):
        got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise ExposureLogError(f"{f}:{n}: expected exactly the keys {list(KEYS)} (and {TEAMS!r} for an interleaved "
                               f"arm), got {got}")
    return obj


def _append(cols: dict[str, list], obj: dict, f: Path, n: int) -> None:
    for k in KEYS[:-1]:
        if type(obj[k]) is not str:
            raise ExposureLogError(f"{f}:{n}: {k} must be a string")
        cols[k].append(obj[k])
    ids = obj["item_ids"]
    if type(ids) is not list or not all(type(i) is str for i in ids):
        raise ExposureLogError(f"{f}:{n}: item_ids must be a list of strings")
    cols["item_ids"].append(ids)
    teams = obj.get(TEAMS, [])
    if type(teams) is not list or (teams and (len(teams) != len(ids) or not all(t in ("A", "B") for t in teams))):
        raise ExposureLogError(f"{f}:{n}: teams must be a list of \"A\" / \"B\", one per item of item_ids")
    cols[TEAMS].append(teams)


# --------------------------------------------------------------------------- records that never made it

LOSSES_PREFIX = "exposure-losses-"
LOSSES_GLOB = f"{LOSSES_PREFIX}*.json"  # not FILE_GLOB: the exposure reader never sees them


def losses_file_name(stamp: str, pid: int) -> str:
    """One file per writer (process start stamp and pid), replaced as its counts grow:
    {"dropped": {"<experiment>\\t<variant>": n}, "failed": {...}}. `dropped`: refused while the writer
    was behind (or after close); `failed`: lost to write errors."""
    return f"{LOSSES_PREFIX}{stamp}-{pid}.json"


def read_losses(path: str | Path) -> dict[tuple[str, str], int]:
    """Exposures lost before reaching the log, per (experiment, variant), summed over every writer's
    losses file in `path` (a directory; a file's directory). Unreadable files raise ExposureLogError."""
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    out: dict[tuple[str, str], int] = {}
    for f in sorted(directory.glob(LOSSES_GLOB)):
        try:
            data = json.loads(f.read_text())
            for kind in ("dropped", "failed"):
                for key, n in data.get(kind, {}).items():
                    experiment, _, variant = key.partition("\t")
                    out[experiment, variant] = out.get((experiment, variant), 0) + int(n)
        except (ValueError, TypeError, AttributeError) as e:
            raise ExposureLogError(f"{f}: not an exposure losses file ({e})") from e
    return out
