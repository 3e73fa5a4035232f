"""Pseudonymous user ids (issue 18 item 1): a keyed hash maps the caller's user id to the id semrank
stores, logs and assigns A/B variants by.

    names = Pseudonyms.load(key_file=Path("secrets/pseudonym.key"))   # or $SEMRANK_PSEUDONYM_KEY
    names("alice")        # 'p1_3f0c…' (32 hex digits): the same for the same key, unrelated across keys
    names.events(frame)   # a polars frame's user_id column mapped (the data directory's events)

- **The hash**: HMAC-SHA256 under the key, the first 128 bits in hex, prefixed `p1_` (the scheme's
  version). Without the key nobody can map a pseudonym back to its user id, nor test a guessed id.
- **The key**: at least 32 bytes, from a file (`--pseudonym-key-file`; its bytes, a trailing newline
  dropped) or the environment (`SEMRANK_PSEUDONYM_KEY`). Off when neither is set: ids are stored as
  given, and `semrank serve` warns at start-up.
- **The fingerprint** (an HMAC of a fixed label under the key, 64 bits) names a key without revealing
  it. The state directory records it (`check_state`): a server refuses to start on state written
  under another key, or without one, or, with no key, on state written under one; turning
  pseudonymisation on or rotating the key means re-keying through a replay (docs/privacy.md).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
from pathlib import Path

import polars as pl

from featurizer.errors import ConfigError

KEY_ENV = "SEMRANK_PSEUDONYM_KEY"
MIN_KEY_BYTES = 32
PREFIX = "p1_"
STATE_FILE = "pseudonyms.json"
_FINGERPRINT_LABEL = b"semrank pseudonym key fingerprint v1"


_PSEUDONYM = re.compile(r"p1_[0-9a-f]{32}")


def is_pseudonym(user_id: str) -> bool:
    """Whether `user_id` has the form of a pseudonym (what a key maps ids to)."""
    return _PSEUDONYM.fullmatch(user_id) is not None


class Pseudonyms:
    """The mapping of one key, or the identity (no key)."""

    def __init__(self, key: bytes | None = None):
        if key is not None and len(key) < MIN_KEY_BYTES:
            raise ConfigError(f"the pseudonym key has {len(key)} bytes; it needs at least {MIN_KEY_BYTES} "
                              "(e.g. `head -c 32 /dev/urandom | base64 > pseudonym.key`)")
        self._key = key
        self.fingerprint = None if key is None else hmac.new(key, _FINGERPRINT_LABEL, hashlib.sha256).hexdigest()[:16]

    @classmethod
    def load(cls, key_file: Path | None = None, environ: dict[str, str] | None = None) -> Pseudonyms:
        """From `key_file` when given, else from $SEMRANK_PSEUDONYM_KEY when set, else off."""
        environ = os.environ if environ is None else environ
        if key_file is not None:
            try:
                key = Path(key_file).read_bytes().rstrip(b"\r\n")
            except OSError as e:
                raise ConfigError(f"--pseudonym-key-file {key_file}: cannot read it ({e.strerror or e})") from None
            return cls(key)
        if environ.get(KEY_ENV):
            return cls(environ[KEY_ENV].encode())
        return cls(None)

    @property
    def enabled(self) -> bool:
        return self._key is not None

    def __call__(self, user_id: str) -> str:
        if self._key is None:
            return user_id
        return PREFIX + hmac.new(self._key, user_id.encode(), hashlib.sha256).hexdigest()[:32]

    def events(self, frame: pl.DataFrame) -> pl.DataFrame:
        """`frame` with its `user_id` column mapped (each distinct id hashed once)."""
        if self._key is None or frame.is_empty():
            return frame
        ids = frame["user_id"].unique().to_list()
        return frame.with_columns(pl.col("user_id").replace_strict({u: self(u) for u in ids}, return_dtype=pl.Utf8))

    def derived_key(self, label: bytes) -> bytes | None:
        """A key for another purpose, derived from this one (None without a key): never the key itself."""
        return None if self._key is None else hmac.new(self._key, label, hashlib.sha256).digest()

    def key_for_child(self) -> str | None:
        """The key as hex, for a child process of this service over a pipe (never argv, the
        environment or a file): `Pseudonyms(bytes.fromhex(...))` there maps ids as this one does."""
        return None if self._key is None else self._key.hex()

    def describe(self) -> str:
        return f"on (key fingerprint {self.fingerprint})" if self.enabled else "off (user ids are stored as given)"


def check_state(state_dir: Path, names: Pseudonyms, holds_data: bool, record: bool = True) -> None:
    """Refuse state written under another key (or none, or with one when `names` has none), and record
    the key of new state (unless `record` is False: a read-only job). `holds_data`: the directory
    already holds stored events or features (a directory from before this record, whose ids were
    stored as given)."""
    path = Path(state_dir) / STATE_FILE
    if path.exists():
        recorded = json.loads(path.read_text()).get("fingerprint")
    elif holds_data:
        recorded = None
    else:
        recorded = names.fingerprint  # new state: this key's
    if recorded != names.fingerprint:
        have = "no key (user ids stored as given)" if recorded is None else f"the key with fingerprint {recorded}"
        want = "no key" if names.fingerprint is None else f"the key with fingerprint {names.fingerprint}"
        raise ConfigError(f"{state_dir}: its stored events and features were written with {have}, and this server "
                          f"has {want}; start with the same key, or re-key the data through a replay into a new "
                          "state directory (docs/privacy.md)")
    if record and not path.exists():
        path.write_text(json.dumps({"fingerprint": names.fingerprint}))
