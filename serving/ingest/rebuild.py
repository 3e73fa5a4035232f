"""The online features rebuilt from scratch in a child process, beside a running server (an
erasure's rebuild: serving.ingest.live_erasure).

    python -m serving.ingest.rebuild < spec.json      # prints {"seq": ..., "events": ..., "seconds": ...}

The spec (JSON on standard input, so the pseudonym key never shows in argv, the environment or a
file) names the data directory, the state directory (its event log is read without the writer's
lock, as batch jobs read it: a record being written is left out, the parent catches up past it),
the items (a parquet file of the serving catalog, upserts included), the store to build into (an
in-process snapshot file, or another Redis namespace), the feature params of the live state, the
event rules and the users being erased (their keyed hashes: the list on disk may not hold them
yet). The child applies the data directory's events without erased users, then the event log
(erased events are null there; the rest of the users' are dropped too), or with `jetstream` the
stream from its first message up to its end (a fold as a fresh replica's, with the erased users'
messages skipped, item messages applied to the catalog columns, nothing dead-lettered), and closes
the store, which persists it with the seq it holds. The serving process pays none of this CPU: it
only loads the result.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from pathlib import Path

import polars as pl

from featurizer.contracts.event_rules import EventRules, ItemRules
from featurizer.contracts.schema import read_dataset
from featurizer.definitions import FeatureParams
from featurizer.erasure import Erasures
from featurizer.online.features import OnlineFeatures
from featurizer.privacy import Pseudonyms
from featurizer.store.config import store_config
from featurizer.store.factory import store_from_config
from serving.ingest.apply import applied_seq
from serving.ingest.log_format import read_log
from serving.ingest.restore import restore_online

log = logging.getLogger("semrank.rebuild")


def rebuild(spec: dict) -> dict:
    """Build the features `spec` describes (see the module docstring); returns the log seq they hold,
    the events applied and the seconds taken."""
    t0 = time.monotonic()
    key = spec.get("pseudonym_key")
    pseudonyms = Pseudonyms(bytes.fromhex(key) if key else None)
    state_dir = Path(spec["state_dir"])
    erasures = Erasures.open(state_dir, pseudonyms)
    erasures.add(spec["erased"])  # (hashes: the list on disk may not hold them yet)
    items = pl.read_parquet(spec["items"])
    events = erasures.filter_events(pseudonyms.events(read_dataset(Path(spec["data_dir"])).events))
    store = store_from_config(store_config(spec["store"]))
    rules, params = EventRules(**spec["rules"]), FeatureParams(**spec["params"])
    try:
        if spec.get("jetstream"):
            online = OnlineFeatures(store, items, params)
            online.apply(events)
            seq = asyncio.run(_fold_stream(spec, online, set(items["item_id"].to_list()), rules, pseudonyms,
                                           erasures))
        else:
            def logged(after: int):
                return ((seq, ev) for seq, ev in read_log(state_dir / "events", after) if ev.user_id not in erasures)

            seq = applied_seq(restore_online(store, items, events, logged, rules, params))
    finally:
        store.close()
    return {"seq": seq, "events": events.height, "seconds": round(time.monotonic() - t0, 3)}


async def _fold_stream(spec: dict, online: OnlineFeatures, known: set[str], rules: EventRules,
                       pseudonyms: Pseudonyms, erasures: Erasures) -> int:
    """Fold the whole stream into `online` (see the module docstring); returns the seq it holds."""
    from serving.config import JetStreamConfig
    from serving.ingest.jetstream import StreamIngest
    from serving.ranking.store_worker import StoreWorker

    ingest = await StreamIngest.open(
        JetStreamConfig(**spec["jetstream"]), online, StoreWorker(False), spec["dedup_window_s"], rules=rules,
        item_rules=ItemRules(**spec["item_rules"]), on_items=catalog_items(online, known), item_known=known.__contains__,
        pseudonyms=pseudonyms, erasures=erasures, dead_letters=False)
    try:
        return ingest.committed_seq
    finally:
        await ingest.close()


def catalog_items(online: OnlineFeatures, known: set[str]):
    """A fold's hook for item messages that applies them to the features' catalog columns only (no
    item store, no embeddings: an erasure's rebuild)."""
    from serving.ingest.items import shared_items_frame

    async def apply(shared) -> None:
        frame = shared_items_frame(shared)
        online.upsert_items(frame)
        known.update(frame["item_id"].to_list())

    return apply


def main() -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s semrank.rebuild: %(message)s")
    spec = json.load(sys.stdin)
    out = rebuild(spec)
    log.info("features rebuilt: %d data-directory event(s), the event log up to seq %d, in %.1f s",
             out["events"], out["seq"], out["seconds"])
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
