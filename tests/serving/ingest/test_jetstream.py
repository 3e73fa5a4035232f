"""Events on JetStream (serving.ingest.jetstream) against a real nats-server: the machine's NATS for
most tests (a stream and subject prefix of each test's own, deleted after it), and a NATS of the
test's own where the test stops it.

- LogEvents' path stores, folds and returns the stream sequence; a retry with the same ids is
  counted as duplicates and applied once;
- a second process folding the same stream holds the same features, and waits for a token;
- a restart from a snapshot folds only what follows it; a bad message from another producer is
  skipped and counted, never stops the fold;
- two processes folding into one shared Redis store count every event once (the fence);
- NATS down: nothing is acknowledged that was not stored, and both publishing and folding recover.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
import dataclasses
import uuid

import nats
import numpy as np
import pytest
import redis

from featurizer.contracts.event_rules import EventRules
from featurizer.online.features import OnlineFeatures
from featurizer.store.config import InProcessConfig, RedisConfig
from featurizer.store.in_process import InProcessStore
from featurizer.store.redis import RedisStore
from serving.config import JetStreamConfig
from serving.ingest.apply import EventsNotStored, applied_seq
from serving.ingest.jetstream import StreamIngest, seq_key
from serving.ingest.stream_format import BadStreamMessage, decode_event, encode_event, subject_for
from serving.ingest.log_format import LoggedEvent, events_frame
from serving.ranking.store_worker import StoreWorker
from tests.integration.serving_kit import MACHINE_NATS, NatsProcess
from tests.serving.ingest.apply_crash_child import ITEMS, T0_US, batch
from tests.serving.ingest.commit_spans import gap_ratios, timed_commits

pytestmark = pytest.mark.timeout(300)
REDIS_URL = "redis://127.0.0.1:6379/0"


def features(online: OnlineFeatures, at=None) -> np.ndarray:
    """Every user's features for every item, then every user's item sequence (the sequence model's,
    as catalog rows padded with -1), flattened, at `at` (default: the newest event this process folded)."""
    at = at or online.watermark
    items = ITEMS["item_id"].to_list()
    row = {i: k for k, i in enumerate(items)}
    seqs = np.full((5, online.params.sequence_items), -1.0)
    for k in range(5):
        seq = [row.get(i, -2) for i in online.sequence(f"u{k}", at)]
        seqs[k, :len(seq)] = seq
    assert (seqs >= 0).any(), "the sequences are compared"
    return np.concatenate([np.stack([online.features(f"u{k}", items, at) for k in range(5)]).ravel(), seqs.ravel()])


def reference(batches: range, at_of: OnlineFeatures | None = None) -> np.ndarray:
    """The features of `batches` applied once each, in one go (at `at_of`'s watermark, if given)."""
    want = OnlineFeatures(InProcessStore(), ITEMS)
    want.apply(events_frame([e for k in batches for e in batch(k)]))
    return features(want, at_of.watermark if at_of is not None else None)


@pytest.fixture
def stream_cfg():
    """A stream of the test's own on the machine's NATS; deleted afterwards."""
    name = f"TEST_{uuid.uuid4().hex[:12]}"
    cfg = JetStreamConfig(url=MACHINE_NATS, stream=name, subject_prefix=f"test.{name}", publish_timeout_s=2.0,
                          apply_timeout_s=5.0)

    async def check():
        try:
            nc = await nats.connect(MACHINE_NATS, connect_timeout=2, max_reconnect_attempts=0)
        except Exception as e:  # noqa: BLE001 - a missing server is a failure, not a skip
            pytest.fail(f"this test needs NATS with JetStream at {MACHINE_NATS} ({e}); `make services` starts one")
        await nc.close()

    asyncio.run(check())
    yield cfg

    async def drop():
        nc = await nats.connect(MACHINE_NATS)
        try:
            await nc.jetstream().delete_stream(name)
        except Exception:  # noqa: BLE001 - the test may not have made it
            pass
        await nc.close()

    asyncio.run(drop())


async def open_ingest(cfg, store=None, window_s: float = 3600.0) -> tuple[StreamIngest, OnlineFeatures]:
    online = OnlineFeatures(store if store is not None else InProcessStore(), ITEMS)
    worker = StoreWorker(online.store.remote)
    return await StreamIngest.open(cfg, online, worker, dedup_window_s=window_s, ready_timeout_s=60), online


def test_the_message_format_round_trips_and_bad_messages_name_the_field():
    e = LoggedEvent(1_700_000_000_000_000, "user é/1", "i3", "purchase", "r-9", 2, "e-1")
    assert decode_event(encode_event(e)) == e
    assert subject_for("semrank.events", "user é/1").startswith("semrank.events.u.")
    assert subject_for("p", "a") != subject_for("p", "b") and "." not in subject_for("p", "a.b")[4:]
    for data, what in [(b"{", "not JSON"), (b"[1]", "JSON object"), (b"[" * 100_000, "not JSON")]:
        with pytest.raises(BadStreamMessage, match=what):
            decode_event(data)
    rules, now = EventRules(), T0_US
    for data, field in [(b'{"ts_us": 1.5e15, "user_id": "u", "item_id": "i", "type": "click"}', "ts"),
                        (b'{"ts_us": 1767225600000000, "user_id": "", "item_id": "i", "type": "click"}', "user_id"),
                        (b'{"ts_us": 1767225600000000, "user_id": "u", "item_id": "i", "type": "view"}', "type"),
                        (b'{"ts_us": 1767225600000000, "user_id": "u", "item_id": "i", "type": "click", "position": -1}',
                         "position"),
                        (b'{"user_id": "u", "item_id": "i", "type": "click"}', "ts")]:
        assert rules.problem(decode_event(data), now).startswith(f"{field}:"), data  # the rules name the field


def test_log_events_stores_folds_and_a_retry_counts_nothing_twice(stream_cfg):
    async def scenario():
        ingest, online = await open_ingest(stream_cfg)
        try:
            first = await ingest.log_events(batch(0))
            assert (first.stored, first.duplicates) == (len(batch(0)), 0)
            assert first.last_seq == len(batch(0)) and ingest.committed_seq == first.last_seq
            again = await ingest.log_events(batch(0) + batch(1))  # a client's retry, with one new batch
            assert (again.stored, again.duplicates) == (len(batch(1)), len(batch(0)))
            no_ids = [LoggedEvent(e.ts_us, e.user_id, e.item_id, e.event) for e in batch(2)]
            assert (await ingest.log_events(no_ids)).stored == len(no_ids)
            assert applied_seq(online, seq_key(stream_cfg.stream)) == ingest.committed_seq
            return features(online)
        finally:
            await ingest.close()

    np.testing.assert_array_equal(asyncio.run(scenario()), reference(range(3)))


def test_a_second_process_folds_the_same_stream_and_waits_for_a_token(stream_cfg):
    async def scenario():
        a, online_a = await open_ingest(stream_cfg)
        b, online_b = await open_ingest(stream_cfg)
        try:
            for k in range(3):
                token = (await a.log_events(batch(k))).last_seq
            assert await b.wait_folded(token, 10.0)
            assert not await b.wait_folded(token + 1000, 0.2)  # a token from the future: not folded, no hang
            np.testing.assert_array_equal(features(online_b), features(online_a))
        finally:
            await a.close()
            await b.close()

    asyncio.run(scenario())


def test_a_restart_folds_only_what_follows_the_snapshot_and_skips_bad_messages(stream_cfg, tmp_path):
    path = str(tmp_path / "online-store.bin")

    async def scenario():
        ingest, online = await open_ingest(stream_cfg, InProcessStore(InProcessConfig(path=path)))
        await ingest.log_events(batch(0))
        await ingest.log_events(batch(1))
        online.store.flush()  # the snapshot: holds batches 0-1 and their seq
        await ingest.close()
        online.store.close()

        writer, _ = await open_ingest(stream_cfg)  # another replica goes on while this one is down
        await writer.log_events(batch(2))
        nc = await nats.connect(MACHINE_NATS)  # another producer's bug, between two good batches
        await nc.jetstream().publish(f"{stream_cfg.subject_prefix}.u.x", b'{"type": "click"}')
        await nc.close()
        last = (await writer.log_events(batch(3))).last_seq
        await writer.close()

        again, online = await open_ingest(stream_cfg, InProcessStore(InProcessConfig(path=path)))
        try:
            assert again.committed_seq >= last  # (and the dead letter of the bad message, after it)
            assert again.stats.folded == 2 * len(batch(0)) and again.stats.bad_messages == 1
            return features(online)
        finally:
            await again.close()

    np.testing.assert_array_equal(asyncio.run(scenario()), reference(range(4)))


def test_two_processes_folding_into_one_redis_store_count_each_event_once(stream_cfg):
    namespace = f"test-js-{uuid.uuid4().hex}"
    cfg = RedisConfig(url=REDIS_URL, namespace=namespace)

    async def scenario():
        a, online_a = await open_ingest(stream_cfg, RedisStore(cfg))
        b, online_b = await open_ingest(stream_cfg, RedisStore(cfg))
        try:
            for k in range(4):
                token = (await (a if k % 2 else b).log_events(batch(k))).last_seq
            assert await a.wait_folded(token, 10.0) and await b.wait_folded(token, 10.0)
            assert a.stats.folded + b.stats.folded >= 4 * len(batch(0))  # each folded, the fence skipped repeats
            want = reference(range(4))
            at = OnlineFeatures(InProcessStore(), ITEMS)
            at.apply(events_frame(batch(3)))  # (a process that skipped the last batch knows an older watermark)
            for online in (online_a, online_b):
                np.testing.assert_array_equal(features(online, at.watermark), want)
        finally:
            await a.close()
            await b.close()
            online_a.store.close()
            online_b.store.close()

    try:
        asyncio.run(scenario())
    finally:
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=f"{namespace}:*", count=10_000))
        if keys:
            client.delete(*keys)
        client.close()


def test_nats_down_acknowledges_nothing_unstored_and_both_paths_recover(tmp_path):
    own = NatsProcess(tmp_path / "nats").start()
    cfg = JetStreamConfig(url=own.url, stream="DOWN", subject_prefix="down", publish_timeout_s=1.0, apply_timeout_s=5.0)

    async def scenario():
        ingest, online = await open_ingest(cfg)
        reader, online_r = await open_ingest(cfg)
        try:
            await ingest.log_events(batch(0))
            own.stop()
            await asyncio.sleep(0.5)
            assert ingest.problem() == "NATS disconnected"
            with pytest.raises(EventsNotStored) as e:
                await ingest.log_events(batch(1), stored_before=2)
            assert e.value.error_metadata() == {"stored_before": "2"}
            own.start()
            for _ in range(100):  # the client reconnects by itself
                if ingest.connected and reader.connected:
                    break
                await asyncio.sleep(0.1)
            token = (await ingest.log_events(batch(1))).last_seq
            assert await reader.wait_folded(token, 20.0)  # the reader made its consumer again
            np.testing.assert_array_equal(features(online_r), features(online))
            return features(online)
        finally:
            await ingest.close()
            await reader.close()

    try:
        np.testing.assert_array_equal(asyncio.run(scenario()), reference(range(2)))
    finally:
        own.stop()


class StallingJetStream:
    """Fault injection: the real JetStream context, except that publishes after the first `passes`
    are sent to a subject no stream holds and their acknowledgements never come (as when NATS goes
    away mid-call)."""

    def __init__(self, js, passes: int):
        self.js, self.passes = js, passes

    async def publish_async(self, subject, payload, headers=None):
        if self.passes > 0:
            self.passes -= 1
            return await self.js.publish_async(subject, payload, headers=headers)
        return asyncio.get_running_loop().create_future()  # never answered

    def __getattr__(self, name):
        return getattr(self.js, name)


def test_events_not_acknowledged_in_time_say_how_many_were_and_the_resend_is_harmless(stream_cfg):
    from dataclasses import replace

    from serving.ingest.nats_link import EventsNotAcknowledged

    async def scenario():
        ingest, online = await open_ingest(replace(stream_cfg, publish_timeout_s=0.3))
        try:
            real, ingest.link.js = ingest.link.js, StallingJetStream(ingest.link.js, passes=3)
            with pytest.raises(EventsNotAcknowledged) as e:
                await ingest.log_events(batch(0), stored_before=1)
            assert e.value.error_metadata() == {"stored_before": str(1 + 3)}
            assert e.value.grpc_code == "UNAVAILABLE" and "resend" in str(e.value)
            ingest.link.js = real
            again = await ingest.log_events(batch(0))
            assert (again.stored, again.duplicates) == (len(batch(0)) - 3, 3)
            return features(online)
        finally:
            await ingest.close()

    np.testing.assert_array_equal(asyncio.run(scenario()), reference(range(1)))


POISON = [  # what the outside probe sent, and kin: each refused by the rules LogEvents applies
    ({"ts_us": 10**17}, "ts"),  # past year 9999 as a datetime: every Rank failed INTERNAL before
    ({"ts_us": 4_102_444_800_000_000}, "ts"),  # 2100-01-01: moved every replica's feature clock before
    ({"ts_us": 2**63}, "ts"),  # past int64: stopped the fold for good before
    ({"position": 2**63}, "position"),
    ({"user_id": "x" * 100_000}, "user_id"),
    ({"item_id": " "}, "item_id"),
    ({"event_id": 7}, "event_id"),
    ({"ts_us": 10**15}, "ts"),  # 2001 is fine; 10**15 µs is 2001-09-09: accepted (a control)
]


def test_the_fold_refuses_what_log_events_refuses_and_goes_on(stream_cfg):
    """Issue 30: the stream is an input too. Messages from another producer that LogEvents would
    refuse are skipped and counted by the field the rules name, on every replica the same way
    (their future bound is the message's JetStream time); the fold goes on with the next good
    events, and the feature clock moves only with accepted ones."""
    import json

    async def scenario():
        writer, _ = await open_ingest(stream_cfg)
        await writer.log_events(batch(0))
        nc = await nats.connect(MACHINE_NATS)
        good = json.loads(encode_event(batch(1)[0]))
        for change, _ in POISON:
            await nc.jetstream().publish(f"{stream_cfg.subject_prefix}.u.x", json.dumps({**good, **change}).encode())
        await nc.close()
        last = (await writer.log_events(batch(1))).last_seq
        await writer.close()
        folded = []
        for _ in range(2):  # two replicas folding the same stream decide alike
            ingest, online = await open_ingest(stream_cfg)
            try:
                assert ingest.committed_seq >= last  # (the dead letters follow)
                folded.append((dict(ingest.stats.refused), ingest.stats.bad_messages, online.watermark, features(online)))
            finally:
                await ingest.close()
        return folded

    async def dead_letters() -> list[tuple[int, str]]:
        """(the skipped message's seq, the reason) of each dead letter in the stream."""
        from nats.js.api import AckPolicy, ConsumerConfig

        nc = await nats.connect(MACHINE_NATS)
        try:
            js = nc.jetstream()
            sub = await js.pull_subscribe(f"{stream_cfg.subject_prefix}.dead.>", stream=stream_cfg.stream,
                                          config=ConsumerConfig(ack_policy=AckPolicy.NONE))
            out = []
            try:
                while True:
                    for m in await sub.fetch(50, timeout=1):
                        out.append((int(m.headers["Semrank-Dead-Seq"]), m.headers["Semrank-Dead-Reason"]))
            except (nats.errors.TimeoutError, asyncio.TimeoutError):  # (nats-py raises either when none is left)
                return out
        finally:
            await nc.close()

    (refused, bad, clock, got), (refused2, _, clock2, got2) = asyncio.run(scenario())
    dead = asyncio.run(dead_letters())
    # one copy per skipped message for operators, though two replicas skipped each (message id dead-<seq>)
    assert len(dead) == len({s for s, _ in dead}) == len(POISON) - 1, dead
    assert sum("ts:" in reason for _, reason in dead) == 3
    assert refused == refused2 == {"ts": 3, "position": 1, "user_id": 1, "item_id": 1, "event_id": 1}
    assert bad == len(POISON) - 1  # the control was applied
    assert clock == clock2 and clock.timestamp() * 1e6 == max(e.ts_us for e in batch(1))  # the clock: good events only
    np.testing.assert_array_equal(got, got2)


def test_replicas_share_one_pseudonym_key_and_with_it_the_fold_refuses_raw_ids(stream_cfg):
    """Issue 18: a replica whose pseudonym key differs from the fleet's (or that has none when the
    fleet has one, or the reverse) is refused before it folds; with the key on, an event another
    producer published with a raw user id is refused (`user_id`) and a pseudonym's folds."""
    from featurizer.errors import ConfigError
    from featurizer.privacy import Pseudonyms

    key = Pseudonyms(b"k" * 32)

    async def open_with(names: Pseudonyms):
        online = OnlineFeatures(InProcessStore(), ITEMS)
        return await StreamIngest.open(stream_cfg, online, StoreWorker(False), dedup_window_s=3600,
                                       ready_timeout_s=60, pseudonyms=names), online

    async def scenario():
        first, online = await open_with(key)
        try:
            for other in (Pseudonyms(b"j" * 32), Pseudonyms(None)):
                with pytest.raises(ConfigError, match="fingerprint"):
                    await open_with(other)
            again, _ = await open_with(Pseudonyms(b"k" * 32))  # the same key: agreed
            await again.close()
            raw = LoggedEvent(T0_US, "alice", "i1", "click", event_id="raw-1")
            mapped = LoggedEvent(T0_US, key("alice"), "i2", "click", event_id="mapped-1")
            last = (await first.log_events([raw, mapped])).last_seq
            assert await first.wait_folded(last, 10.0)
            at = online.watermark + timedelta(seconds=1)
            return dict(first.stats.refused), online.sequence("alice", at), online.sequence(key("alice"), at)
        finally:
            await first.close()

    refused, raw_seq, mapped_seq = asyncio.run(scenario())
    assert refused == {"user_id": 1} and raw_seq == [] and mapped_seq == ["i2"]


def test_item_messages_obey_the_item_rules_of_upsert_items(stream_cfg):
    """The outside probe got 100 KB ids, NaN prices and untitled items in through the stream's item
    messages. The fold checks them with the rules UpsertItems applies; refused ones are skipped,
    counted (reason "item") and dead-lettered, and the good ones reach the catalog hook."""
    import json

    from serving.ingest.stream_format import KIND_HEADER, encode_item, item_subject

    good = {"item_id": "sku-ok", "title": "Linen apron", "description": None, "category": "Kitchen", "brand": None,
            "price": 19.5}
    bad = [{**good, "item_id": "x" * 100_000}, {**good, "item_id": "sku-nan", "price": float("nan")},
           {**good, "item_id": "sku-untitled", "title": None}, {**good, "item_id": "sku-neg", "price": -1.0},
           {**good, "item_id": "sku-num-title", "title": 7}]

    async def scenario():
        nc = await nats.connect(MACHINE_NATS)
        writer, _ = await open_ingest(stream_cfg)  # makes the stream
        await writer.close()
        for row in [*bad, good]:
            data = json.dumps({"item": row, "embeddings": {}}).encode() if row["title"] == 7 else encode_item(row, {})
            await nc.jetstream().publish(item_subject(stream_cfg.subject_prefix, str(row["item_id"])[:50]), data,
                                         headers={KIND_HEADER: "item"})
        await nc.close()
        got = []
        online = OnlineFeatures(InProcessStore(), ITEMS)

        async def on_items(items):
            got.extend(i.row["item_id"] for i in items)

        ingest = await StreamIngest.open(stream_cfg, online, StoreWorker(online.store.remote), dedup_window_s=3600,
                                         ready_timeout_s=60, on_items=on_items, item_known=lambda i: False)
        try:
            return got, dict(ingest.stats.refused), ingest.stats.bad_messages
        finally:
            await ingest.close()

    got, refused, bad_count = asyncio.run(scenario())
    assert got == ["sku-ok"] and refused == {"item": len(bad)} and bad_count == len(bad)


def test_a_fetch_is_folded_in_time_slices_with_the_loop_free_between_them(monkeypatch):
    """Issue 30 (writes never stall reads): the events of one fetch are committed in slices sized by
    `ApplySlices` (here a fixed 7), each with its stream seq, other tasks (a Rank) running between
    them; the features equal one apply of them all."""
    import serving.ingest.jetstream as js_mod
    from serving.ingest.apply import ApplySlices

    events = [e for k in range(4) for e in batch(k)]
    pairs = list(enumerate(events, start=1))
    commits, ticks = [], []
    real = js_mod.apply_logged
    monkeypatch.setattr(js_mod, "apply_logged", lambda online, evs, last, after, **kw: (
        commits.append((len(evs), last, len(ticks))), real(online, evs, last, after, **kw))[1])
    online = OnlineFeatures(InProcessStore(), ITEMS)
    ingest = StreamIngest(JetStreamConfig(stream="slices-" + uuid.uuid4().hex[:8]), online, StoreWorker(False), 0,
                          slices=ApplySlices(max_events=7, min_events=7))

    async def scenario():
        async def other_work():
            while True:
                ticks.append(1)
                await asyncio.sleep(0)

        task = asyncio.create_task(other_work())
        await asyncio.sleep(0)
        await ingest._apply_pairs(pairs, len(pairs) + 2)  # (the fetch ended on two non-event messages)
        task.cancel()

    asyncio.run(scenario())
    sizes = [n for n, _, _ in commits]
    assert sizes == [7] * (len(events) // 7) + ([len(events) % 7] if len(events) % 7 else []), sizes
    assert [last for _, last, _ in commits[:-1]] == [7 * (k + 1) for k in range(len(commits) - 1)]
    assert commits[-1][1] == len(pairs) + 2 == ingest.committed_seq
    assert all(b[2] > a[2] for a, b in zip(commits, commits[1:]))  # the other task ran between slices
    want = OnlineFeatures(InProcessStore(), ITEMS)
    want.apply(events_frame(events))
    np.testing.assert_array_equal(features(online), features(want))


def test_the_fold_lags_within_the_write_share_while_ranks_are_served(monkeypatch):
    """Issue 30 item 4: with `write_share` 0.25 and Ranks being served, each of a fetch's slices starts
    at least 3x the previous slice's commit time after it ended (the fold lags, not the Ranks); the
    features equal one apply of them all."""
    import serving.ingest.jetstream as js_mod
    from serving.ingest.apply import ApplySlices

    events = [e for k in range(4) for e in batch(k)]
    pairs = list(enumerate(events, start=1))
    spans = timed_commits(monkeypatch, js_mod)
    online = OnlineFeatures(InProcessStore(), ITEMS)
    slices = ApplySlices(max_events=7, min_events=7, write_share=0.25, ranks_active=lambda: True)
    ingest = StreamIngest(JetStreamConfig(stream="share-" + uuid.uuid4().hex[:8]), online, StoreWorker(False), 0,
                          slices=slices)
    asyncio.run(ingest._apply_pairs(pairs, len(pairs)))
    assert len(spans) == -(-len(events) // 7) and ingest.committed_seq == len(pairs)
    gaps = gap_ratios(spans)
    assert min(gaps) >= 3.0 * 0.999 and slices.paused_s > 0, gaps
    want = OnlineFeatures(InProcessStore(), ITEMS)
    want.apply(events_frame(events))
    np.testing.assert_array_equal(features(online), features(want))


def test_one_late_probe_answer_is_not_a_hung_nats(stream_cfg):
    """Readiness goes down only after `probe_misses` unanswered probes in a row, and a reply resets the
    count: under a full CPU one reply read late behind Ranks took a loaded replica out of rotation.
    Fault injection: the NATS client's request fails on demand (a fake wrapped around the real one)."""

    async def go():
        ingest, _ = await open_ingest(dataclasses.replace(stream_cfg, probe_misses=3, probe_timeout_s=0.5))
        real = ingest.link.nc.request
        fail = {"left": 0}

        async def faulty_request(*args, **kwargs):
            if fail["left"] > 0:
                fail["left"] -= 1
                raise asyncio.TimeoutError()
            return await real(*args, **kwargs)

        ingest.link.nc.request = faulty_request
        try:
            assert await ingest.probe() is None
            fail["left"] = 2
            assert [await ingest.probe() for _ in range(3)] == [None, None, None]  # two misses, then an answer
            fail["left"] = 3
            got = [await ingest.probe() for _ in range(3)]
            assert got[:2] == [None, None] and "NATS does not answer (TimeoutError, 3 probes in a row)" == got[2]
            assert await ingest.probe() is None  # answered again: ready again
        finally:
            await ingest.close()

    asyncio.run(go())
