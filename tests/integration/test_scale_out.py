"""Replicas over NATS JetStream (issue 13), end to end: real RankingServers on real gRPC ports,
sharing one Triton, their events on a stream of the test's own on the machine's NATS (or on a NATS
of the test's own where the test stops it).

- Read-your-writes: an event logged on replica A is seen by a Rank on replica B that carries A's
  token (LogEventsResponse.sequence as RankRequest.min_sequence); a token B cannot reach in time
  gives a degraded answer with `stale_features`, not a hang; a bad token is INVALID_ARGUMENT.
- Exactly once across replicas: a call retried on another replica counts as duplicates.
- NATS down: LogEvents answers UNAVAILABLE and acknowledges nothing it has not stored, Rank keeps
  answering, readiness turns NOT_SERVING; when NATS is back both recover.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import grpc
import nats
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from semrank.ranking.v1 import ranking_service_pb2 as pb
from serving.config import JetStreamConfig, ServeConfig
from serving.readiness import READINESS
from tests.integration.production_kit import RPC_TIMEOUT_S, contributions, rank, stub, timestamp
from tests.integration.serving_kit import (
    MACHINE_NATS,
    NatsProcess,
    ReplicaSet,
    SharedTriton,
    bad_request_fields,
    error_info,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def triton():
    """One Triton for every replica of this module (serving tests share one Triton)."""
    shared = SharedTriton()
    yield shared
    shared.close()


def shared_snapshot(events: JetStreamConfig) -> dict | None:
    """What the fleet's snapshot bucket of `events` holds (serving.ingest.snapshots.shared_info)."""
    from serving.ingest.snapshots import shared_info

    async def read() -> dict | None:
        nc = await nats.connect(MACHINE_NATS)
        try:
            return await shared_info(nc.jetstream(), events)
        finally:
            await nc.close()

    return asyncio.run(read())


def replica_cfg(small_shop, small_bundle, state, events: JetStreamConfig) -> ServeConfig:
    return ServeConfig(bundle_dir=small_bundle[0], data_dir=small_shop, state_dir=state, port=0, reload_poll_s=0,
                       encoder_timeout_s=5.0, readiness_interval_s=0.2, events=events)


def purchases(user: str, items: list[str], tag: str) -> list[pb.Event]:
    now = datetime.now(timezone.utc)
    return [pb.Event(event_id=f"{tag}-{k}", ts=timestamp(now - timedelta(seconds=60 - k)), user_id=user, item_id=i,
                     type=pb.EVENT_TYPE_PURCHASE) for k, i in enumerate(items)]


def readiness(channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=READINESS),
                                                     timeout=RPC_TIMEOUT_S).status


def assert_ranked_by_text(server, item_id: str) -> None:
    """The replica knows the item and holds a current embedding of its text for every encoder."""
    items = server.state.engine.items
    row = items.rows([item_id])[0]
    assert row >= 0, f"{item_id} unknown"
    for key in items.keys():
        assert items.embeddings(key)[1][row], f"{item_id}: no current embedding for encoder {key}"


def test_a_token_from_replica_a_makes_replica_b_see_the_events_and_retries_count_once(small_shop, small_bundle,
                                                                                      catalog, tmp_path, stream,
                                                                                      triton):
    name, prefix = stream
    events = JetStreamConfig(url=MACHINE_NATS, stream=name, subject_prefix=prefix)
    cfgs = [replace(replica_cfg(small_shop, small_bundle, tmp_path / f"state-{k}", events), open_admin=True)
            for k in range(2)]
    user, candidates = "replica-user", catalog[:20]
    with ReplicaSet(cfgs, triton) as replicas, grpc.insecure_channel(f"127.0.0.1:{replicas.ports[0]}") as a, \
            grpc.insecure_channel(f"127.0.0.1:{replicas.ports[1]}") as b:
        assert len(triton.tritons) == 1 and all(s.tritons == {} for s in replicas.servers)  # one Triton for both
        control = rank(b, user, candidates, explain=True)
        sent = purchases(user, candidates[:3], "ryw")
        ack = stub(a).LogEvents(iter([pb.LogEventsRequest(events=sent)]), timeout=RPC_TIMEOUT_S)
        assert (ack.accepted, ack.duplicates) == (3, 0) and ack.sequence >= 3, ack

        seen = rank(b, user, candidates, explain=True, min_sequence=ack.sequence)
        assert not seen.degraded, seen.degraded_reason
        mine, cold = contributions(seen, "personal"), contributions(control, "personal")
        assert not np.allclose([mine[i] for i in candidates[:3]], [cold[i] for i in candidates[:3]], atol=1e-6)

        # A token B cannot reach in time: an answer within the deadline, marked.
        ahead = stub(b).Rank(pb.RankRequest(user_id=user, candidates=[pb.RankCandidate(item_id=i) for i in candidates],
                                            min_sequence=ack.sequence + 10_000), timeout=2.0)
        assert ahead.degraded and ahead.degraded_reason.startswith("stale_features:"), ahead.degraded_reason
        with pytest.raises(grpc.RpcError) as bad:
            rank(b, user, candidates, min_sequence=-1)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and bad_request_fields(bad.value) == ["min_sequence"]

        # The client did not see A's acknowledgement and resends the call to B: nothing counts twice.
        again = stub(b).LogEvents(iter([pb.LogEventsRequest(events=sent)]), timeout=RPC_TIMEOUT_S)
        assert (again.accepted, again.duplicates, again.sequence) == (0, 3, ack.sequence), again
        after = rank(a, user, candidates, explain=True, min_sequence=again.sequence)
        assert contributions(after, "personal") == pytest.approx(
            contributions(rank(a, user, candidates, explain=True), "personal"))
        for server in replicas.servers:
            assert server.state.ingest.committed_seq == ack.sequence
            sample = server.metrics.registry.get_sample_value
            assert sample("semrank_events_applied_seq") == ack.sequence and sample("semrank_events_lag") == 0
            assert sample("semrank_stream_bad_messages") == 0

        # Erasure across a fleet's replicas is not built: refused with its reason, nothing done.
        with pytest.raises(grpc.RpcError) as refused:
            stub(a).DeleteUser(pb.DeleteUserRequest(user_ids=[user], requested_by="t-1"), timeout=RPC_TIMEOUT_S)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "jetstream" in refused.value.details()

        # An item upserted on A is ranked by its text on B.
        item = pb.RankCandidate(item_id="sku-replicated", title="Stainless Steel Water Bottle, 750 ml",
                                category="Outdoor", price=19.0)
        up = stub(a).UpsertItems(iter([pb.UpsertItemsRequest(items=[item])]), timeout=RPC_TIMEOUT_S)
        assert up.accepted == 1 and up.sequence == ack.sequence + 1, up
        r = rank(b, user, ["sku-replicated", *candidates[:5]], min_sequence=up.sequence)
        assert not r.degraded and "sku-replicated" not in r.missing_ids, r
        assert_ranked_by_text(replicas.servers[1], "sku-replicated")
        b_items, a_items = replicas.servers[1].state.engine.items, replicas.servers[0].state.engine.items
        for key in a_items.keys():  # B took A's embedding (the same vector, no second encode)
            np.testing.assert_array_equal(b_items.embeddings(key)[0][b_items.rows(["sku-replicated"])[0]],
                                          a_items.embeddings(key)[0][a_items.rows(["sku-replicated"])[0]])


def test_nats_down_log_events_is_unavailable_rank_answers_and_both_recover(small_shop, small_bundle, catalog,
                                                                           tmp_path, triton):
    own = NatsProcess(tmp_path / "nats").start()
    events = JetStreamConfig(url=own.url, stream="DOWN", subject_prefix="down", publish_timeout_s=1.0)
    user, candidates = "nats-down-user", catalog[:15]
    try:
        with ReplicaSet([replica_cfg(small_shop, small_bundle, tmp_path / "state", events)], triton) as rs, \
                grpc.insecure_channel(f"127.0.0.1:{rs.ports[0]}") as channel:
            first = stub(channel).LogEvents(iter([pb.LogEventsRequest(events=purchases(user, candidates[:2], "up"))]),
                                            timeout=RPC_TIMEOUT_S)
            assert first.accepted == 2
            wait_until(lambda: readiness(channel) == health_pb2.HealthCheckResponse.SERVING, 30, "ready")

            own.stop()
            wait_until(lambda: readiness(channel) == health_pb2.HealthCheckResponse.NOT_SERVING, 30, "not ready")
            cut = purchases(user, candidates[2:5], "down")
            with pytest.raises(grpc.RpcError) as down:
                stub(channel).LogEvents(iter([pb.LogEventsRequest(events=cut)]), timeout=RPC_TIMEOUT_S)
            assert down.value.code() == grpc.StatusCode.UNAVAILABLE, down.value
            info = error_info(down.value)
            assert info.reason == "EVENTS_NOT_STORED" and info.metadata["stored_before"] == "0", info
            r = rank(channel, user, candidates)  # Rank keeps answering from what this replica holds
            assert sorted(it.item_id for it in r.items) == sorted(candidates)

            own.start()
            wait_until(lambda: readiness(channel) == health_pb2.HealthCheckResponse.SERVING, 60, "ready again")
            retry = stub(channel).LogEvents(iter([pb.LogEventsRequest(events=cut)]), timeout=RPC_TIMEOUT_S)
            assert (retry.accepted, retry.duplicates) == (3, 0), retry  # none of them had been stored
            assert retry.sequence == first.sequence + 3
            assert rs.servers[0].state.ingest.committed_seq == retry.sequence
    finally:
        own.stop()


def stream_event_ids(name: str) -> list[str]:
    """The event_id of every message of the stream, in order (read with a consumer of the test's own)."""
    from nats.js.api import AckPolicy, ConsumerConfig

    from serving.ingest.stream_format import decode_event

    async def read() -> list[str]:
        nc = await nats.connect(MACHINE_NATS)
        js = nc.jetstream()
        end = (await js.stream_info(name)).state.last_seq
        sub = await js.pull_subscribe(">", stream=name, config=ConsumerConfig(ack_policy=AckPolicy.NONE))
        ids: list[str] = []
        seq = 0
        while seq < end:
            for m in await sub.fetch(500, timeout=5):
                seq = m.metadata.sequence.stream
                ids.append(decode_event(m.data).event_id)
        await nc.close()
        return ids

    return asyncio.run(read())


def test_sigkill_of_a_replica_loses_no_acknowledged_event_and_its_retry_counts_once(small_shop, small_bundle,
                                                                                    catalog, tmp_path, stream,
                                                                                    triton):
    import threading
    import time

    from tests.integration.serving_kit import ServeProcess

    name, prefix = stream
    events = JetStreamConfig(url=MACHINE_NATS, stream=name, subject_prefix=prefix)
    acked: list[pb.Event] = []  # events whose call a client saw acknowledged, on either replica
    with ReplicaSet([replica_cfg(small_shop, small_bundle, tmp_path / "survivor", events)], triton) as rs, \
            grpc.insecure_channel(f"127.0.0.1:{rs.ports[0]}") as survivor:
        victim = ServeProcess(["--bundle", str(small_bundle[0]), "--data", str(small_shop), "--state-dir",
                               str(tmp_path / "victim"), "--port", "0", "--reload-poll-s", "0", "--events", "jetstream",
                               "--nats-url", MACHINE_NATS, "--stream", name, "--subject-prefix", prefix,
                               *[a for key, url in triton.urls.items() for a in ("--worker-triton", f"{key}={url}")]],
                              tmp_path / "victim.log")  # (the module's Triton: the victim starts none)
        victim.start()
        try:
            with grpc.insecure_channel(f"127.0.0.1:{victim.port}") as v:
                for call in range(3):  # complete calls on the victim, acknowledged before the kill
                    sent = purchases(f"kill-user-{call}", catalog[:10], f"victim-{call}")
                    assert stub(v).LogEvents(iter([pb.LogEventsRequest(events=sent)]), timeout=RPC_TIMEOUT_S).accepted == 10
                    acked += sent

                stop, errors = threading.Event(), []

                def traffic() -> None:  # another client, on the survivor, all through the kill
                    k = 0
                    while not stop.is_set():
                        sent = purchases(f"other-user-{k % 7}", catalog[k % 30: k % 30 + 5], f"survivor-{k}")
                        try:
                            r = stub(survivor).LogEvents(iter([pb.LogEventsRequest(events=sent)]), timeout=RPC_TIMEOUT_S)
                            assert r.accepted == 5, r
                            acked.extend(sent)
                        except Exception as e:  # noqa: BLE001 - reported below
                            errors.append(e)
                        k += 1

                background = threading.Thread(target=traffic, daemon=True)
                background.start()
                cut = purchases("kill-user-cut", catalog[:40] * 5, "cut")  # 200 events, 5 per message
                half = threading.Event()

                def slow_stream():
                    for m in range(40):
                        if m == 10:
                            half.set()
                        yield pb.LogEventsRequest(events=cut[5 * m: 5 * (m + 1)])
                        time.sleep(0.05)

                killer = threading.Thread(target=lambda: (half.wait(60), time.sleep(0.1), victim.kill()), daemon=True)
                killer.start()
                with pytest.raises(grpc.RpcError) as lost:
                    stub(v).LogEvents(slow_stream(), timeout=RPC_TIMEOUT_S)
                assert lost.value.code() == grpc.StatusCode.UNAVAILABLE, lost.value
                killer.join(30)
                time.sleep(0.5)  # the survivor's client goes on after the kill
                stop.set()
                background.join(60)
                assert not errors, errors[:3]
        finally:
            victim.kill()

        # The client of the cut call resends it whole, to the survivor: nothing counts twice.
        retry = stub(survivor).LogEvents(iter([pb.LogEventsRequest(events=cut[k: k + 50]) for k in range(0, 200, 50)]),
                                         timeout=RPC_TIMEOUT_S)
        assert retry.accepted + retry.duplicates == 200 and retry.duplicates > 0, retry
        ids = stream_event_ids(name)
        assert len(ids) == len(set(ids)), "an event id is stored twice"
        missing = {e.event_id for e in acked + cut} - set(ids)
        assert not missing, f"{len(missing)} acknowledged event(s) lost, e.g. {sorted(missing)[:3]}"
        assert rs.servers[0].state.ingest.committed_seq == retry.sequence == len(ids)


def test_a_fresh_replica_starts_from_the_shared_snapshot_and_folds_only_the_rest(small_shop, small_bundle, catalog,
                                                                                 tmp_path, stream, triton):
    from dataclasses import replace

    name, prefix = stream
    events = JetStreamConfig(url=MACHINE_NATS, stream=name, subject_prefix=prefix, share_snapshot_s=3600)
    cfg_a = replace(replica_cfg(small_shop, small_bundle, tmp_path / "a", events), snapshot_interval_s=0.3)

    def shared_seq() -> int:
        meta = shared_snapshot(events)
        return int(meta["seq"]) if meta else 0

    user, candidates = "snapshot-user", catalog[:20]
    with ReplicaSet([cfg_a], triton) as replicas, grpc.insecure_channel(f"127.0.0.1:{replicas.ports[0]}") as a:
        for call in range(3):
            token = stub(a).LogEvents(iter([pb.LogEventsRequest(events=purchases(user, candidates[call:call + 4],
                                                                                    f"snap-{call}"))]),
                                      timeout=RPC_TIMEOUT_S).sequence
        before = stub(a).UpsertItems(iter([pb.UpsertItemsRequest(items=[pb.RankCandidate(
            item_id="sku-before", title="Trail Running Shoes, Waterproof", category="Outdoor", price=89.0)])]),
            timeout=RPC_TIMEOUT_S)
        assert before.accepted == 1 and before.sequence == token + 1, before
        shared = wait_until(shared_seq, 30, "a shared snapshot")
        # The first share (later ones wait an hour) comes with A's periodic snapshot: after the third
        # LogEvents or after the upsert, whichever the snapshot loop (0.3 s) meets first.
        assert shared in (token, before.sequence), (shared, token, before.sequence)
        tail = stub(a).LogEvents(iter([pb.LogEventsRequest(events=purchases(user, candidates[10:13], "tail"))]),
                                 timeout=RPC_TIMEOUT_S).sequence

        port_b = replicas.add(replica_cfg(small_shop, small_bundle, tmp_path / "b", events))  # an empty state dir
        b_ingest = replicas.servers[1].state.ingest
        assert b_ingest.stats.folded == tail - before.sequence, b_ingest.stats  # only the events after the snapshot
        assert_ranked_by_text(replicas.servers[1], "sku-before")  # upserted before the snapshot: from the stream
        with grpc.insecure_channel(f"127.0.0.1:{port_b}") as b:
            on_a = rank(a, user, candidates, explain=True, min_sequence=tail)
            on_b = rank(b, user, candidates, explain=True, min_sequence=tail)
            assert not on_b.degraded, on_b.degraded_reason
            assert contributions(on_b, "personal") == pytest.approx(contributions(on_a, "personal"))


def test_a_replica_with_a_snapshot_shares_it_at_start_up_when_the_bucket_is_empty(small_shop, small_bundle, catalog,
                                                                                 tmp_path, stream, triton):
    """A new fleet's one full upload happens before serving: a replica that starts with a snapshot
    of its own and finds no shared one uploads it then, not at its first periodic snapshot, where
    78 MB (the bench's state) would go through the event loop beside Ranks. A replica started next
    from an empty state directory downloads it."""
    from dataclasses import replace

    name, prefix = stream
    quiet = JetStreamConfig(url=MACHINE_NATS, stream=name, subject_prefix=prefix, share_snapshot_s=0)
    cfg = replace(replica_cfg(small_shop, small_bundle, tmp_path / "a", quiet), snapshot_interval_s=3600)

    with ReplicaSet([cfg], triton) as replicas, grpc.insecure_channel(f"127.0.0.1:{replicas.ports[0]}") as a:
        token = stub(a).LogEvents(iter([pb.LogEventsRequest(events=purchases("boot-user", catalog[:3], "boot"))]),
                                  timeout=RPC_TIMEOUT_S).sequence
    # Sharing off: nothing in the bucket; the snapshot is written at stop.
    assert (tmp_path / "a" / "online-store.bin").exists() and shared_snapshot(quiet) is None

    sharing = replace(quiet, share_snapshot_s=3600)
    with ReplicaSet([replace(cfg, events=sharing)], triton):
        meta = shared_snapshot(sharing)  # start() returned: shared already, with no periodic snapshot yet
        assert meta is not None and meta["seq"] == token, meta
    fresh = replace(replica_cfg(small_shop, small_bundle, tmp_path / "b", sharing), snapshot_interval_s=3600)
    with ReplicaSet([fresh], triton) as replicas:
        stats = replicas.servers[0].state.ingest.stats
        assert stats.folded == 0, stats  # all of it came in the snapshot


def test_a_replica_that_builds_its_state_shares_it_at_start_up_when_the_bucket_is_empty(small_shop, small_bundle,
                                                                                       catalog, tmp_path, stream,
                                                                                       triton):
    """The same upload before serving from a replica with no snapshot of its own, whose state is
    built at start-up from the data and the stream: the share writes its snapshot first. It was
    skipped before (no file yet), leaving the full upload to the first periodic snapshot, beside
    Ranks."""
    from dataclasses import replace

    name, prefix = stream
    sharing = JetStreamConfig(url=MACHINE_NATS, stream=name, subject_prefix=prefix, share_snapshot_s=3600)
    first = replace(replica_cfg(small_shop, small_bundle, tmp_path / "a", replace(sharing, share_snapshot_s=0)),
                    snapshot_interval_s=3600)
    events = purchases("built-user", catalog[:3], "built")
    with ReplicaSet([first], triton) as replicas, grpc.insecure_channel(f"127.0.0.1:{replicas.ports[0]}") as a:
        token = stub(a).LogEvents(iter([pb.LogEventsRequest(events=events)]), timeout=RPC_TIMEOUT_S).sequence
    assert shared_snapshot(sharing) is None  # (the stream holds the events; the bucket nothing)
    built = replace(replica_cfg(small_shop, small_bundle, tmp_path / "b", sharing), snapshot_interval_s=3600)
    with ReplicaSet([built], triton) as replicas:
        assert replicas.servers[0].state.ingest.stats.folded == len(events)  # built here: the data, then the stream
        meta = shared_snapshot(sharing)
        assert meta is not None and meta["seq"] == token, meta


def test_a_bundle_reload_on_one_replica_reaches_every_replica_and_a_new_one(small_shop, small_bundle, tmp_path,
                                                                            stream, triton):
    from dataclasses import replace

    from tests.integration.serving_kit import copy_bundle

    name, prefix = stream
    v1 = copy_bundle(small_bundle[0], tmp_path / "bundles" / "v1", version="fleet-v1")
    v2 = copy_bundle(small_bundle[0], tmp_path / "bundles" / "v2", version="fleet-v2")
    events = JetStreamConfig(url=MACHINE_NATS, stream=name, subject_prefix=prefix, control_poll_s=0.2)
    cfgs = [replace(replica_cfg(small_shop, small_bundle, tmp_path / f"state-{k}", events), bundle_dir=v1,
                    open_admin=True) for k in range(3)]

    def version(port: int) -> str:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            return stub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=RPC_TIMEOUT_S).bundle.version

    with ReplicaSet(cfgs[:2], triton) as replicas:
        assert [version(p) for p in replicas.ports] == ["fleet-v1", "fleet-v1"]
        with grpc.insecure_channel(f"127.0.0.1:{replicas.ports[0]}") as a:
            r = stub(a).ReloadBundle(pb.ReloadBundleRequest(path=str(v2)), timeout=RPC_TIMEOUT_S)
        assert r.reloaded and r.version == "fleet-v2", r
        wait_until(lambda: version(replicas.ports[1]) == "fleet-v2", 30, "replica B on the reloaded bundle")
        late = replicas.add(cfgs[2])  # configured with v1: adopts the fleet's v2 before it serves
        assert version(late) == "fleet-v2"
        assert replicas.servers[2].state.registry.default_path.resolve() == v2.resolve()


def test_the_fleet_bundle_key_obeys_the_bundle_roots(small_shop, small_bundle, tmp_path, stream, triton):
    """Issue 30: whoever can write the control bucket cannot make a replica load a directory outside
    its --bundle-root: the key is refused and logged, the replica keeps its bundle; a key naming a
    bundle under the root is adopted."""
    import json
    from dataclasses import replace

    from serving.ranking.shared_bundle import KEY
    from serving.ingest.control import bucket_name as control
    from tests.integration.serving_kit import copy_bundle

    name, prefix = stream
    v1 = copy_bundle(small_bundle[0], tmp_path / "bundles" / "v1", version="roots-v1")
    v2 = copy_bundle(small_bundle[0], tmp_path / "bundles" / "v2", version="roots-v2")
    outside = copy_bundle(small_bundle[0], tmp_path / "elsewhere" / "evil", version="roots-evil")
    events = JetStreamConfig(url=MACHINE_NATS, stream=name, subject_prefix=prefix, control_poll_s=0.2)
    cfg = replace(replica_cfg(small_shop, small_bundle, tmp_path / "state", events), bundle_dir=v1,
                  bundle_roots=(tmp_path / "bundles",))

    async def put(path) -> None:
        nc = await nats.connect(MACHINE_NATS)
        kv = await nc.jetstream().key_value(control(name))
        await kv.put(KEY, json.dumps({"path": str(path), "version": "x", "origin": "someone", "at": 0}).encode())
        await nc.close()

    def version(port: int) -> str:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            return stub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=RPC_TIMEOUT_S).bundle.version

    with ReplicaSet([cfg], triton) as replicas:
        shared = replicas.servers[0]._shared_bundle
        for bad in (outside, tmp_path / "bundles" / ".." / "elsewhere" / "evil", "/etc", 17):
            before = shared.refused
            asyncio.run(put(bad))
            wait_until(lambda b=before: shared.refused == b + 1, 30, f"the key naming {bad!r} refused")
            assert version(replicas.ports[0]) == "roots-v1"
        asyncio.run(put(v2))
        wait_until(lambda: version(replicas.ports[0]) == "roots-v2", 30, "the replica on the bundle under its root")


def test_a_hung_nats_takes_readiness_down_and_back(small_shop, small_bundle, catalog, tmp_path, triton):
    """Issue 30: a NATS that stops answering (SIGSTOP: its socket stays open) used to leave readiness
    SERVING. The readiness probe now asks NATS for a round trip within `probe_timeout_s`.

    And when NATS answers again, events flow again. A probe made of nats-py's `flush(timeout)` left a
    cancelled PONG waiter behind each timeout; the late PONG then killed the client's read loop
    (InvalidStateError), and from then on every publish and fetch timed out while `flush` (which skips
    the round trip once the read loop is gone) reported NATS healthy: readiness SERVING, every
    LogEvents failing (seen in bench/serve.py's mixed phase after a saturation phase)."""
    import os
    import signal

    own = NatsProcess(tmp_path / "nats").start()
    events = JetStreamConfig(url=own.url, stream="HUNG", subject_prefix="hung", publish_timeout_s=1.0,
                             probe_timeout_s=0.3)
    try:
        with ReplicaSet([replica_cfg(small_shop, small_bundle, tmp_path / "state", events)], triton) as rs, \
                grpc.insecure_channel(f"127.0.0.1:{rs.ports[0]}") as channel:
            wait_until(lambda: readiness(channel) == health_pb2.HealthCheckResponse.SERVING, 30, "ready")
            os.kill(own.proc.pid, signal.SIGSTOP)
            try:
                wait_until(lambda: readiness(channel) == health_pb2.HealthCheckResponse.NOT_SERVING, 30,
                           "not ready while NATS hangs")
            finally:
                os.kill(own.proc.pid, signal.SIGCONT)
            wait_until(lambda: readiness(channel) == health_pb2.HealthCheckResponse.SERVING, 60, "ready again")
            user, candidates = "hung-nats-user", catalog[:10]
            ack = stub(channel).LogEvents(iter([pb.LogEventsRequest(events=purchases(user, candidates[:2], "after"))]),
                                          timeout=RPC_TIMEOUT_S)
            assert ack.accepted == 2, ack
            seen = rank(channel, user, candidates, min_sequence=ack.sequence)
            assert not seen.degraded, seen.degraded_reason
            assert readiness(channel) == health_pb2.HealthCheckResponse.SERVING
    finally:
        own.stop()


def test_delete_user_reaches_every_replica_the_stream_and_a_fresh_replica(small_shop, small_bundle, catalog, tmp_path,
                                                                         stream, triton):
    """DeleteUser on replica A of a keyed fleet: the user's messages are purged from the stream, A
    ranks them as a stranger at once; B learns it from the control bucket, rebuilds and ranks them
    as a stranger too; both refuse their events; a replica started afterwards (from the shared
    snapshot A shared after its erasure) records the erasure without a rebuild and ranks them as a
    stranger; no replica's state directory holds the pseudonym."""
    from featurizer.privacy import Pseudonyms
    from serving.ingest.stream_format import subject_for

    name, prefix = stream
    names = Pseudonyms(b"k" * 32)
    events = JetStreamConfig(url=MACHINE_NATS, stream=name, subject_prefix=prefix, control_poll_s=0.2)
    cfgs = [replace(replica_cfg(small_shop, small_bundle, tmp_path / f"state-{k}", events), open_admin=True,
                    pseudonyms=names) for k in range(2)]
    user, keeper, candidates = "erased-shopper-5d1c", "keeper-shopper", catalog[:20]

    def personal(channel, who: str, token: int = 0) -> list[float]:
        got = contributions(rank(channel, who, candidates, explain=True, min_sequence=token), "personal")
        return [got[i] for i in candidates]

    async def on_subject() -> int:
        nc = await nats.connect(MACHINE_NATS)
        try:
            info = await nc.jetstream().stream_info(name, subjects_filter=subject_for(prefix, names(user)))
            return sum((info.state.subjects or {}).values())
        finally:
            await nc.close()

    with ReplicaSet(cfgs, triton) as replicas, grpc.insecure_channel(f"127.0.0.1:{replicas.ports[0]}") as a, \
            grpc.insecure_channel(f"127.0.0.1:{replicas.ports[1]}") as b:
        stub(a).LogEvents(iter([pb.LogEventsRequest(events=purchases(keeper, candidates[5:7], "k"))]), timeout=RPC_TIMEOUT_S)
        token = stub(a).LogEvents(iter([pb.LogEventsRequest(events=purchases(user, candidates[:4], "u"))]),
                                  timeout=RPC_TIMEOUT_S).sequence
        assert not np.allclose(personal(b, user, token), personal(b, "never-seen"), atol=1e-6)
        assert asyncio.run(on_subject()) == 4

        out = stub(a).DeleteUser(pb.DeleteUserRequest(user_ids=[user], requested_by="ticket-11"), timeout=RPC_TIMEOUT_S)
        assert (out.users, out.events_erased) == (1, 4), out
        assert asyncio.run(on_subject()) == 0
        np.testing.assert_allclose(personal(a, user), personal(a, "never-seen"), atol=1e-9)
        wait_until(lambda: np.allclose(personal(b, user), personal(b, "never-seen"), atol=1e-9), 120,
                   "replica B applying the fleet's erasure")
        for channel in (a, b):
            again = stub(channel).LogEvents(iter([pb.LogEventsRequest(events=purchases(user, candidates[:1], "x"))]),
                                            timeout=RPC_TIMEOUT_S)
            assert again.accepted == 0 and "erased" in again.rejections[0].reason
        # a producer that did not hear of the erasure: every replica's fold skips its message, counted
        async def publish_raw() -> None:
            from serving.ingest.log_format import LoggedEvent
            from serving.ingest.stream_format import encode_event

            nc = await nats.connect(MACHINE_NATS)
            try:
                ts = round((datetime.now(timezone.utc) - timedelta(seconds=1)).timestamp() * 1e6)
                await nc.jetstream().publish(subject_for(prefix, names(user)), encode_event(
                    LoggedEvent(ts, names(user), candidates[2], "purchase", event_id="raw-1")))
            finally:
                await nc.close()

        asyncio.run(publish_raw())
        for server in replicas.servers:
            wait_until(lambda s=server: s.metrics.registry.get_sample_value(
                "semrank_stream_refused_events", {"reason": "erased"}) == 1, 30, "the fold skipping the erased user")
        wait_until(lambda: asyncio.run(on_subject()) == 0, 30, "the late message purged")
        late = stub(b).LogEvents(iter([pb.LogEventsRequest(events=purchases(keeper, candidates[8:9], "k2"))]),
                                 timeout=RPC_TIMEOUT_S).sequence
        assert personal(a, keeper, late) == pytest.approx(personal(b, keeper, late))  # one fold, one state
        assert not np.allclose(personal(a, keeper, late), personal(a, "never-seen"), atol=1e-6)

        port_c = replicas.add(replace(cfgs[0], state_dir=tmp_path / "state-c"))  # from the shared snapshot
        fresh = replicas.servers[2]
        assert fresh.state.erasure.erasures.hashes == replicas.servers[0].state.erasure.erasures.hashes
        assert fresh.state.erasure.rebuilds == 0 and [s.state.erasure.rebuilds for s in replicas.servers[:2]] == [1, 1]
        with grpc.insecure_channel(f"127.0.0.1:{port_c}") as c:
            np.testing.assert_allclose(personal(c, user, late), personal(c, "never-seen"), atol=1e-9)
        for server in replicas.servers:
            server.state.exposures.flush()
        stored = names(user).encode()
        for path in [p for p in tmp_path.rglob("*") if p.is_file() and "embeddings" not in p.parts]:
            assert stored not in path.read_bytes(), path
