"""Erasing users from a state directory, the server stopped (issue 18 item 3; `semrank privacy
delete-user`). In order:

1. the event log: every event of the users is replaced by null (`EventLog.erase`; the log's lock
   refuses this while a server has it open);
2. the exposure log: their records are removed (`erase_exposures`);
3. the feature state is dropped: the in-process snapshot (`online-store.bin` and its delta), or
   with `redis` every key of the server's Redis namespace. The features count the users' events
   in user, item, user x item and co-occurrence states, which cannot be subtracted from, so the
   next start rebuilds them from the data directory and the log, both without the users (the
   restore drops the data directory's events of erased users);
4. the erasure is recorded (featurizer.erasure): keyed hashes, who asked, when, what was removed.

Batch the users of one run: the rebuild at the next start costs the same for one or many.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from featurizer.erasure import Erasures
from featurizer.store.config import RedisConfig
from featurizer.store.redis import RedisStore
from featurizer.store import snapshot_files
from serving.experiments.exposure_log import erase_exposures
from serving.ingest.event_log import EventLog
from serving.ingest.restore import SNAPSHOT_FILE

log = logging.getLogger(__name__)


def erase_users(state_dir: Path, stored_ids: list[str], erasures: Erasures, requested_by: str,
                redis: RedisConfig | None = None) -> dict:
    """Erase `stored_ids` from `state_dir` (see the module docstring); returns what was removed and
    how long each step took."""
    state_dir = Path(state_dir)
    users = set(stored_ids)
    out: dict = {"users": len(users)}
    t0 = time.monotonic()
    if (state_dir / "events").is_dir():
        with EventLog(state_dir / "events") as event_log:
            out["events"] = event_log.erase(users)
    else:
        out["events"] = 0
    out["event_log_s"] = round(time.monotonic() - t0, 3)
    t1 = time.monotonic()
    out["exposures"] = erase_exposures(state_dir / "exposures", users) if (state_dir / "exposures").is_dir() else 0
    out["exposures_s"] = round(time.monotonic() - t1, 3)
    snapshot = state_dir / SNAPSHOT_FILE
    out["snapshot_deleted"] = snapshot.exists()
    snapshot.unlink(missing_ok=True)
    snapshot_files.delta_path(snapshot).unlink(missing_ok=True)
    if redis is not None:
        store = RedisStore(redis)
        try:
            out["redis_keys_deleted"] = store.drop_namespace()
        finally:
            store.close()
    erasures.record(users, requested_by, {k: out[k] for k in ("events", "exposures", "snapshot_deleted")})
    out["seconds"] = round(time.monotonic() - t0, 3)
    log.info("erased %d user(s): %d event(s), %d exposure record(s); the feature snapshot %s", len(users),
             out["events"], out["exposures"], "deleted: the next start rebuilds the features without them"
             if out["snapshot_deleted"] else "was absent")
    return out
