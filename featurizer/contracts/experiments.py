"""A/B experiments on the ranking surface: the experiments file and deterministic user assignment.

An experiments file (TOML, or JSON with the same shape) lists experiments, each with a salt, a
[start, end) window and variants that split users by share:

    [[experiment]]
    name = "encoder-ft-vs-frozen"
    salt = "2026-12-ft"
    start = 2026-12-01T00:00:00Z
    end = 2026-12-15T00:00:00Z
      [[experiment.variant]]
      name = "control"
      share = 0.5
      bundle = "bundles/frozen"      # relative to the experiments file's directory
      [[experiment.variant]]
      name = "holdout"
      share = 0.25
      holdout = true                 # no bundle: candidates keep the caller's order
      [[experiment.variant]]
      name = "interleaved"
      share = 0.25
      interleaved = ["bundles/frozen", "bundles/ft"]   # team A, team B: one team-draft list of both
                                                       # (featurizer.contracts.interleaving)

Assignment is a pure function of (salt, user_id): u = first 8 bytes of sha256(f"{salt}:{user_id}")
read as a big-endian unsigned integer, divided by 2**64; the user gets the first variant (in file
order) whose cumulative share exceeds u. Nothing depends on the process, Python's hash() or the
clock except the choice of which experiment is active. Only one experiment may be active at a time.
"""

from __future__ import annotations

import hashlib
import json
import math
import tomllib
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

from featurizer.errors import ConfigError

_EXPERIMENT_KEYS = {"name", "salt", "start", "end", "variant"}
_VARIANT_KEYS = {"name", "share", "bundle", "holdout", "interleaved"}
SHARE_SUM_TOLERANCE = 1e-9


class ExperimentConfigError(ConfigError):
    """The experiments file is invalid; each line names the file and the field path."""

    def __init__(self, path: Path | str, violations: list[str]):
        self.path = str(path)
        self.violations = violations
        super().__init__("\n".join(f"{self.path}: {v}" for v in violations))


@dataclass(frozen=True)
class Variant:
    name: str
    share: float
    bundle: Path | None  # resolved; None for a holdout or an interleaved arm
    holdout: bool
    interleaved: tuple[Path, Path] | None = None  # resolved (team A, team B); the list is drafted from both


@dataclass(frozen=True)
class Experiment:
    name: str
    salt: str
    start: datetime  # UTC, inclusive
    end: datetime  # UTC, exclusive
    variants: tuple[Variant, ...]

    def is_active(self, now: datetime) -> bool:
        return self.start <= _aware(now) < self.end

    def variant_for(self, user_id: str) -> Variant:
        u = assignment_unit(self.salt, user_id)
        cumulative = 0.0
        for v in self.variants:
            cumulative += v.share
            if u < cumulative:
                return v
        return self.variants[-1]  # u within float rounding of 1.0


@dataclass(frozen=True)
class Assignment:
    experiment: str
    variant: str
    bundle: Path | None
    holdout: bool
    interleaved: tuple[Path, Path] | None = None
    salt: str = ""  # the experiment's: an interleaved arm's coins come from (salt, request_id)


@dataclass(frozen=True)
class Experiments:
    experiments: tuple[Experiment, ...] = ()
    source: Path | None = None

    def active(self, now: datetime) -> Experiment | None:
        """The experiment whose [start, end) contains `now` (windows never overlap), else None."""
        now = _aware(now)
        return next((e for e in self.experiments if e.is_active(now)), None)

    def assign(self, user_id: str, now: datetime) -> Assignment | None:
        exp = self.active(now)
        if exp is None:
            return None
        v = exp.variant_for(user_id)
        return Assignment(experiment=exp.name, variant=v.name, bundle=v.bundle, holdout=v.holdout,
                          interleaved=v.interleaved, salt=exp.salt)

    def named(self, name: str) -> Experiment:
        """The experiment called `name`; ExperimentConfigError listing the names when there is none."""
        for e in self.experiments:
            if e.name == name:
                return e
        names = ", ".join(e.name for e in self.experiments) or "none"
        raise ExperimentConfigError(self.source or "<experiments>", [f"no experiment named {name!r} (found: {names})"])

    def bundles(self) -> set[Path]:
        out = {v.bundle for e in self.experiments for v in e.variants if v.bundle is not None}
        return out | {p for e in self.experiments for v in e.variants for p in (v.interleaved or ())}


def assignment_unit(salt: str, user_id: str) -> float:
    """The user's position in [0, 1) for this salt; stable across processes and machines."""
    digest = hashlib.sha256(f"{salt}:{user_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _aware(now: datetime) -> datetime:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be timezone-aware, e.g. datetime.now(timezone.utc)")
    return now


def load_experiments(path: Path | str, check_bundles: bool = True) -> Experiments:
    """Read and validate an experiments file (.toml or .json); raise ExperimentConfigError naming every bad field.

    `check_bundles` False: bundle paths are resolved but need not exist (the A/B analysis reads the
    file on a machine without the bundles)."""
    path = Path(path)
    raw = _parse(path)
    errors: list[str] = []
    experiments: list[tuple[int, Experiment]] = []  # (index in the file, experiment) for the valid ones
    if not isinstance(raw, dict):
        raise ExperimentConfigError(path, ["top level: must be a table with an `experiment` array"])
    _unknown_keys(raw, {"experiment"}, "", errors)
    items = raw.get("experiment", [])
    if not isinstance(items, list):
        errors.append("experiment: must be an array of tables ([[experiment]])")
        items = []
    for i, item in enumerate(items):
        exp = _experiment(item, f"experiment[{i}]", path.parent, errors, check_bundles)
        if exp is not None:
            experiments.append((i, exp))
    _check_across(experiments, errors)
    if errors:
        raise ExperimentConfigError(path, errors)
    return Experiments(tuple(e for _, e in experiments), path)


def _parse(path: Path) -> Any:
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".json"):
        raise ExperimentConfigError(path, [f"unsupported extension {path.suffix!r}; use .toml or .json"])
    try:
        with path.open("rb") as f:
            return tomllib.load(f) if suffix == ".toml" else json.load(f)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExperimentConfigError(path, [f"not valid {suffix[1:].upper()}: {e}"]) from e


def _unknown_keys(table: dict, allowed: set[str], where: str, errors: list[str]) -> None:
    for key in sorted(set(table) - allowed):
        field = f"{where}.{key}" if where else key
        errors.append(f"{field}: unknown key (allowed: {', '.join(sorted(allowed))})")


def _text(table: dict, key: str, where: str, errors: list[str]) -> str | None:
    value = table.get(key)
    if not isinstance(value, str) or not value.strip():
        errors.append(f"{where}.{key}: required, a non-empty string")
        return None
    return value


def _time(table: dict, key: str, where: str, errors: list[str]) -> datetime | None:
    value = table.get(key)
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            errors.append(f"{where}.{key}: {value!r} is not an ISO-8601 date-time")
            return None
    if not isinstance(value, datetime):
        kind = "missing" if value is None else type(value).__name__
        if isinstance(value, date):
            kind = "a date without a time"
        errors.append(f"{where}.{key}: required, a date-time with timezone such as 2026-12-01T00:00:00Z (got {kind})")
        return None
    if value.tzinfo is None or value.utcoffset() is None:
        errors.append(f"{where}.{key}: {value.isoformat()} has no timezone; add one, e.g. Z for UTC")
        return None
    return value.astimezone(timezone.utc)


def _experiment(item: Any, where: str, base: Path, errors: list[str], check_bundles: bool) -> Experiment | None:
    if not isinstance(item, dict):
        errors.append(f"{where}: must be a table")
        return None
    n_before = len(errors)
    _unknown_keys(item, _EXPERIMENT_KEYS, where, errors)
    name = _text(item, "name", where, errors)
    salt = _text(item, "salt", where, errors)
    start = _time(item, "start", where, errors)
    end = _time(item, "end", where, errors)
    if start is not None and end is not None and not start < end:
        errors.append(f"{where}.end: {end.isoformat()} must be after start {start.isoformat()}")
    raw_variants = item.get("variant")
    variants: list[Variant] = []
    if not isinstance(raw_variants, list) or not raw_variants:
        errors.append(f"{where}.variant: required, at least one [[experiment.variant]] table")
        raw_variants = []
    seen: dict[str, int] = {}
    for j, raw in enumerate(raw_variants):
        v = _variant(raw, f"{where}.variant[{j}]", base, errors, check_bundles)
        if v is None:
            continue
        if v.name in seen:
            errors.append(f"{where}.variant[{j}].name: duplicate variant name {v.name!r} (also variant[{seen[v.name]}])"
                          "; variant names must be unique within an experiment")
        seen.setdefault(v.name, j)
        variants.append(v)
    if variants and len(variants) == len(raw_variants):
        total = math.fsum(v.share for v in variants)
        if abs(total - 1.0) > SHARE_SUM_TOLERANCE:
            errors.append(f"{where}.variant: shares sum to {total!r}; they must sum to 1")
    if len(errors) > n_before:
        return None
    return Experiment(name, salt, start, end, tuple(variants))  # type: ignore[arg-type]


def _variant(raw: Any, where: str, base: Path, errors: list[str], check_bundles: bool) -> Variant | None:
    if not isinstance(raw, dict):
        errors.append(f"{where}: must be a table")
        return None
    n_before = len(errors)
    _unknown_keys(raw, _VARIANT_KEYS, where, errors)
    name = _text(raw, "name", where, errors)
    share = raw.get("share")
    if isinstance(share, bool) or not isinstance(share, (int, float)):
        errors.append(f"{where}.share: required, a number in (0, 1]")
    elif not (math.isfinite(share) and 0 < share <= 1):
        errors.append(f"{where}.share: must be in (0, 1] (got {share!r})")
    holdout = raw.get("holdout", False)
    if not isinstance(holdout, bool):
        errors.append(f"{where}.holdout: must be true or false")
    bundle_raw = raw.get("bundle")
    pair_raw = raw.get("interleaved")
    bundle: Path | None = None
    pair: tuple[Path, Path] | None = None
    given = (bundle_raw is not None) + (pair_raw is not None) + (holdout is True)
    if isinstance(holdout, bool) and given != 1:
        errors.append(f"{where}: needs exactly one of `bundle` (a model bundle path), `interleaved` (two bundle "
                      "paths) or `holdout = true`")
    elif bundle_raw is not None:
        bundle = _bundle_path(bundle_raw, f"{where}.bundle", base, errors, check_bundles)
    elif pair_raw is not None:
        if not isinstance(pair_raw, list) or len(pair_raw) != 2:
            errors.append(f"{where}.interleaved: must be a list of two bundle paths (team A, team B)")
        else:
            paths = [_bundle_path(x, f"{where}.interleaved[{k}]", base, errors, check_bundles)
                     for k, x in enumerate(pair_raw)]
            if None not in paths:
                if paths[0] == paths[1]:
                    errors.append(f"{where}.interleaved: both teams are {pair_raw[0]!r}; interleave two bundles")
                pair = (paths[0], paths[1])
    if len(errors) > n_before:
        return None
    return Variant(name=name, share=float(share), bundle=bundle, holdout=holdout,  # type: ignore[arg-type]
                   interleaved=pair)


def _bundle_path(raw: Any, where: str, base: Path, errors: list[str], check_bundles: bool) -> Path | None:
    if not isinstance(raw, str) or not raw.strip():
        errors.append(f"{where}: must be a non-empty path string")
        return None
    path = (base / raw).resolve()
    if check_bundles and not path.exists():
        errors.append(f"{where}: {raw!r} does not exist (resolved to {path}; "
                      "paths are relative to the experiments file's directory)")
        return None
    return path


def _check_across(experiments: list[tuple[int, Experiment]], errors: list[str]) -> None:
    first: dict[str, int] = {}
    for i, e in experiments:
        if e.name in first:
            errors.append(
                f"experiment[{i}].name: duplicate experiment name {e.name!r} (also experiment[{first[e.name]}]); "
                "the exposure log and report key on it, so give each experiment its own name"
            )
        first.setdefault(e.name, i)
    for k, (j, b) in enumerate(experiments):
        for i, a in experiments[:k]:
            if a.start < b.end and b.start < a.end:
                errors.append(
                    f"experiment[{j}].start: window [{b.start.isoformat()}, {b.end.isoformat()}) of {b.name!r} "
                    f"overlaps experiment[{i}] {a.name!r} [{a.start.isoformat()}, {a.end.isoformat()}); "
                    "only one experiment may run on the ranking surface at a time, so make the windows disjoint"
                )
