"""Erasure of users from a state directory (issue 18 item 3; featurizer/erasure.py,
serving/ingest/erase.py): the list holds keyed hashes only; the event log keeps its seqs with the
users' events nulled; exposures lose their records; the rebuilt features equal those of a log that
never held the users, for every other user."""

from __future__ import annotations

import json
import os
import stat
from datetime import timedelta

import numpy as np
import polars as pl
import pytest

from featurizer.contracts.schema import read_dataset
from featurizer.erasure import KEY_FILE, LIST_FILE, PRIVACY_DIR, Erasures
from featurizer.errors import ConfigError
from featurizer.online.features import OnlineFeatures
from featurizer.privacy import Pseudonyms
from featurizer.store.config import InProcessConfig
from featurizer.store.in_process import InProcessStore
from serving.experiments.exposure_log import Exposure, ExposureLog, erase_exposures
from serving.ingest.erase import erase_users
from serving.ingest.event_log import EventLog
from serving.ingest.log_format import LoggedEvent, events_frame, read_log
from serving.ingest.restore import build_engine

T0_US = 1_780_000_000_000_000


def test_the_list_holds_keyed_hashes_never_ids_and_recognises_them(tmp_path):
    erasures = Erasures.open(tmp_path, create=True)
    key_file = tmp_path / PRIVACY_DIR / KEY_FILE
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    hashes = erasures.record(["canary-user-1", "other"], "ticket-42", {"events": 3})
    text = (tmp_path / PRIVACY_DIR / LIST_FILE).read_text()
    assert "canary-user-1" not in text and all(h.startswith("e1_") and h in text for h in hashes)
    assert json.loads(text.splitlines()[0])["requested_by"] == "ticket-42"
    again = Erasures.open(tmp_path)  # a server reads it (and the key) later
    assert "canary-user-1" in again and "someone-else" not in again and len(again) == 2
    frame = pl.DataFrame({"user_id": ["canary-user-1", "x", "other"], "item_id": ["a", "b", "c"]})
    assert again.filter_events(frame)["user_id"].to_list() == ["x"]
    key_file.unlink()
    with pytest.raises(ConfigError, match="without its key"):
        Erasures.open(tmp_path)
    # with a pseudonym key the list's key derives from it: no key file, and another key recognises nobody
    keyed = Erasures.open(tmp_path / "keyed", Pseudonyms(b"k" * 32), create=True)
    keyed.record(["p1_abc"], "t", {})
    assert not (tmp_path / "keyed" / PRIVACY_DIR / KEY_FILE).exists()
    assert "p1_abc" in Erasures.open(tmp_path / "keyed", Pseudonyms(b"k" * 32))
    assert "p1_abc" not in Erasures.open(tmp_path / "keyed", Pseudonyms(b"j" * 32))


def logged(k: int, user: str, item: str) -> LoggedEvent:
    return LoggedEvent(T0_US + k * 1_000_000, user, item, "click", event_id=f"e{k}")


def test_the_event_log_nulls_the_users_events_and_keeps_its_seqs(tmp_path):
    log = EventLog(tmp_path / "events", fsync=False, segment_bytes=200)  # a few events per segment
    events = [logged(k, "gone" if k % 3 == 0 else f"u{k % 2}", f"i{k}") for k in range(20)]
    for k in range(0, 20, 4):
        log.append(events[k:k + 4])
    assert len(list((tmp_path / "events").glob("events-*.log"))) > 1
    assert log.erase({"gone"}) == 7
    kept = [(s, e) for s, e in log.replay()]
    assert [s for s, _ in kept] == [k + 1 for k in range(20) if k % 3]  # seqs as they were, the erased ones gone
    assert all(e.user_id != "gone" for _, e in kept)
    assert log.append([logged(20, "u0", "i20")]) == 21  # the open segment was rewritten: appends go on
    log.close()
    assert [s for s, _ in read_log(tmp_path / "events")][-1] == 21
    assert b"gone" not in b"".join(p.read_bytes() for p in (tmp_path / "events").glob("events-*.log"))
    reopened = EventLog(tmp_path / "events", fsync=False)
    assert reopened.last_seq == 21 and reopened.erase({"gone"}) == 0
    reopened.close()


def test_exposures_lose_the_users_records(tmp_path):
    with ExposureLog(tmp_path, segment_bytes=300) as exposures:
        for k in range(10):
            exposures.record(Exposure(request_id=f"r{k}", user_id="gone" if k % 2 else "stays", experiment="",
                                      variant="", bundle_version="v", item_ids=("a",)))
    assert erase_exposures(tmp_path, {"gone"}) == 5
    lines = [json.loads(x) for p in tmp_path.glob("exposures-*.jsonl") for x in p.read_text().splitlines()]
    assert len(lines) == 5 and {x["user_id"] for x in lines} == {"stays"}


def test_after_erasure_the_rebuilt_features_equal_a_log_that_never_held_the_users(small_shop, tmp_path):
    """A user of the data directory and a user of the event log are erased; the state rebuilt from
    what is left (what `semrank serve` and `semrank score` build at start) gives every other user
    and item the features of data that never held them, and the erased users a cold user's."""
    ds = read_dataset(small_shop)
    state = tmp_path / "state"
    data_user = ds.events.group_by("user_id").len().sort(["len", "user_id"])["user_id"][-1]  # the busiest
    t_end = ds.events["ts"].max()
    items = ds.items["item_id"].to_list()
    new_events = [LoggedEvent(int(t_end.timestamp() * 1e6) + k * 1_000_000, user, items[k], "purchase", event_id=f"n{k}")
                  for k, user in enumerate(["log-user", "keeper", "log-user", data_user, "keeper"])]
    built = build_engine(small_shop, state, InProcessConfig(path=str(state / "online-store.bin")))
    built.event_log.append(new_events)
    built.close()
    with ExposureLog(state / "exposures") as exposures:
        exposures.record(Exposure(request_id="r", user_id="log-user", experiment="", variant="", bundle_version="v",
                                  item_ids=("a",)))
    out = erase_users(state, [data_user, "log-user"], Erasures.open(state, create=True), "test")
    assert out["events"] == 3 and out["exposures"] == 1 and out["snapshot_deleted"]

    rebuilt = build_engine(small_shop, state, None, read_only=True)  # as batch scoring reads the state
    online = rebuilt.engine.online
    reference = OnlineFeatures(InProcessStore(), ds.items)
    reference.apply(ds.events.filter(pl.col("user_id") != data_user))
    reference.apply(events_frame([e for e in new_events if e.user_id not in (data_user, "log-user")]))
    t = reference.watermark + timedelta(seconds=1)
    assert online.watermark == reference.watermark
    others = [u for u in ds.events["user_id"].unique(maintain_order=True).to_list()[:30] if u != data_user]
    for user in [*others, "keeper"]:
        np.testing.assert_array_equal(online.features(user, items[:40], t), reference.features(user, items[:40], t))
    cold = reference.features("never-seen", items[:40], t)
    for user in (data_user, "log-user"):
        np.testing.assert_array_equal(online.features(user, items[:40], t), cold)
        assert online.sequence(user, t) == []
    assert rebuilt.erasures is not None and data_user in rebuilt.erasures
    rebuilt.close()


def test_with_redis_the_servers_namespace_is_dropped_and_no_other(tmp_path):
    import uuid

    from featurizer.store.config import RedisConfig
    from featurizer.store.redis import RedisStore

    mine, other = (RedisConfig(namespace=f"test-erase-{uuid.uuid4().hex[:8]}") for _ in range(2))
    stores = [RedisStore(mine), RedisStore(other)]
    try:
        for store in stores:
            store.write("user", {f"u{k}": {"n": k} for k in range(2500)})  # more than one DEL batch
        out = erase_users(tmp_path, ["u1"], Erasures.open(tmp_path, create=True), "test", redis=mine)
        assert out["redis_keys_deleted"] == 2500
        assert stores[0].read("user", ["u0", "u2"]) == [None, None] and stores[1].read("user", ["u2"]) == [{"n": 2}]
    finally:
        for store in stores:
            store.drop_namespace()
            store.close()
