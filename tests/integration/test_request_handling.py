"""One shared server with small limits: bad and oversized requests fail alone, events and items are
visible at once, broken bundles are refused while the old one serves, overload is shed.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2

from featurizer.definitions import NAMES
from semrank.ranking.v1 import ranking_service_pb2 as pb
from serving.config import Limits, ServeConfig
from serving.server import SERVICE_NAME
from tests.integration.production_kit import (
    MAIN_MAX_CANDIDATES,
    MAIN_MAX_MESSAGE_BYTES,
    RPC_TIMEOUT_S,
    GoodTraffic,
    atomic_write,
    contributions,
    engaged_users,
    health_status,
    rank,
    stub,
    timestamp,
)
from tests.integration.serving_kit import (
    ServerThread,
    bad_request_fields,
    copy_bundle,
    error_info,
    metric,
    scrape_metrics,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def main_server(small_shop, small_bundle, tmp_path_factory):
    """Serves a copy of the bundle (the reload test rewrites its files) with small limits."""
    root = tmp_path_factory.mktemp("main")
    bundle = copy_bundle(small_bundle[0], root / "bundle")
    cfg = ServeConfig(
        bundle_dir=bundle, data_dir=small_shop, state_dir=root / "state", port=0, metrics_port=0, reload_poll_s=0.2,
        encoder_timeout_s=5.0, open_admin=True, bundle_roots=(tmp_path_factory.getbasetemp(),),
        limits=Limits(max_candidates=MAIN_MAX_CANDIDATES, max_message_bytes=MAIN_MAX_MESSAGE_BYTES),
    )
    with ServerThread(cfg) as st, grpc.insecure_channel(f"127.0.0.1:{st.port}") as channel:
        yield st, channel, bundle



def test_malformed_and_oversized_requests_fail_alone_while_good_ones_are_served(main_server, shop, catalog):
    st, channel, _ = main_server
    ok = [pb.RankCandidate(item_id=catalog[0])]
    bad = [
        (dict(candidates=[pb.RankCandidate(item_id=f"i{k}") for k in range(MAIN_MAX_CANDIDATES + 1)]), ["candidates"]),
        (dict(candidates=[]), ["candidates"]),
        (dict(candidates=[*ok, pb.RankCandidate(item_id="  ")]), ["candidates[1].item_id"]),
        (dict(candidates=[*ok, pb.RankCandidate(item_id="x"), pb.RankCandidate(item_id=catalog[0])]),
         ["candidates[2].item_id"]),  # a duplicate
        (dict(candidates=ok, context=pb.RankContext(query="q" * 5000)), ["context.query"]),
        (dict(candidates=ok, top_k=-1), ["top_k"]),
        (dict(candidates=[pb.RankCandidate(item_id="")], top_k=-2), ["top_k", "candidates[0].item_id"]),
        # issue 14, problem 10: an inline price is a feature of the item; NaN, infinities and negatives are refused
        *[(dict(candidates=[*ok, pb.RankCandidate(item_id="inline-p", title="Lamp", price=p)]), ["candidates[1].price"])
          for p in (float("nan"), float("inf"), float("-inf"), -1.0)],
    ]
    before = scrape_metrics(st.server.metrics_port)
    with GoodTraffic(channel, engaged_users(shop)[:5], catalog[:20]) as good:
        for kw, fields in bad:
            with pytest.raises(grpc.RpcError) as e:
                stub(channel).Rank(pb.RankRequest(user_id="u-bad", **kw), timeout=RPC_TIMEOUT_S)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value
            assert bad_request_fields(e.value) == fields
            assert all(f in e.value.details() for f in fields)  # readable without rich-status support
        # A message over max_message_bytes: refused before it is decoded, RESOURCE_EXHAUSTED with the
        # reason MESSAGE_TOO_LARGE (issue 14, problem 12: told apart from OVERLOADED).
        huge = pb.RankCandidate(item_id="huge", title="t", description="d" * (2 * MAIN_MAX_MESSAGE_BYTES))
        with pytest.raises(grpc.RpcError) as e:
            stub(channel).Rank(pb.RankRequest(user_id="u-bad", candidates=[huge]), timeout=RPC_TIMEOUT_S)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value
        assert error_info(e.value).reason == "MESSAGE_TOO_LARGE"
        n_before_last = len(good.results)
        wait_until(lambda: len(good.results) > n_before_last + 2, 120, "good Ranks after the bad ones")
    assert good.errors() == []
    assert all(len(r.items) == 20 for r in good.results)
    after = scrape_metrics(st.server.metrics_port)
    invalid = [metric(m, "semrank_rejected_total", reason="invalid_argument") for m in (before, after)]
    assert invalid[1] - invalid[0] == len(bad)
    assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING


def test_undecodable_bytes_are_invalid_argument_and_earlier_messages_of_the_stream_count(main_server, catalog):
    """Issue 14, problem 9: bytes that are not a valid request message (truncated, invalid UTF-8)
    get INVALID_ARGUMENT with ErrorInfo MALFORMED_MESSAGE, never UNKNOWN; in a LogEvents stream
    the error says how many events of the call were stored before it."""
    st, channel, _ = main_server
    errors = lambda method: st.server.metrics.registry.get_sample_value(  # noqa: E731
        "semrank_errors_total", {"method": method, "reason": "MALFORMED_MESSAGE"}) or 0.0
    before = errors("Rank"), errors("LogEvents")
    rank_raw = channel.unary_unary(f"/{SERVICE_NAME}/Rank")
    log_raw = channel.stream_unary(f"/{SERVICE_NAME}/LogEvents", response_deserializer=pb.LogEventsResponse.FromString)
    truncated = b"\x0a\xff\xff\xff\x0f\x01"
    bad_utf8 = pb.RankRequest(request_id="ab", user_id="cd", candidates=[pb.RankCandidate(item_id=catalog[0])])
    for data in (truncated, bad_utf8.SerializeToString().replace(b"cd", b"\xff\xfe")):
        with pytest.raises(grpc.RpcError) as e:
            rank_raw(data, timeout=RPC_TIMEOUT_S)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value
        assert error_info(e.value).reason == "MALFORMED_MESSAGE"
    now = datetime.now(timezone.utc)
    good = pb.LogEventsRequest(events=[pb.Event(ts=timestamp(now - timedelta(seconds=1)), user_id="u-malformed",
                                                item_id=catalog[0], type=pb.EVENT_TYPE_CLICK, event_id="e-m1")])
    with pytest.raises(grpc.RpcError) as e:
        log_raw(iter([good.SerializeToString(), truncated]), timeout=RPC_TIMEOUT_S)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value
    info = error_info(e.value)
    assert info.reason == "MALFORMED_MESSAGE" and info.metadata["stored_before"] == "1"
    assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING
    assert rank(channel, "u-malformed", catalog[:5]).items
    assert (errors("Rank") - before[0], errors("LogEvents") - before[1]) == (2, 1)  # decode failures, counted


def test_log_events_streams_cut_short_are_counted_as_such(main_server, catalog):
    """Issue 14, problem 11: grpc.aio ends the request stream of a timed-out or cancelled call as
    if the client had half-closed it, so such LogEvents calls were counted as OK. A timed-out one
    now counts as DEADLINE_EXCEEDED (semrank_errors_total and the latency histogram's code label);
    the events they carried are stored, and a resend comes back as duplicates."""
    st, channel, _ = main_server
    registry = st.server.metrics.registry
    sample = lambda name, **labels: registry.get_sample_value(name, labels) or 0.0  # noqa: E731
    errors = lambda reason: sample("semrank_errors_total", method="LogEvents", reason=reason)  # noqa: E731

    def one_event_then_wait(event_id: str, release: threading.Event):
        now = datetime.now(timezone.utc)
        yield pb.LogEventsRequest(events=[pb.Event(ts=timestamp(now - timedelta(seconds=1)), user_id="u-cut",
                                                   item_id=catalog[0], type=pb.EVENT_TYPE_CLICK, event_id=event_id)])
        release.wait(30)

    for k in range(3):  # the client's cancel at its deadline and the server's own deadline race
        deadline_before = errors("DEADLINE_EXCEEDED")
        release = threading.Event()
        with pytest.raises(grpc.RpcError) as e:
            stub(channel).LogEvents(one_event_then_wait(f"e-cut-deadline-{k}", release), timeout=0.5)
        release.set()
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_until(lambda: errors("DEADLINE_EXCEEDED") > deadline_before, 30, "the timed-out stream to be counted")

    # A client's cancel: grpc.aio delivers it to the handler 10-50 ms after it ended the request
    # stream (measured here), usually after the handler answered; such a call counts as OK, and one
    # whose cancel arrived in time as CANCELLED. Either way the event is stored and a resend is a duplicate.
    codes = lambda: {c: sample("semrank_rpc_latency_seconds_count", method="LogEvents", variant="none", code=c)  # noqa: E731
                     for c in ("OK", "CANCELLED", "UNKNOWN")}
    # (semrank_events_total counts a call's events when it ends: the log's seq shows them stored before that.)
    ingest = st.server.state.ingest
    release, stored, before = threading.Event(), ingest.committed_seq, codes()
    call = stub(channel).LogEvents.future(one_event_then_wait("e-cut-cancel-0", release), timeout=RPC_TIMEOUT_S)
    wait_until(lambda: ingest.committed_seq > stored, 30, "the first message to be stored")
    call.cancel()  # the request generator stays blocked: no half-close reaches the server first
    wait_until(lambda: sum(codes().values()) > sum(before.values()), 30, "the cancelled stream to be counted")
    release.set()
    assert codes()["UNKNOWN"] == before["UNKNOWN"]
    resend = stub(channel).LogEvents(iter([pb.LogEventsRequest(events=[pb.Event(
        ts=timestamp(datetime.now(timezone.utc) - timedelta(seconds=1)), user_id="u-cut", item_id=catalog[0],
        type=pb.EVENT_TYPE_CLICK, event_id="e-cut-cancel-0")])]), timeout=RPC_TIMEOUT_S)
    assert (resend.accepted, resend.duplicates) == (0, 1)


def test_the_event_loop_lag_histogram_sees_a_blocked_loop(main_server):
    """The RPC histogram starts with the handler; the wait before it shows in
    semrank_event_loop_lag_seconds. Fault injection: block the server's loop for 0.5 s (the probe
    sleeps 0.1 s, so it wakes at least 0.4 s late)."""
    st, _, _ = main_server
    registry = st.server.metrics.registry
    slow = lambda: registry.get_sample_value("semrank_event_loop_lag_seconds_count") - (  # noqa: E731
        registry.get_sample_value("semrank_event_loop_lag_seconds_bucket", {"le": "0.25"}))
    before = slow()
    st.loop.call_soon_threadsafe(time.sleep, 0.5)
    wait_until(lambda: slow() > before, 30, "a lag sample over 0.25 s")


def test_reload_bundle_refuses_every_path_outside_the_roots_with_one_message(main_server, tmp_path):
    """Issue 14, problem 1: ReloadBundle loads only bundle directories under the allowed roots, and
    its refusal is the same whether the path is outside them, missing, a file, or not a path at all,
    so that it tells a caller nothing about the server's files. The serving bundle stays."""
    st, channel, bundle = main_server
    version = stub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=RPC_TIMEOUT_S).bundle.version
    (tmp_path / "empty-dir").mkdir()
    paths = ["/etc", "/", "/nonexistent/bundle", str(bundle / "manifest.json"), str(tmp_path / "missing"),
             str(tmp_path / "empty-dir"), "a\0b", "x" * 5000, str(bundle / ".." / ".." / ".." / "etc")]
    answers = set()
    for path in paths:
        with pytest.raises(grpc.RpcError) as e:
            stub(channel).ReloadBundle(pb.ReloadBundleRequest(path=path), timeout=RPC_TIMEOUT_S)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (path, e.value)
        assert error_info(e.value).reason == "BUNDLE_PATH_REFUSED" and bad_request_fields(e.value, "BUNDLE_PATH_REFUSED") == ["path"]
        shown = path if len(path) <= 200 else path[:200] + "..."
        answers.add(e.value.details().replace(repr(shown), "<path>"))
    assert len(answers) == 1, answers
    assert stub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=RPC_TIMEOUT_S).bundle.version == version


def test_a_retried_call_stores_nothing_twice_and_events_without_ids_are_not_deduplicated(main_server, catalog):
    """Issue 14, problem 7: event_id deduplication; the retry of a whole call after any failure
    (here: the client never saw the first answer) is harmless."""
    st, channel, _ = main_server
    now = datetime.now(timezone.utc)

    def ev(k: int, event_id: str) -> pb.Event:
        return pb.Event(ts=timestamp(now - timedelta(seconds=10 - k)), user_id="u-retry", item_id=catalog[k],
                        type=pb.EVENT_TYPE_CLICK, event_id=event_id)

    call = [pb.LogEventsRequest(events=[ev(0, "r-0"), ev(1, "r-1")]), pb.LogEventsRequest(events=[ev(2, "r-2"), ev(3, "")])]
    first = stub(channel).LogEvents(iter(call), timeout=RPC_TIMEOUT_S)
    assert (first.accepted, first.duplicates) == (4, 0)
    clicks = lambda: st.server.engine.online.features("u-retry", catalog[:1], st.server.engine.now())[  # noqa: E731
        0, NAMES.index("user_clicks_7d")]
    assert clicks() == 4
    retry = stub(channel).LogEvents(iter(call), timeout=RPC_TIMEOUT_S)
    assert (retry.accepted, retry.duplicates, retry.rejected) == (1, 3, 0)  # the event without an id is stored again
    assert clicks() == 5


def test_writes_beside_ranks_fold_within_the_write_share_and_all_reach_the_features(main_server, shop, catalog):
    """Issue 30 item 4 (a write flood queues its writes, not the Ranks): LogEvents calls beside a
    steady stream of Ranks wait for the share (`--write-share`, default 0.3), which the metric
    shows, and every event is stored and counted; without Ranks nothing waits."""
    st, channel, _ = main_server
    now = datetime.now(timezone.utc)

    def paused() -> float:
        return metric(scrape_metrics(st.server.metrics_port), "semrank_write_share_paused_seconds")

    def flood(tag: str, calls: int = 6, per_call: int = 100) -> int:
        n = 0
        for c in range(calls):
            events = [pb.Event(ts=timestamp(now - timedelta(seconds=30)), user_id=f"u-share-{tag}-{k % 7}",
                               item_id=catalog[(c + k) % len(catalog)], type=pb.EVENT_TYPE_CLICK,
                               event_id=f"share-{tag}-{c}-{k}") for k in range(per_call)]
            n += stub(channel).LogEvents(iter([pb.LogEventsRequest(events=events)]), timeout=RPC_TIMEOUT_S).accepted
        return n

    before = paused()
    with GoodTraffic(channel, engaged_users(shop)[:4], catalog[:50]) as traffic:
        assert flood("ranks") == 600
    assert not traffic.errors()
    during = paused()
    assert during > before  # commits waited for the Ranks
    clicks = st.server.engine.online.features("u-share-ranks-0", catalog[:1], st.server.engine.now())[
        0, NAMES.index("user_clicks_7d")]
    assert clicks == 6 * len(range(0, 100, 7))  # every event of this user reached the features
    time.sleep(0.3)  # no Rank in flight, none admitted in the last 50 ms
    assert flood("alone") == 600
    assert paused() == during


def test_an_event_time_out_of_range_is_rejected_alone(main_server, catalog):
    """Issue 14, problem 8: a Timestamp past year 9999 (or far before 1970) is one rejected event,
    not an OverflowError that kills the stream after earlier messages were stored."""
    _, channel, _ = main_server
    now = datetime.now(timezone.utc)
    ok = pb.Event(ts=timestamp(now - timedelta(seconds=1)), user_id="u-range", item_id=catalog[0], type=pb.EVENT_TYPE_CLICK)
    far = [pb.Event(ts=Timestamp(seconds=s), user_id="u-range", item_id=catalog[1], type=pb.EVENT_TYPE_CLICK,
                    event_id=f"e-far-{k}") for k, s in enumerate((10**15, 253402300800, -10**15))]
    resp = stub(channel).LogEvents(iter([pb.LogEventsRequest(events=[ok]), pb.LogEventsRequest(events=[*far, ok])]),
                                   timeout=RPC_TIMEOUT_S)
    assert (resp.accepted, resp.rejected) == (2, 3)
    assert [r.event_id for r in resp.rejections] == ["e-far-0", "e-far-1", "e-far-2"]
    assert all(r.reason.startswith("ts: ") for r in resp.rejections), resp.rejections


def test_rank_right_after_log_events_sees_them_and_bad_events_are_listed(main_server, catalog):
    _, channel, _ = main_server
    user, items = "fresh-user-6", catalog[:10]
    before = rank(channel, user, items, explain=True)
    now = datetime.now(timezone.utc)

    def ev(**kw) -> pb.Event:
        base = dict(ts=timestamp(now - timedelta(seconds=5)), user_id=user, item_id=items[0], type=pb.EVENT_TYPE_CLICK)
        return pb.Event(**{**base, **kw})

    future = pb.Event(ts=timestamp(now + timedelta(hours=1)), user_id=user, item_id=items[1], type=pb.EVENT_TYPE_CLICK)
    no_ts = pb.Event(user_id=user, item_id=items[1], type=pb.EVENT_TYPE_CLICK, event_id="e-no-ts")
    stream = [
        pb.LogEventsRequest(events=[ev(event_id="e-click"), ev(user_id="", event_id="e-no-user")]),
        pb.LogEventsRequest(events=[
            ev(type=pb.EVENT_TYPE_UNSPECIFIED, event_id="e-no-type"),
            ev(item_id=items[1], type=pb.EVENT_TYPE_PURCHASE, event_id="e-buy"),
            no_ts,
            future,
        ]),
    ]
    resp = stub(channel).LogEvents(iter(stream), timeout=RPC_TIMEOUT_S)
    assert (resp.accepted, resp.rejected) == (2, 4)
    got = [(r.index, r.event_id, r.reason.split(":")[0]) for r in resp.rejections]
    assert got == [(1, "e-no-user", "user_id"), (2, "e-no-type", "type"), (4, "e-no-ts", "ts"), (5, "", "ts")]
    assert "future" in resp.rejections[3].reason

    after = rank(channel, user, items, explain=True)  # no wait: the acknowledgement means applied
    control = rank(channel, "never-seen-user-6", items, explain=True)
    # Personal features depend on the user's own events only: a never-seen user ranked at the same
    # moment gets exactly the cold-start personal contributions, and so would this user had the
    # events not been applied. Before the events the two users were indistinguishable.
    mine, cold = contributions(after, "personal"), contributions(control, "personal")
    for item in items[:2]:  # the clicked and the bought item (user_item_* features)
        assert abs(mine[item] - cold[item]) > 1e-6, (item, mine[item], cold[item])
    assert contributions(before, "personal") != mine
    assert not after.degraded


def test_upserted_item_is_rankable_by_id_with_a_stored_embedding(main_server, shop, catalog):
    st, channel, _ = main_server
    info0 = stub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=RPC_TIMEOUT_S)
    msgs = [pb.UpsertItemsRequest(items=[
        pb.RankCandidate(item_id="sku-upserted", title="Bamboo Cutting Board Set", category="Kitchen", price=29.0),
        pb.RankCandidate(item_id="sku-nameless"),
    ])]
    resp = stub(channel).UpsertItems(iter(msgs), timeout=RPC_TIMEOUT_S)
    assert (resp.accepted, resp.rejected) == (1, 1)
    assert (resp.rejections[0].index, resp.rejections[0].item_id) == (1, "sku-nameless")
    assert resp.rejections[0].reason.startswith("title:")

    r = rank(channel, engaged_users(shop)[0], ["sku-upserted", *catalog[:5]], explain=True)
    assert "sku-upserted" not in r.missing_ids and not r.degraded
    info = stub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=RPC_TIMEOUT_S)
    assert info.items == info0.items + 1

    from safetensors import safe_open

    stored = set()
    for p in (st.server.cfg.state_dir / "embeddings").glob("*/emb-*.safetensors"):
        with safe_open(str(p), framework="numpy") as f:
            stored |= set(json.loads(f.metadata()["item_ids"]))
    assert "sku-upserted" in stored and "sku-nameless" not in stored


def test_broken_bundles_are_rejected_and_the_old_one_keeps_serving(main_server, small_bundle, shop, catalog, tmp_path):
    st, channel, bundle = main_server
    admin = stub(channel)
    user, items = engaged_users(shop)[0], catalog[:10]
    v0 = admin.GetModelInfo(pb.GetModelInfoRequest(), timeout=RPC_TIMEOUT_S).bundle.version
    originals = {name: (bundle / name).read_bytes() for name in ("manifest.json", "ranker.txt")}
    renamed = "user_clicks_7d"

    def unknown_feature(d: Path) -> None:  # model and manifest agree, but the server cannot compute it
        atomic_write(d / "ranker.txt", originals["ranker.txt"].decode().replace(renamed, "user_clicks_7d_v9"))
        atomic_write(d / "manifest.json", originals["manifest.json"].decode().replace(renamed, "user_clicks_7d_v9"))

    cases = [
        ("ranker.txt garbage", lambda d: atomic_write(d / "ranker.txt", "not a LightGBM model\n"), "ranker.txt"),
        ("manifest not JSON", lambda d: atomic_write(d / "manifest.json", "{\"format_version\": 1,"), "not valid JSON"),
        ("unknown feature", unknown_feature, "user_clicks_7d_v9"),
    ]

    def reloads(result: str) -> float:
        return metric(scrape_metrics(st.server.metrics_port), "semrank_bundle_reloads_total", result=result)

    for name, corrupt, problem in cases:
        rejected, ok = reloads("rejected"), reloads("ok")
        corrupt(bundle)
        wait_until(lambda: reloads("rejected") > rejected, 60, f"the watcher to reject the bundle ({name})")
        assert rank(channel, user, items).model_version == v0, name
        assert admin.GetModelInfo(pb.GetModelInfoRequest(), timeout=RPC_TIMEOUT_S).bundle.version == v0, name
        resp = admin.ReloadBundle(pb.ReloadBundleRequest(), timeout=RPC_TIMEOUT_S)
        assert (resp.reloaded, resp.version) == (False, v0), (name, resp)
        assert problem in resp.message, (name, resp.message)
        for file, data in originals.items():
            atomic_write(bundle / file, data)
        wait_until(lambda: reloads("ok") > ok, 60, f"the watcher to load the restored bundle ({name})")
        assert rank(channel, user, items).model_version == v0

    # (b) A valid new bundle (same model, new version) in the watched directory is picked up.
    v1 = f"{v0}-next"
    manifest = json.loads(originals["manifest.json"])
    atomic_write(bundle / "manifest.json", json.dumps({**manifest, "bundle_version": v1}, indent=2))
    wait_until(lambda: rank(channel, user, items).model_version == v1, 60, "the watcher to serve the new version")
    assert admin.GetModelInfo(pb.GetModelInfoRequest(), timeout=RPC_TIMEOUT_S).bundle.version == v1

    # (c) Swaps under load: every Rank succeeds, on one of the two bundles.
    other = copy_bundle(small_bundle[0], tmp_path / "other", version=f"{v0}-other")
    with GoodTraffic(channel, engaged_users(shop)[:5], items, threads=3) as good:
        for k in range(10):
            path = other if k % 2 == 0 else bundle
            resp = admin.ReloadBundle(pb.ReloadBundleRequest(path=str(path)), timeout=RPC_TIMEOUT_S)
            assert resp.reloaded, resp
            n = len(good.results)
            wait_until(lambda: len(good.results) > n, 60, "a Rank between swaps")
    assert good.errors() == []
    assert {r.model_version for r in good.results} <= {v1, f"{v0}-other"}
    assert len(st.server.tritons) == 1  # every bundle shares one encoder: the swaps started no Triton
    assert rank(channel, user, items).model_version == v1



# -- 5b. overload -----------------------------------------------------------------------------------


def test_overload_is_shed_with_resource_exhausted_and_the_server_recovers(small_shop, small_bundle, shop, catalog,
                                                                          tmp_path):
    cfg = ServeConfig(bundle_dir=small_bundle[0], data_dir=small_shop, state_dir=tmp_path / "state", port=0,
                      metrics_port=0, reload_poll_s=0, max_concurrent_rpcs=2, encoder_timeout_s=30.0)
    user = engaged_users(shop)[0]

    def slow_request(k: int) -> pb.RankRequest:
        # 1000 candidates, 20 of them never seen with inline text: a user with history needs their
        # embeddings, so each call waits on Triton (in flight, holding a slot) instead of finishing
        # in one slice of the event loop.
        cands = [pb.RankCandidate(item_id=f"load-{k}-{j}") for j in range(980)] + [
            pb.RankCandidate(item_id=f"load-{k}-text-{j}", title=f"Overload tote bag {k}-{j}", category="Bags")
            for j in range(20)
        ]
        return pb.RankRequest(user_id=user, candidates=cands)

    with ServerThread(cfg) as st, grpc.insecure_channel(f"127.0.0.1:{st.port}") as channel:
        codes: list[grpc.StatusCode] = []
        for round_ in range(10):  # rounds of 16 simultaneous calls, until the limit has been hit
            batch = [slow_request(16 * round_ + k) for k in range(16)]
            futures = [stub(channel).Rank.future(r, timeout=RPC_TIMEOUT_S) for r in batch]
            for f in futures:
                try:
                    r = f.result()
                    assert len(r.items) == 1000 and not r.degraded, r.degraded_reason
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as e:
                    codes.append(e.code())
            if grpc.StatusCode.RESOURCE_EXHAUSTED in codes:
                break
        assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
        shed = codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
        m = scrape_metrics(st.server.metrics_port)
        assert metric(m, "semrank_rejected_total", reason="resource_exhausted") == shed  # refusals are counted
        assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING
        assert len(rank(channel, user, catalog[:5]).items) == 5


def test_the_triton_access_token_is_never_logged_and_triton_listens_on_loopback(main_server):
    """Issue 14, problem 11 (the part within reach): pytriton hands tritonserver its random
    per-start access token on the command line (Triton takes its API restrictions only as flags,
    so it stays visible to local users in ps: see docs/serving.md, Security). What semrank
    controls: the token is in no log it writes, and Triton's ports are bound to loopback."""
    from serving.triton.process import _group_members

    st, _, _ = main_server
    for tp in st.server.tritons.values():
        cmdlines = [Path("/proc", str(pid), "cmdline").read_bytes().split(b"\0") for pid in _group_members(tp.pid)]
        server = next(args for args in cmdlines if args and args[0].endswith(b"tritonserver"))
        flags = dict(zip(server[1::2], server[2::2]))
        tokens = {v.split(b"triton-access-token=", 1)[1] for v in flags.values() if b"triton-access-token=" in v}
        assert len(tokens) == 1 and len(next(iter(tokens))) >= 32  # the restricted APIs are guarded
        assert flags[b"--http-address"] == flags[b"--grpc-address"] == flags[b"--metrics-address"] == b"127.0.0.1"
        assert next(iter(tokens)) not in tp.log_path.read_bytes()


def test_a_second_server_on_a_port_in_use_is_a_config_error(main_server, small_shop, small_bundle, tmp_path):
    """Issue 30: grpc binds with SO_REUSEPORT by default, so a second `semrank serve` on an occupied
    port used to bind silently and take part of the connections. Only the workers of one supervisor
    share a port (`share_port`); anyone else gets a ConfigError naming the address."""
    from featurizer.errors import ConfigError

    st, channel, _ = main_server
    cfg = ServeConfig(bundle_dir=small_bundle[0], data_dir=small_shop, state_dir=tmp_path / "state", port=st.port,
                      reload_poll_s=0)
    with pytest.raises(ConfigError, match=f"127.0.0.1:{st.port}: the port is in use"):
        with ServerThread(cfg):
            pass
    health = health_status(channel)
    assert health == health_pb2.HealthCheckResponse.SERVING  # the first one is untouched


def test_no_stream_can_starve_the_service(small_shop, small_bundle, shop, catalog, tmp_path):
    """Issue 30: idle client streams (LogEvents), idle Health/Watch and reflection streams each count
    against a budget of their own, with a share per caller, so filling one never refuses a Rank or a
    health check; an idle client stream is closed after `stream_idle_s` with what it stored."""
    import queue
    import threading

    from grpc_health.v1 import health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    from serving.config import Budgets

    budgets = Budgets(writes=4, writes_per_caller=3, watches=6, watches_per_caller=6, health_checks=2,
                      stream_idle_s=2.0)
    cfg = ServeConfig(bundle_dir=small_bundle[0], data_dir=small_shop, state_dir=tmp_path / "state", port=0,
                      metrics_port=0, reload_poll_s=0, budgets=budgets)
    user = engaged_users(shop)[0]
    with ServerThread(cfg) as st, grpc.insecure_channel(f"127.0.0.1:{st.port}") as channel:
        # Idle LogEvents streams: one event each, then nothing. The caller's share is 3: the 4th is refused.
        feeds = [queue.Queue() for _ in range(4)]
        calls = []
        for k, q in enumerate(feeds):
            q.put(pb.LogEventsRequest(events=[pb.Event(event_id=f"idle-{k}", ts=Timestamp(seconds=int(time.time()) - 5),
                                                       user_id=user, item_id=catalog[k], type=pb.EVENT_TYPE_CLICK)]))
            calls.append(stub(channel).LogEvents.future(iter(q.get, None), timeout=60))
        # Idle watches (they stream nothing after the first status) and idle reflection streams.
        watches = [health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                                                             timeout=60) for _ in range(7)]
        firsts = []
        for w in watches[:6]:
            firsts.append(next(w).status)
        with pytest.raises(grpc.RpcError) as refused_watch:
            next(watches[6])
        assert refused_watch.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert firsts == [health_pb2.HealthCheckResponse.SERVING] * 6
        reflection_stop = threading.Event()

        def reflection_requests():
            yield reflection_pb2.ServerReflectionRequest(list_services="")
            reflection_stop.wait(60)

        with pytest.raises(grpc.RpcError) as refused_reflection:  # the watches took the room of idle streams
            list(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(reflection_requests(),
                                                                                        timeout=10))
        assert refused_reflection.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Meanwhile Ranks and health checks are answered.
        assert len(rank(channel, user, catalog[:5]).items) == 5
        assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING
        # The 4th LogEvents was refused at once; the 3 idle ones are closed after 2 s with what they stored.
        outcomes = []
        for c in calls:
            try:
                c.result(timeout=30)
                outcomes.append(("ok", None))
            except grpc.RpcError as e:
                outcomes.append((e.code(), error_info(e).metadata.get("stored_before")))
        assert sorted(outcomes, key=str) == sorted([(grpc.StatusCode.DEADLINE_EXCEEDED, "1")] * 3
                                                   + [(grpc.StatusCode.RESOURCE_EXHAUSTED, None)], key=str), outcomes
        for q in feeds:
            q.put(None)
        for w in watches[:6]:
            w.cancel()
        reflection_stop.set()
        m = scrape_metrics(st.server.metrics_port)
        assert metric(m, "semrank_admission_refused_total", budget="writes") == 1
        assert metric(m, "semrank_admission_refused_total", budget="watches") == 2
        wait_until(lambda: st.server.admission.inflight.get("watches") == 0, 30, "the watches closed")
        assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING
