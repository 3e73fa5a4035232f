"""The restore path obeys the event rules (issue 30): an event in the local log that the rules
refuse (an edited or damaged log: LogEvents never stores one) is skipped at replay, never reaches
the features nor moves their clock, and the store still records the log's end."""

from __future__ import annotations

import numpy as np

from featurizer.online.features import OnlineFeatures
from featurizer.store.in_process import InProcessStore
from serving.ingest.apply import applied_seq
from serving.ingest.event_log import EventLog
from serving.ingest.log_format import LoggedEvent, events_frame
from serving.ingest.restore import restore_online
from tests.serving.ingest.apply_crash_child import ITEMS, T0_US, batch

YEAR_2100_US = 4_102_444_800_000_000


def test_refused_logged_events_are_skipped_at_replay(tmp_path):
    good = batch(0)
    bad = [LoggedEvent(YEAR_2100_US, "u1", "i1", "click", event_id="from-the-future"),
           LoggedEvent(T0_US, "u" * 10_000, "i1", "click", event_id="huge-id")]
    with EventLog(tmp_path / "events") as log:
        log.append(good[:3])
        log.append(bad[:1])
        log.append(good[3:])
        last = log.append(bad[1:])  # the log ends on a refused event
        store = InProcessStore()
        online = restore_online(store, ITEMS, events_frame([]), log.replay)
    want = OnlineFeatures(InProcessStore(), ITEMS)
    want.apply(events_frame(good))
    assert online.watermark == want.watermark  # the clock: the good events only
    users = [f"u{k}" for k in range(5)]
    for u in users:
        np.testing.assert_array_equal(online.features(u, ITEMS["item_id"].to_list(), want.watermark),
                                      want.features(u, ITEMS["item_id"].to_list(), want.watermark))
    assert applied_seq(online) == last  # past the refused ones: the next start replays nothing
