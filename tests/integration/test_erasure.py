"""Erasure on a real server and the CLI (issue 18 item 3): a user who logged events and was ranked
is erased with `semrank privacy delete-user` while the server is stopped; after the restart their
Ranks carry a never-seen user's personal features, their new events are refused, and the event
log, the exposures and the erasure list hold no trace of their id (with a pseudonym key: neither
the id nor the pseudonym)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import grpc
import numpy as np
import pytest

from featurizer.privacy import Pseudonyms
from semrank.ranking.v1 import ranking_service_pb2 as pb
from serving.config import ServeConfig
from tests.integration.production_kit import RPC_TIMEOUT_S, contributions, rank, stub, timestamp
from tests.integration.serving_kit import ServerThread

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

CANARY = "erase-me-canary-7f3a"


def log_events(channel, user: str, items: list[str], prefix: str) -> pb.LogEventsResponse:
    now = datetime.now(timezone.utc) - timedelta(seconds=1)
    evs = [pb.Event(event_id=f"{prefix}-{k}", ts=timestamp(now), user_id=user, item_id=i, type=pb.EVENT_TYPE_PURCHASE)
           for k, i in enumerate(items)]
    return stub(channel).LogEvents(iter([pb.LogEventsRequest(events=evs)]), timeout=RPC_TIMEOUT_S)


def test_delete_user_then_restart_leaves_no_trace_and_refuses_the_users_events(small_shop, small_bundle, catalog,
                                                                               tmp_path):
    from semrank.cli import main

    key_file = tmp_path / "pseudonym.key"
    key_file.write_bytes(b"k" * 32)
    names = Pseudonyms.load(key_file)
    state = tmp_path / "state"
    cfg = ServeConfig(bundle_dir=small_bundle[0], data_dir=small_shop, state_dir=state, port=0, reload_poll_s=0,
                      pseudonyms=names)
    shown = catalog[:20]
    with ServerThread(cfg) as st, grpc.insecure_channel(f"127.0.0.1:{st.port}") as channel:
        assert log_events(channel, CANARY, catalog[:4], "c").accepted == 4
        assert log_events(channel, "keeper", catalog[4:6], "k").accepted == 2
        before = contributions(rank(channel, CANARY, shown, explain=True), "personal")
        cold = contributions(rank(channel, "never-seen-user", shown, explain=True), "personal")
        assert not np.allclose([before[i] for i in shown], [cold[i] for i in shown], atol=1e-6)  # it had data
        st.stop()

    assert main(["privacy", "delete-user", "--state-dir", str(state), "--user", CANARY, "--requested-by", "ticket-1",
                 "--pseudonym-key-file", str(key_file)]) == 0
    stored = names(CANARY)
    for path in [p for p in state.rglob("*") if p.is_file() and "embeddings" not in p.parts]:
        blob = path.read_bytes()
        assert CANARY.encode() not in blob and stored.encode() not in blob, path

    with ServerThread(cfg) as st, grpc.insecure_channel(f"127.0.0.1:{st.port}") as channel:
        after = contributions(rank(channel, CANARY, shown, explain=True), "personal")
        cold = contributions(rank(channel, "never-seen-user", shown, explain=True), "personal")
        np.testing.assert_allclose([after[i] for i in shown], [cold[i] for i in shown], atol=1e-9)
        again = log_events(channel, CANARY, catalog[:1], "again")
        assert again.accepted == 0 and again.rejected == 1 and "erased" in again.rejections[0].reason
        assert log_events(channel, "keeper", catalog[6:7], "k2").accepted == 1  # everyone else as before
