"""docs/nats/semrank.conf, the NATS users of docs/scaling.md ("Who may write what"), on a real
nats-server of the test's own: a replica can do all it does (publish and fold events, the fleet's
bundle key and the fleet's pseudonym key, snapshots, the fleet's erasures and the purge of an erased
user's subject); a producer can publish user events and nothing else, so it cannot point the fleet
at a bundle, touch snapshots, record or purge erasures, or change the stream (issues 30, 18)."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import nats
import nats.errors
import nats.js.errors
import pytest

from featurizer.online.features import OnlineFeatures
from featurizer.privacy import Pseudonyms
from featurizer.store.in_process import InProcessStore
from serving.config import JetStreamConfig
from serving.ingest.control import bucket_name as control
from serving.ingest.control import fleet_erasures, publish_erasures
from serving.ingest.jetstream import StreamIngest
from serving.ingest.stream_format import encode_event, subject_for
from serving.ranking.shared_bundle import KEY
from serving.ranking.store_worker import StoreWorker
from serving.triton.process import free_port
from tests.integration.serving_kit import wait_until
from tests.serving.ingest.apply_crash_child import ITEMS, batch

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
CONF = Path(__file__).resolve().parents[2] / "docs" / "nats" / "semrank.conf"


@pytest.fixture
def nats_with_users(tmp_path):
    """nats-server with docs/nats/semrank.conf, on a free port and a store of its own."""
    port = free_port()
    conf = CONF.read_text().replace("127.0.0.1:4222", f"127.0.0.1:{port}").replace(
        '"/var/lib/nats"', json.dumps(str(tmp_path / "js")))
    (tmp_path / "nats.conf").write_text(conf)
    proc = subprocess.Popen(["nats-server", "-c", str(tmp_path / "nats.conf")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)

    def up() -> bool:
        import socket

        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                return s.recv(4).startswith(b"INFO")
        except OSError:
            return False

    try:
        wait_until(up, 30, "nats-server with the semrank users")
        yield lambda user, password: f"nats://{user}:{password}@127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def test_a_replica_does_its_work_and_a_producer_cannot_write_the_control_bucket(nats_with_users):
    replica_url = nats_with_users("replica", "change-me-replica")
    producer_url = nats_with_users("producer", "change-me-producer")
    cfg = JetStreamConfig(url=replica_url, stream="SEMRANK_EVENTS", subject_prefix="semrank.events",
                          publish_timeout_s=2.0)

    async def scenario():
        online = OnlineFeatures(InProcessStore(), ITEMS)
        replica = await StreamIngest.open(cfg, online, StoreWorker(online.store.remote), dedup_window_s=3600,
                                          ready_timeout_s=30, pseudonyms=Pseudonyms(None))  # the fleet's key: agreed
        try:
            logged = await replica.log_events(batch(0))  # publish, acknowledge, fold
            assert logged.stored == len(batch(0))
            kv = await replica.js.key_value(control("SEMRANK_EVENTS"))  # made by the key agreement at open
            assert json.loads((await kv.get("pseudonyms")).value) == {"fingerprint": None}
            await kv.put(KEY, b'{"path": "/srv/bundles/v2", "version": "v2"}')  # the fleet's bundle key
            erased = {"user": "e1_" + "0" * 32, "subject": subject_for("semrank.events", "u-erased"),
                      "requested_by": "t", "at": "2026-12-07T00:00:00+00:00"}
            await publish_erasures(replica.js, cfg, [erased])  # DeleteUser: the fleet's entry, then the purge
            assert [e["user"] for e in await fleet_erasures(replica.js, cfg)] == [erased["user"]]
            assert await replica.purge_subjects([erased["subject"]]) == 0
            store = await replica.js.create_object_store(bucket="SEMRANK_EVENTS_SNAPSHOTS")  # shared snapshots
            await store.put("snapshot", b"x" * 1000)
            assert (await store.get("snapshot")).data == b"x" * 1000

            producer = await nats.connect(producer_url)
            try:
                js = producer.jetstream(timeout=2.0)
                ack = await js.publish(subject_for("semrank.events", "u-from-producer"), encode_event(batch(1)[0]))
                assert ack.seq > logged.last_seq  # user events: allowed
                for subject, data in ((f"$KV.{control('SEMRANK_EVENTS')}.{KEY}", b'{"path": "/tmp/evil"}'),
                                      (f"$KV.{control('SEMRANK_EVENTS')}.erasure.e1_x", b'{"user": "e1_x"}'),
                                      ("semrank.events.items.x", b"{}"),
                                      ("$O.SEMRANK_EVENTS_SNAPSHOTS.C.x", b"x")):
                    with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError,
                                        nats.js.errors.APIError)):
                        await js.publish(subject, data)
                with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.js.errors.APIError)):
                    await js.delete_stream("SEMRANK_EVENTS")
                with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.js.errors.APIError)):
                    await js.purge_stream("SEMRANK_EVENTS", subject="semrank.events.u.>")
            finally:
                await producer.close()
            entry = await kv.get(KEY)
            assert json.loads(entry.value)["path"] == "/srv/bundles/v2"  # the producer's put never landed
            assert (await replica.js.stream_info("SEMRANK_EVENTS")).state.messages >= len(batch(0)) + 1
        finally:
            await replica.close()

    asyncio.run(scenario())
