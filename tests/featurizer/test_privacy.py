"""Pseudonymous user ids (featurizer.privacy): the keyed hash, its key's sources and limits, and the
state directory's record of the key."""

from __future__ import annotations

import json

import polars as pl
import pytest

from featurizer.errors import ConfigError
from featurizer.privacy import KEY_ENV, PREFIX, STATE_FILE, Pseudonyms, check_state

KEY = b"k" * 32


def test_the_hash_is_keyed_stable_and_of_one_shape():
    names, other = Pseudonyms(KEY), Pseudonyms(b"j" * 32)
    a = names("alice")
    assert a == names("alice") and a != names("bob") and a != other("alice")
    assert a.startswith(PREFIX) and len(a) == len(PREFIX) + 32 and "alice" not in a
    assert Pseudonyms()("alice") == "alice" and not Pseudonyms().enabled
    assert names.fingerprint != other.fingerprint and KEY.decode() not in names.fingerprint


def test_the_key_comes_from_a_file_or_the_environment_and_is_long_enough(tmp_path):
    (tmp_path / "k").write_bytes(KEY + b"\n")
    assert Pseudonyms.load(tmp_path / "k", environ={})("a") == Pseudonyms(KEY)("a")  # the newline is not key
    assert Pseudonyms.load(None, environ={KEY_ENV: KEY.decode()})("a") == Pseudonyms(KEY)("a")
    assert not Pseudonyms.load(None, environ={}).enabled
    with pytest.raises(ConfigError, match="at least 32"):
        Pseudonyms(b"short")
    with pytest.raises(ConfigError, match="cannot read"):
        Pseudonyms.load(tmp_path / "missing", environ={})


def test_an_events_frame_is_mapped_user_by_user():
    frame = pl.DataFrame({"user_id": ["a", "b", "a"], "item_id": ["i1", "i2", "i3"]})
    names = Pseudonyms(KEY)
    mapped = names.events(frame)
    assert mapped["user_id"].to_list() == [names("a"), names("b"), names("a")]
    assert mapped["item_id"].to_list() == frame["item_id"].to_list()
    assert Pseudonyms().events(frame) is frame


def test_the_state_directory_keeps_to_one_key(tmp_path):
    names = Pseudonyms(KEY)
    (tmp_path / "new").mkdir()
    check_state(tmp_path / "new", names, holds_data=False)
    assert json.loads((tmp_path / "new" / STATE_FILE).read_text()) == {"fingerprint": names.fingerprint}
    check_state(tmp_path / "new", names, holds_data=True)  # the same key again
    with pytest.raises(ConfigError, match="another key|fingerprint") as e:
        check_state(tmp_path / "new", Pseudonyms(b"j" * 32), holds_data=True)
    assert "docs/privacy.md" in str(e.value)
    with pytest.raises(ConfigError, match="this server has no key"):
        check_state(tmp_path / "new", Pseudonyms(), holds_data=True)
    # State from before the record held ids as given: fine without a key (and recorded), refused with one.
    (tmp_path / "old").mkdir()
    with pytest.raises(ConfigError, match="no key \\(user ids stored as given\\)"):
        check_state(tmp_path / "old", names, holds_data=True)
    check_state(tmp_path / "old", Pseudonyms(), holds_data=True)
    assert json.loads((tmp_path / "old" / STATE_FILE).read_text()) == {"fingerprint": None}
