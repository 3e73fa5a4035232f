"""Retention on a running server (issue 18 item 4): with `--retain-events-days` and
`--retain-exposures-days`, compaction deletes the old event-log segments the feature snapshot holds
and the old exposure files; after a restart the features still count the deleted events (the
snapshot holds them) while the log no longer yields them."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import grpc
import numpy as np
import pytest

from featurizer.contracts.exposures import FILE_GLOB
from featurizer.store.config import InProcessConfig
from featurizer.store.in_process import InProcessStore
from semrank.ranking.v1 import ranking_service_pb2 as pb
from serving.config import ServeConfig
from serving.ingest.log_format import read_log
from serving.retention import DAY_S, RetentionConfig
from tests.integration.production_kit import RPC_TIMEOUT_S, contributions, rank, stub, timestamp
from tests.integration.serving_kit import ServerThread, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


def test_compaction_deletes_old_events_and_exposures_and_the_features_keep_them(small_shop, small_bundle, catalog,
                                                                                tmp_path):
    state = tmp_path / "state"
    cfg = ServeConfig(bundle_dir=small_bundle[0], data_dir=small_shop, state_dir=state, port=0, reload_poll_s=0,
                      snapshot_interval_s=0.2, retention=RetentionConfig(events_s=DAY_S, exposures_s=DAY_S))

    def log_events(channel, user: str, items: list[str]) -> int:
        now = datetime.now(timezone.utc) - timedelta(seconds=1)
        evs = [pb.Event(event_id=f"{user}-{i}", ts=timestamp(now), user_id=user, item_id=i, type=pb.EVENT_TYPE_CLICK)
               for i in items]
        ack = stub(channel).LogEvents(iter([pb.LogEventsRequest(events=evs)]), timeout=RPC_TIMEOUT_S)
        assert ack.accepted == len(items), ack
        return ack.sequence

    def on_disk_seq() -> int:
        meta = InProcessStore(InProcessConfig(path=str(state / "online-store.bin"))).read("meta", ["event_log"])[0]
        return int(meta["seq"]) if meta else 0

    with ServerThread(cfg) as st, grpc.insecure_channel(f"127.0.0.1:{st.port}") as channel:
        server = st.server
        event_log, exposures = server.state.ingest.event_log, server.state.exposures
        event_log.segment_max_age_s = exposures.segment_max_age_s = 0.0  # every write closes the file: days in a test
        old_seq = log_events(channel, "retained-user", catalog[:3])
        rank(channel, "retained-user", catalog[:20])
        exposures.flush()
        log_events(channel, "other-user", catalog[3:5])
        rank(channel, "other-user", catalog[:20])
        exposures.flush()
        last = log_events(channel, "other-user", catalog[5:6])
        wait_until(lambda: on_disk_seq() >= last, 30, "the events in the snapshot on disk")
        wait_until(lambda: server.snapshots.persisted_seq >= last, 30, "the server to know its snapshot holds them")
        assert len(list((state / "exposures").glob(FILE_GLOB))) >= 2
        now = time.time() + 2 * DAY_S  # two days later
        done = server.retention.run_once(now)
        assert done["events"] >= old_seq and done["exposure_files"] >= 1
        assert len(list((state / "exposures").glob(FILE_GLOB))) == 1  # the open file
        left = [e for _, e in read_log(state / "events")]
        assert not any(e.user_id == "retained-user" for e in left)  # its events are out of the log
        assert server.retention.run_once(now) == {"events": 0, "exposure_files": 0}
        mine = contributions(rank(channel, "retained-user", catalog[:20], explain=True), "personal")
        st.stop()
    with ServerThread(cfg) as st, grpc.insecure_channel(f"127.0.0.1:{st.port}") as channel:
        # the restarted server's features still count them (the snapshot), and differ from a cold user's
        again = contributions(rank(channel, "retained-user", catalog[:20], explain=True), "personal")
        cold = contributions(rank(channel, "never-seen-user", catalog[:20], explain=True), "personal")
        np.testing.assert_allclose([again[i] for i in catalog[:20]], [mine[i] for i in catalog[:20]], atol=1e-6)
        assert not np.allclose([again[i] for i in catalog[:20]], [cold[i] for i in catalog[:20]], atol=1e-6)
