"""The messages of the event stream on JetStream, as any producer writes them (docs/scaling.md):
the subjects, an event's JSON body, and the item messages UpsertItems shares between replicas.
The local event log's own format is serving/ingest/log_format.py.

    subject_for("semrank.events", "u1")      # "semrank.events.u.<32 hex digits>"
    decode_event(encode_event(e)) == e       # BadStreamMessage: not a JSON object (fields: the event rules)
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass

import numpy as np

from featurizer.contracts.schema import EVENT_TYPES
from serving.ingest.log_format import LoggedEvent

KIND_HEADER, ORIGIN_HEADER = "Semrank-Kind", "Semrank-Origin"  # "item" on item messages (events need none)


class BadStreamMessage(ValueError):
    """A stream message that is not a semrank event (wrong format, missing or invalid fields)."""


def user_key(user_id: str) -> str:
    """The subject token of a user: 32 hex digits of BLAKE2b(user_id) (subjects cannot carry any id)."""
    return hashlib.blake2b(user_id.encode(), digest_size=16).hexdigest()


def subject_for(prefix: str, user_id: str) -> str:
    return f"{prefix}.u.{user_key(user_id)}"


def encode_event(e: LoggedEvent) -> bytes:
    return json.dumps({"ts_us": e.ts_us, "user_id": e.user_id, "item_id": e.item_id, "type": e.event,
                       "request_id": e.request_id, "position": e.position, "event_id": e.event_id},
                      ensure_ascii=False, separators=(",", ":")).encode()


def decode_event(data: bytes) -> LoggedEvent:
    """The event a message carries, as it came: BadStreamMessage only when it is not a JSON object.
    Its fields are checked by `featurizer.contracts.event_rules.EventRules`, the rules LogEvents
    applies (the fold does it, at the message's JetStream time), so one definition decides."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise BadStreamMessage(f"not JSON ({type(e).__name__})") from None
    if not isinstance(doc, dict):
        raise BadStreamMessage("not a JSON object")
    return LoggedEvent(doc.get("ts_us"), doc.get("user_id"), doc.get("item_id"), doc.get("type"),
                       doc.get("request_id", ""), doc.get("position", 0), doc.get("event_id", ""))


ITEM_FIELDS = ("item_id", "title", "description", "category", "brand", "price")


@dataclass(frozen=True)
class SharedItem:
    """An UpsertItems row on the stream, with the embeddings the replica that took it computed."""

    row: dict  # ITEM_FIELDS; None leaves a known value unchanged
    embeddings: dict  # encoder key -> (text hash, float32 vector)
    origin: str = ""  # the replica that published it (it has applied it already)


def item_subject(prefix: str, item_id: str) -> str:
    return f"{prefix}.items.{user_key(item_id)}"


def encode_item(row: dict, embeddings: dict) -> bytes:
    return json.dumps({"item": {k: row.get(k) for k in ITEM_FIELDS},
                       "embeddings": {key: {"text_hash": int(h), "vector": base64.b64encode(
                           np.asarray(v, dtype="<f4").tobytes()).decode()} for key, (h, v) in embeddings.items()}},
                      ensure_ascii=False, separators=(",", ":")).encode()


def decode_item(data: bytes, origin: str = "") -> SharedItem:
    """The item row and embeddings a message carries, as they came: BadStreamMessage when it is not
    an item message. The row's fields are checked by `featurizer.contracts.event_rules.ItemRules`,
    the rules UpsertItems applies (the fold does it)."""
    try:
        doc = json.loads(data)
        item = doc["item"]
        if not isinstance(item, dict):
            raise BadStreamMessage("item: must be a JSON object")
        row = {k: item.get(k) for k in ITEM_FIELDS}
        embeddings = {key: (int(e["text_hash"]), np.frombuffer(base64.b64decode(e["vector"]), dtype="<f4"))
                      for key, e in (doc.get("embeddings") or {}).items()}
    except BadStreamMessage:
        raise
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError) as e:
        raise BadStreamMessage(f"not an item message ({type(e).__name__}: {str(e)[:200]})") from None
    return SharedItem(row, embeddings, origin)
