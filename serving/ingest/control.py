"""The fleet's control bucket on JetStream: a KV, `<stream>_CONTROL`, beside the event stream.

    kv = await control_bucket(js, cfg)
    await agree_pseudonyms(js, cfg, pseudonyms.fingerprint)   # before a replica folds anything

Keys: `bundle`, the fleet's serving bundle (serving.ranking.shared_bundle), and `pseudonyms`, the
fingerprint of the pseudonym key the fleet's stored ids were made with (featurizer.privacy; null
for none). The first replica of a stream records its own; a replica started with another key, or
without one when the fleet has one (or the reverse), is refused before it folds a message: its
LogEvents would publish ids no other replica can match, and its A/B arms would differ.
"""

from __future__ import annotations

import json

import nats.js.errors
from nats.js.api import KeyValueConfig, StorageType

from featurizer.errors import ConfigError
from serving.config import JetStreamConfig

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
