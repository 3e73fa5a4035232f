"""Erasure of shoppers on request (issue 18 item 3): the suppression list and the erasure record.

    erasures = Erasures.open(state_dir, pseudonyms)        # STATE/privacy/erasures.jsonl
    erasures.record(stored_ids, requested_by, removed)     # who asked, when: keyed hashes only
    stored_id in erasures                                  # refused wherever events come in
    erasures.filter_events(frame)                          # a data directory's events without them

The list never holds a user id, raw or stored: each line is a keyed hash of the erased user's
stored id (`e1_` and 32 hex digits), who asked, when, and what was removed. The key is derived from
the pseudonym key when one is configured (featurizer.privacy); without one, it is a random key made
at the first erasure, `STATE/privacy/erasure.key` (mode 0600), which must stay with the list: the
hash then only keeps the list from naming users to whoever reads it without the key. The list is
what keeps an erased user from coming back: the restore drops their events from the data directory
(an export made before the erasure), and LogEvents refuses new ones (`user_id: erased`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path

import polars as pl

from featurizer.errors import ConfigError
from featurizer.privacy import Pseudonyms

PRIVACY_DIR = "privacy"
LIST_FILE = "erasures.jsonl"
KEY_FILE = "erasure.key"
PREFIX = "e1_"
_KEY_LABEL = b"semrank erasure list key v1"


class Erasures:
    def __init__(self, path: Path, key: bytes | None, hashes: set[str], fleet: bool = False):
        self.path, self._key, self._hashes = path, key, hashes
        # The key derives from the pseudonym key, which a fleet's replicas agree on: their hashes
        # of one user are equal, so a fleet can share its list (serving.ingest.control).
        self.fleet = fleet

    @classmethod
    def open(cls, state_dir: str | Path, pseudonyms: Pseudonyms = Pseudonyms(), create: bool = False) -> Erasures:
        """The state directory's list (empty when there is none). `create`: make the key a keyless
        service needs for its first erasure (an erasure job does; a server, at its first DeleteUser:
        `ensure_key`)."""
        d = Path(state_dir) / PRIVACY_DIR
        path = d / LIST_FILE
        key = pseudonyms.derived_key(_KEY_LABEL)
        if key is None:
            key_file = d / KEY_FILE
            if key_file.exists():
                key = bytes.fromhex(key_file.read_text().strip())
            elif create:
                key = _make_key(key_file)
        hashes: set[str] = set()
        if path.exists():
            if key is None:
                raise ConfigError(f"{path}: an erasure list without its key ({d / KEY_FILE}) or a pseudonym key: "
                                  "erased users could not be recognised")
            for line in path.read_text().splitlines():
                if line.strip():
                    hashes.add(json.loads(line)["user"])
        return cls(path, key, hashes, fleet=pseudonyms.enabled)

    def ensure_key(self) -> None:
        """Make the list's key file if this list has no key yet (see `open`)."""
        if self._key is None:
            self._key = _make_key(self.path.parent / KEY_FILE)

    def hash(self, stored_id: str) -> str:
        if self._key is None:
            raise ConfigError("no erasure key: open the list with create=True before recording an erasure")
        return PREFIX + hmac.new(self._key, stored_id.encode(), hashlib.sha256).hexdigest()[:32]

    def __contains__(self, stored_id: str) -> bool:
        return bool(self._hashes) and self.hash(stored_id) in self._hashes

    def __len__(self) -> int:
        return len(self._hashes)

    def erased_ids(self, stored_ids: Iterable[str]) -> set[str]:
        """Those of `stored_ids` that were erased."""
        if not self._hashes:
            return set()
        return {u for u in set(stored_ids) if self.hash(u) in self._hashes}

    def filter_events(self, frame: pl.DataFrame) -> pl.DataFrame:
        """`frame` (with a user_id column of stored ids) without the events of erased users."""
        gone = self.erased_ids(frame["user_id"].unique().to_list()) if frame.height else set()
        return frame.filter(~pl.col("user_id").is_in(list(gone))) if gone else frame

    @property
    def hashes(self) -> frozenset[str]:
        return frozenset(self._hashes)

    def add(self, hashes: Iterable[str]) -> None:
        """Suppress the users of `hashes` (`hash` of their stored ids) in this process from now on,
        before the erasure is recorded (a running server's DeleteUser: their events are refused
        while they are erased)."""
        self._hashes.update(hashes)

    def record(self, stored_ids: Iterable[str], requested_by: str, removed: dict) -> list[str]:
        """Append one line per user (fsynced): the keyed hash, who asked, when, what was removed.
        Returns the hashes."""
        hashes = [self.hash(u) for u in dict.fromkeys(stored_ids)]
        self.record_hashes([{"user": h, "requested_by": requested_by} for h in hashes], removed)
        return hashes

    def record_hashes(self, entries: Iterable[dict], removed: dict) -> None:
        """`record` for users known by their hash (`entries`: {"user", "requested_by"[, "at"]}, as a
        fleet's list gives them)."""
        now = datetime.now(timezone.utc).isoformat()
        entries = list(entries)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            for e in entries:
                f.write(json.dumps({"user": e["user"], "requested_by": e["requested_by"], "at": e.get("at", now),
                                    "removed": removed}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._hashes.update(e["user"] for e in entries)


def _make_key(key_file: Path) -> bytes:
    """A random key, written to `key_file` (mode 0600; never over an existing one)."""
    key_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        key = secrets.token_bytes(32)
        f.write(key.hex() + "\n")
        f.flush()
        os.fsync(f.fileno())
    return key
