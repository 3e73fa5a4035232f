"""The fleet's control bucket on JetStream: a KV, `<stream>_CONTROL`, beside the event stream.

    kv = await control_bucket(js, cfg)
    await agree_pseudonyms(js, cfg, pseudonyms.fingerprint)   # before a replica folds anything

Keys: `bundle`, the fleet's serving bundle (serving.ranking.shared_bundle), and `pseudonyms`, the
fingerprint of the pseudonym key the fleet's stored ids were made with (featurizer.privacy; null
for none). The first replica of a stream records its own; a replica started with another key, or
without one when the fleet has one (or the reverse), is refused before it folds a message: its
LogEvents would publish ids no other replica can match, and its A/B arms would differ.

`erasure.<hash>`: one per user erased on request (`featurizer.erasure`'s keyed hash, under the
key derived from the fleet's pseudonym key, so every replica computes the same one), with the
user's stream subject (purged), who asked and when (`publish_erasures`). Each replica applies the
entries it has not applied yet, in the order of their revisions (`fleet_erasures`;
serving.ingest.live_erasure). Never a user id.
"""

from __future__ import annotations

import json
import logging

import nats
import nats.js.errors
from nats.js.api import KeyValueConfig, StorageType

from featurizer.errors import ConfigError
from serving.config import JetStreamConfig

log = logging.getLogger(__name__)

PSEUDONYMS_KEY = "pseudonyms"


def bucket_name(stream: str) -> str:
    return f"{stream}_CONTROL"


async def control_bucket(js, cfg: JetStreamConfig):
    """The stream's control bucket, made by the first replica that needs it."""
    try:
        return await js.key_value(bucket_name(cfg.stream))
    except nats.js.errors.BucketNotFoundError:
        return await js.create_key_value(KeyValueConfig(
            bucket=bucket_name(cfg.stream), description="semrank fleet control (docs/scaling.md)",
            storage=StorageType.FILE, replicas=cfg.replicas, history=5))


async def agree_pseudonyms(js, cfg: JetStreamConfig, fingerprint: str | None) -> None:
    """Record this replica's key fingerprint for the fleet, or check it against the recorded one
    (ConfigError when they differ)."""
    kv = await control_bucket(js, cfg)
    try:
        await kv.create(PSEUDONYMS_KEY, json.dumps({"fingerprint": fingerprint}).encode())
        return
    except nats.js.errors.KeyWrongLastSequenceError:
        pass  # recorded by another replica
    recorded = json.loads((await kv.get(PSEUDONYMS_KEY)).value).get("fingerprint")
    if recorded != fingerprint:
        have = "no key (user ids stored as given)" if recorded is None else f"the key with fingerprint {recorded}"
        want = "no key" if fingerprint is None else f"the key with fingerprint {fingerprint}"
        raise ConfigError(f"stream {cfg.stream}: the fleet's stored ids were made with {have}, and this replica has "
                          f"{want}; start every replica with the same key, or re-key through a replay into a new "
                          "stream (docs/privacy.md)")


ERASURE_PREFIX = "erasure."


async def publish_erasures(js, cfg: JetStreamConfig, entries: list[dict]) -> None:
    """Put one fleet erasure entry per user ({"user": hash, "subject", "requested_by", "at"})."""
    kv = await control_bucket(js, cfg)
    for e in entries:
        await kv.put(ERASURE_PREFIX + e["user"], json.dumps(e).encode())


async def fleet_erasures(js, cfg: JetStreamConfig, known: frozenset[str] | set[str] = frozenset()) -> list[dict]:
    """The fleet's erasure entries whose hash is not in `known`, each with its `revision`, in the
    order of their revisions. Read from the bucket's stream (one stream-info request lists the
    entries' subjects, one direct get reads each new one), not with a KV watcher: nats-py's
    `keys()` can end its replay early or hang (nats-io/nats.py#842, #995)."""
    await control_bucket(js, cfg)
    stream, subject = f"KV_{bucket_name(cfg.stream)}", f"$KV.{bucket_name(cfg.stream)}.{ERASURE_PREFIX}"
    info = await js.stream_info(stream, subjects_filter=subject + "*")
    out = []
    for name in info.state.subjects or {}:
        if name[len(subject):] in known:
            continue
        msg = await js.get_last_msg(stream, name)
        if msg.data:  # (a deleted key's marker has none)
            out.append(json.loads(msg.data) | {"revision": msg.seq})
    return sorted(out, key=lambda e: e["revision"])


async def connect_once(cfg: JetStreamConfig, what: str):
    """A short connection of a replica's start-up, before its stream's (no reconnects); None, with
    a warning naming `what` could not be done, when NATS cannot be reached: the stream's own
    connection then reports NATS problems clearly."""
    try:
        return await nats.connect(servers=cfg.servers, connect_timeout=cfg.connect_timeout_s,
                                  max_reconnect_attempts=0)
    except Exception as e:  # noqa: BLE001 - nats raises many kinds
        log.warning("%s: cannot reach NATS (%s)", what, type(e).__name__)
        return None


async def list_fleet_erasures(cfg: JetStreamConfig) -> list[dict]:
    """`fleet_erasures` at a replica's start-up ([] when NATS cannot be reached)."""
    nc = await connect_once(cfg, "the fleet's erasures were not read")
    if nc is None:
        return []
    try:
        return await fleet_erasures(nc.jetstream(timeout=cfg.connect_timeout_s * 5), cfg)
    finally:
        await nc.close()
