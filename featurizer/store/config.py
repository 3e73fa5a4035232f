"""Typed configs of the online-store backends, and parsing them from a mapping (a config file).

    store_config({"type": "redis", "url": "redis://127.0.0.1:6379/0"})  -> RedisConfig(...)

Unknown fields and wrong types fail at load, naming the field (as feast's `extra="forbid"`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal, Union

from featurizer.errors import ConfigError


class StoreConfigError(ConfigError):
    """A store config is malformed; the message names the field and the choices."""

@dataclass(frozen=True)
class InProcessConfig:
    type: Literal["inprocess"] = "inprocess"
    path: str | None = None  # None: memory only
    autoflush: bool = False  # persist after every write/delete (else at flush/close)
    # freeze (the server's periodic snapshot), a full one: write from a forked child (copy-on-write
    # pages: the parent pays the fork, ~20 ms for the bench's state, not the packing), where os.fork
    # exists. A delta is always written in process (its encoding paced by the caller).
    fork_snapshots: bool = True
    # freeze: while the keys changed since the last full snapshot are at most this fraction of all
    # keys, write only them (a delta file beside the snapshot, `<path>.delta`, replaced each time);
    # past it, or at 0, write the whole state (and drop the delta). The server's periodic snapshot
    # then writes kilobytes, not the whole state, while shoppers act.
    delta_max_fraction: float = 0.1
    # Handed-over (`Owned`) values held decoded at most: a snapshot encodes them all; past this many
    # (no snapshot for a long while, or none at all), each write encodes the oldest ones first.
    max_owned: int = 50_000

    def __post_init__(self) -> None:
        if not 0 <= self.delta_max_fraction <= 1:
            raise StoreConfigError(f"inprocess store: delta_max_fraction={self.delta_max_fraction} must be in [0, 1] "
                                   "(0: always a full snapshot)")
        if self.max_owned < 0:
            raise StoreConfigError(f"inprocess store: max_owned={self.max_owned} must be >= 0 (0: encode at every write)")


@dataclass(frozen=True)
class RedisConfig:
    type: Literal["redis"] = "redis"
    url: str = "redis://127.0.0.1:6379/0"
    namespace: str = "semrank"
    batch_size: int = 1000  # keys per MSET/MGET/DEL command inside one pipeline
    socket_timeout_s: float = 5.0


StoreConfig = Union[InProcessConfig, RedisConfig]
_CONFIGS: dict[str, type] = {"inprocess": InProcessConfig, "redis": RedisConfig}
_FIELD_TYPES: dict[str, dict[str, tuple[type, ...]]] = {
    "inprocess": {"path": (str, type(None)), "autoflush": (bool,), "fork_snapshots": (bool,),
                  "delta_max_fraction": (int, float)},
    "redis": {"url": (str,), "namespace": (str,), "batch_size": (int,), "socket_timeout_s": (int, float)},
}


def store_config(raw: Mapping[str, Any] | StoreConfig) -> StoreConfig:
    """A typed config from a mapping such as {"type": "redis", "url": ...}; unknown fields are errors."""
    if isinstance(raw, (InProcessConfig, RedisConfig)):
        return raw
    if not isinstance(raw, Mapping):
        raise StoreConfigError(f"online store config must be a mapping, got {type(raw).__name__}")
    kind = raw.get("type")
    if kind not in _CONFIGS:
        raise StoreConfigError(f"online store config: type {kind!r} is not one of {sorted(_CONFIGS)}")
    cls = _CONFIGS[kind]
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise StoreConfigError(f"online store config ({kind}): unknown field(s) {unknown}; known fields: {known}")
    for name, value in raw.items():
        expected = _FIELD_TYPES[kind].get(name)
        if expected and not (isinstance(value, expected) and not (isinstance(value, bool) and bool not in expected)):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in expected)
            raise StoreConfigError(f"online store config ({kind}): field '{name}' must be {names}, got {value!r}")
    return cls(**raw)
