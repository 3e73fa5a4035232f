"""Pseudonymous user ids through a real server (issue 18 items 1 and 2): with a key, a caller's user id
is stored, logged and exposed only as its keyed hash, while the service answers as it would without
one, on every path a Rank or an event takes (ranked, degraded, rejected; logs at DEBUG, metrics,
event log, exposures, snapshots); a server refuses state written under another key, or none."""

from __future__ import annotations

import asyncio
import io
import logging
from datetime import datetime, timedelta, timezone

import grpc
import pytest

from featurizer.errors import ConfigError
from featurizer.privacy import Pseudonyms
from semrank.ranking.v1 import ranking_service_pb2 as pb
from serving.config import ServeConfig
from serving.observability.request_logging import JsonFormatter
from serving.server import RankingServer
from tests.integration.production_kit import RPC_TIMEOUT_S, rank, stub, timestamp
from tests.integration.serving_kit import ServerThread, metric, scrape_metrics

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

KEY = b"integration-test-key-of-32-bytes!"
CANARY = "canary-shopper-7f3a"


def _files_text(directory) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file())


def test_a_keyed_server_stores_logs_and_exposes_only_pseudonyms_and_ranks_as_without(
        small_shop, small_bundle, shop, catalog, tmp_path):
    names = Pseudonyms(KEY)
    shopper = shop.events["user_id"][0]  # a user of the data directory: its history is found through the hash
    items = catalog[:20]

    def cfg(state, pseudonyms):
        return ServeConfig(bundle_dir=small_bundle[0], data_dir=small_shop, state_dir=tmp_path / state, port=0,
                           reload_poll_s=0, encoder_timeout_s=30.0, snapshot_interval_s=0, pseudonyms=pseudonyms,
                           metrics_port=0)

    logs = io.StringIO()
    handler = logging.StreamHandler(logs)
    handler.setFormatter(JsonFormatter())  # what `semrank serve --log-json` writes: the request's fields too
    root = logging.getLogger()
    root.addHandler(handler)
    # Every record at DEBUG, whatever earlier tests or libraries in this process set (levels, a
    # dictConfig that disabled existing loggers, logging.disable): the server's DEBUG line of each Rank
    # carries the request's user id field.
    names_ = ["", "serving", "serving.api", "serving.api.service"]
    names_ += [n for n in logging.root.manager.loggerDict if n.startswith(("serving.", "featurizer."))]
    saved = {n: (logging.getLogger(n).level, logging.getLogger(n).disabled) for n in dict.fromkeys(names_)}
    disabled = logging.root.manager.disable
    logging.disable(logging.NOTSET)
    for n in saved:
        logging.getLogger(n).setLevel(logging.DEBUG)
        logging.getLogger(n).disabled = False
    try:
        now = datetime.now(timezone.utc)  # both servers rank at this instant: time-dependent features agree
        with ServerThread(cfg("plain", Pseudonyms()), clock=lambda: now) as st, \
                grpc.insecure_channel(f"127.0.0.1:{st.port}") as channel:
            plain = rank(channel, shopper, items, top_k=20)
        with ServerThread(cfg("keyed", names), clock=lambda: now) as st, \
                grpc.insecure_channel(f"127.0.0.1:{st.port}") as channel:
            keyed = rank(channel, shopper, items, top_k=20)
            logged = stub(channel).LogEvents(iter([pb.LogEventsRequest(events=[
                pb.Event(ts=timestamp(now - timedelta(seconds=5)), user_id=CANARY, item_id=items[3], type=pb.EVENT_TYPE_CLICK,
                         event_id="canary-1")])]), timeout=RPC_TIMEOUT_S)
            after = rank(channel, CANARY, items, top_k=20, min_sequence=logged.sequence, request_id="canary-rank")
            assert not after.degraded
            history = st.run(_history(st.server, names(CANARY), now))
            assert history == [items[3]]  # the event was applied under the pseudonym
            # The other paths a canary id takes: a degraded answer (a sequence this server never stored),
            # a rejected Rank, a rejected event, and a Rank with an inline item the catalog lacks.
            stale = rank(channel, CANARY, items, min_sequence=logged.sequence + 1_000, request_id="canary-stale")
            assert stale.degraded
            with pytest.raises(grpc.RpcError) as refused:
                rank(channel, CANARY, items, top_k=-1, request_id="canary-refused")
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            future = stub(channel).LogEvents(iter([pb.LogEventsRequest(events=[
                pb.Event(ts=timestamp(now + timedelta(days=2)), user_id=CANARY, item_id=items[4], type=pb.EVENT_TYPE_CLICK,
                         event_id="canary-future")])]), timeout=RPC_TIMEOUT_S)
            assert future.rejected == 1 and CANARY not in future.rejections[0].reason
            inline = rank(channel, CANARY, items[:5], extra=[pb.RankCandidate(item_id="canary-new-item", title="a new item")])
            assert len(inline.items) == 6
            metrics = scrape_metrics(st.server.metrics_port)
            assert metric(metrics, "semrank_degraded_total") >= 1 and metric(metrics, "semrank_events_total", result="rejected") >= 1
            assert not [k for k in metrics if CANARY in str(k)]  # no label holds the id
        assert [(i.item_id, round(i.score, 5)) for i in keyed.items] == [(i.item_id, round(i.score, 5)) for i in plain.items]
        stored = _files_text(tmp_path / "keyed")
        assert CANARY.encode() not in stored and shopper.encode() not in stored
        assert names(CANARY).encode() in stored  # the event log and the exposure hold the pseudonym
        # The erased path: the canary is erased (`semrank privacy delete-user`, the server stopped); the
        # restarted server ranks it as a stranger and refuses its event, and logs neither id nor pseudonym
        # beyond what the earlier phase logged.
        from semrank.cli import main

        (tmp_path / "key").write_bytes(KEY)
        assert main(["privacy", "delete-user", "--state-dir", str(tmp_path / "keyed"), "--user", CANARY,
                     "--requested-by", "canary-test", "--pseudonym-key-file", str(tmp_path / "key")]) == 0
        stored = _files_text(tmp_path / "keyed")
        assert CANARY.encode() not in stored and names(CANARY).encode() not in stored
        erased_logs = len(logs.getvalue())
        with ServerThread(cfg("keyed", names), clock=lambda: now) as st, \
                grpc.insecure_channel(f"127.0.0.1:{st.port}") as channel:
            assert st.run(_history(st.server, names(CANARY), now)) == []
            erased = rank(channel, CANARY, items, top_k=20, request_id="canary-erased")
            assert not erased.degraded
            refused_event = stub(channel).LogEvents(iter([pb.LogEventsRequest(events=[
                pb.Event(ts=timestamp(now - timedelta(seconds=1)), user_id=CANARY, item_id=items[5],
                         type=pb.EVENT_TYPE_CLICK, event_id="canary-after")])]), timeout=RPC_TIMEOUT_S)
            assert refused_event.rejected == 1 and "erased" in refused_event.rejections[0].reason
            assert CANARY not in refused_event.rejections[0].reason
            assert not [k for k in scrape_metrics(st.server.metrics_port) if CANARY in str(k)]
        assert CANARY not in logs.getvalue()[erased_logs:]
    finally:
        root.removeHandler(handler)
        for n, (lvl, off) in saved.items():
            logging.getLogger(n).setLevel(lvl)
            logging.getLogger(n).disabled = off
        logging.disable(disabled)
    assert CANARY not in logs.getvalue() and names(CANARY) in logs.getvalue()


async def _history(server: RankingServer, user_id: str, t: datetime) -> list[str]:
    engine = server.engine
    return await engine.store_worker.read(engine.online.history, user_id, t, 10)


def test_a_server_refuses_state_written_under_another_key_or_none(small_shop, small_bundle, tmp_path):
    def start(state, pseudonyms):  # refused before Triton or anything else starts
        return asyncio.run(RankingServer(ServeConfig(bundle_dir=small_bundle[0], data_dir=small_shop, state_dir=state,
                                                     port=0, reload_poll_s=0, pseudonyms=pseudonyms)).start())

    old = tmp_path / "old"
    (old / "events").mkdir(parents=True)  # state from before pseudonyms: ids stored as given
    with pytest.raises(ConfigError, match="no key \\(user ids stored as given\\)"):
        start(old, Pseudonyms(KEY))
    keyed = tmp_path / "keyed"
    keyed.mkdir()
    (keyed / "pseudonyms.json").write_text('{"fingerprint": "%s"}' % Pseudonyms(KEY).fingerprint)
    with pytest.raises(ConfigError, match="this server has no key"):
        start(keyed, Pseudonyms())
    with pytest.raises(ConfigError, match="fingerprint"):
        start(keyed, Pseudonyms(b"another-key-of-at-least-32-bytes!!"))


def test_batch_scoring_maps_its_input_ids_and_refuses_state_of_another_key(small_shop, small_bundle, catalog, tmp_path):
    """`semrank score` on a keyed server's state: the input's user ids are mapped before their features
    are read (a shopper with a click scores unlike a stranger), and without the key the job is refused."""
    from serving.batch.scorer import ScoreConfig, Scorer
    from serving.ranking.outcome import Candidate

    names, state = Pseudonyms(KEY), tmp_path / "state"
    cfg = ServeConfig(bundle_dir=small_bundle[0], data_dir=small_shop, state_dir=state, port=0, reload_poll_s=0,
                      encoder_timeout_s=30.0, snapshot_interval_s=0, pseudonyms=names)
    with ServerThread(cfg) as st, grpc.insecure_channel(f"127.0.0.1:{st.port}") as channel:
        stub(channel).LogEvents(iter([pb.LogEventsRequest(events=[
            pb.Event(ts=timestamp(datetime.now(timezone.utc) - timedelta(seconds=5)), user_id=CANARY, item_id=catalog[k],
                     type=pb.EVENT_TYPE_PURCHASE, event_id=f"batch-{k}") for k in range(3)])]), timeout=RPC_TIMEOUT_S)
    cands = [Candidate(item_id=i) for i in catalog[3:23]]
    with pytest.raises(ConfigError, match="this server has no key"):
        Scorer(ScoreConfig(small_bundle[0], small_shop, state))
    scorer = Scorer(ScoreConfig(small_bundle[0], small_shop, state, pseudonyms=names))
    try:
        (canary, _), (stranger, _) = scorer.score_requests([(CANARY, cands), ("never-seen-shopper", cands)])
    finally:
        scorer.close()
    assert not (canary == stranger).all()
