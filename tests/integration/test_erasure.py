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


ADMIN, WRITER = "erasure-admin-token-0123456789", "erasure-writer-token-0123456789"


def test_delete_user_on_a_running_server_leaves_no_trace_now_after_a_restart_and_in_batch_scoring(
        small_shop, small_bundle, catalog, tmp_path, monkeypatch, capsys):
    """DeleteUser over gRPC (admin token): without a restart the user ranks as a stranger, their
    events are refused, their Ranks leave no exposure, and no state file holds the id or the
    pseudonym (the snapshot was rewritten); a writer token is refused; a bad request names its
    field (the CLI's `--server` makes the call). Then batch scoring on the state, and a restart, rank
    the user as a stranger too."""
    import json

    from semrank.cli import main
    from serving.batch.scorer import ScoreConfig, Scorer
    from serving.config import TokenAuth
    from serving.ranking.outcome import Candidate

    key_file = tmp_path / "pseudonym.key"
    key_file.write_bytes(b"k" * 32)
    names = Pseudonyms.load(key_file)
    state = tmp_path / "state"
    cfg = ServeConfig(bundle_dir=small_bundle[0], data_dir=small_shop, state_dir=state, port=0, reload_poll_s=0,
                      pseudonyms=names, tokens=TokenAuth.from_spec(f"{ADMIN}:admin,{WRITER}:writer"))
    shown = catalog[:20]
    admin, writer = [(("authorization", f"Bearer {t}"),) for t in (ADMIN, WRITER)]

    def personal(channel, user: str) -> list[float]:
        resp = stub(channel).Rank(pb.RankRequest(user_id=user, candidates=[pb.RankCandidate(item_id=i) for i in shown],
                                                 explain=True), timeout=RPC_TIMEOUT_S, metadata=writer)
        got = contributions(resp, "personal")
        return [got[i] for i in shown]

    def log(channel, user, items, prefix):
        now = datetime.now(timezone.utc) - timedelta(seconds=1)
        evs = [pb.Event(event_id=f"{prefix}-{k}", ts=timestamp(now), user_id=user, item_id=i, type=pb.EVENT_TYPE_PURCHASE)
               for k, i in enumerate(items)]
        return stub(channel).LogEvents(iter([pb.LogEventsRequest(events=evs)]), timeout=RPC_TIMEOUT_S, metadata=writer)

    with ServerThread(cfg) as st, grpc.insecure_channel(f"127.0.0.1:{st.port}") as channel:
        assert log(channel, CANARY, catalog[:4], "c").accepted == 4
        assert log(channel, "keeper", catalog[4:6], "k").accepted == 2
        assert not np.allclose(personal(channel, CANARY), personal(channel, "never-seen-user"), atol=1e-6)
        st.run(st.server.snapshots.persist(full=True))  # a snapshot on disk that holds the canary

        request = pb.DeleteUserRequest(user_ids=[CANARY], requested_by="ticket-9")
        with pytest.raises(grpc.RpcError) as denied:
            stub(channel).DeleteUser(request, timeout=RPC_TIMEOUT_S, metadata=writer)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as bad:
            stub(channel).DeleteUser(pb.DeleteUserRequest(user_ids=[CANARY]), timeout=RPC_TIMEOUT_S, metadata=admin)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "requested_by" in bad.value.details()
        monkeypatch.setenv("SEMRANK_TEST_ADMIN_TOKEN", ADMIN)
        capsys.readouterr()
        assert main(["privacy", "delete-user", "--server", f"127.0.0.1:{st.port}", "--token-env",
                     "SEMRANK_TEST_ADMIN_TOKEN", "--user", CANARY, "--requested-by", "ticket-9"]) == 0
        out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert (out["users"], out["events"], out["exposures"]) == (1, 4, 1) and out["data_events"] > 0

        np.testing.assert_allclose(personal(channel, CANARY), personal(channel, "never-seen-user"), atol=1e-9)
        # the others keep their own history (their values against a log that never held the canary: the
        # item popularity and co-occurrences it fed change too; tests/serving/test_live_erasure.py compares them)
        assert not np.allclose(personal(channel, "keeper"), personal(channel, "never-seen-user"), atol=1e-6)
        again = log(channel, CANARY, catalog[:1], "again")
        assert again.accepted == 0 and "erased" in again.rejections[0].reason
        assert log(channel, "keeper", catalog[6:7], "k2").accepted == 1
        st.server.state.exposures.flush()
        stored = names(CANARY)
        for path in [p for p in state.rglob("*") if p.is_file() and "embeddings" not in p.parts]:
            blob = path.read_bytes()
            assert CANARY.encode() not in blob and stored.encode() not in blob, path
        st.stop()

    cands = [Candidate(item_id=i) for i in shown]
    scorer = Scorer(ScoreConfig(small_bundle[0], small_shop, state, pseudonyms=names))
    try:
        (canary, _), (stranger, _) = scorer.score_requests([(CANARY, cands), ("never-seen-shopper", cands)])
    finally:
        scorer.close()
    np.testing.assert_allclose(canary, stranger, atol=1e-9)

    with ServerThread(cfg) as st, grpc.insecure_channel(f"127.0.0.1:{st.port}") as channel:
        np.testing.assert_allclose(personal(channel, CANARY), personal(channel, "never-seen-user"), atol=1e-9)
        assert log(channel, CANARY, catalog[:1], "again2").accepted == 0
