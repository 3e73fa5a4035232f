"""The online features rebuilt from scratch in a child process, beside a running server (an
erasure's rebuild: serving.ingest.live_erasure).

    python -m serving.ingest.rebuild < spec.json      # prints {"seq": ..., "events": ..., "seconds": ...}

The spec (JSON on standard input, so the pseudonym key never shows in argv, the environment or a
file) names the data directory, the state directory (its event log is read without the writer's
lock, as batch jobs read it: a record being written is left out, the parent catches up past it),
the items (a parquet file of the serving catalog, upserts included), the store to build into (an
in-process snapshot file, or another Redis namespace), the feature params of the live state, the
event rules and the users being erased (stored ids: the list on disk does not hold them yet). The
child applies the data directory's events without erased users, then the event log (erased events
are null there; the rest of the users' are dropped too) and closes the store, which persists it
with the log seq it holds. The serving process pays none of this CPU: it only loads the result.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import polars as pl

from featurizer.contracts.event_rules import EventRules
from featurizer.contracts.schema import read_dataset
from featurizer.definitions import FeatureParams
from featurizer.erasure import Erasures
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
    erasures.add(spec["erased"])
    items = pl.read_parquet(spec["items"])
    events = erasures.filter_events(pseudonyms.events(read_dataset(Path(spec["data_dir"])).events))
    store = store_from_config(store_config(spec["store"]))
    try:
        def logged(after: int):
            return ((seq, ev) for seq, ev in read_log(state_dir / "events", after) if ev.user_id not in erasures)

        online = restore_online(store, items, events, logged, EventRules(**spec["rules"]),
                                FeatureParams(**spec["params"]))
        seq = applied_seq(online)
    finally:
        store.close()
    return {"seq": seq, "events": events.height, "seconds": round(time.monotonic() - t0, 3)}


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
