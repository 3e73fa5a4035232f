"""Fault injection for the atomic-apply kill test (test_atomic_apply.py): logs and applies batches
the way `serving.ingest.apply.EventIngest` does, then SIGKILLs itself at KILL_AT while handling
the last one.

    python -m tests.serving.ingest.apply_crash_child STATE_DIR STORE_CONFIG_JSON KILL_AT BATCHES

KILL_AT:
- `after_append`: the last batch is in the event log; nothing of it is applied;
- `mid_commit`: inside the store's one commit of the last batch. Redis: half of the bytes of the
  MULTI ... EXEC block are on the socket; in-process store: the first entity's rows are changed
  in memory, the snapshot file is not written yet;
- `after_commit`: the commit returned; the process dies before it can do anything else;
- `nonatomic_between`: NOT what semrank does. The order before the fix: features committed, the
  log seq written separately, and the kill between the two. The test shows that this one
  double-counts, i.e. that its comparison can fail.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import polars as pl

from featurizer.contracts.schema import EVENT_TYPES
from featurizer.online.features import OnlineFeatures
from featurizer.store.factory import store_from_config
from featurizer.store.in_process import InProcessStore
from serving.ingest.apply import apply_logged
from serving.ingest.event_log import EventLog
from serving.ingest.log_format import LoggedEvent, events_frame

BATCH = 7
T0_US = 1_767_225_600_000_000  # 2026-01-01 UTC
ITEMS = pl.DataFrame({
    "item_id": [f"i{k}" for k in range(11)],
    "title": [f"item {k}" for k in range(11)],
    "category": [f"c{k % 3}" for k in range(11)],
    "brand": [f"b{k % 2}" for k in range(11)],
    "price": [5.0 + k for k in range(11)],
})


def batch(k: int) -> list[LoggedEvent]:
    """Batch k; events are in time order across batches, so batch-wise and bulk applies agree."""
    return [
        LoggedEvent(ts_us=T0_US + (k * BATCH + j) * 60_000_000, user_id=f"u{(k * 3 + j) % 5}",
                    item_id=f"i{(k * 5 + j * 3) % 11}", event=EVENT_TYPES[(k + j) % 4], event_id=f"e{k}.{j}")
        for j in range(BATCH)
    ]


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm_mid_commit(store) -> None:
    if isinstance(store, InProcessStore):
        bump = InProcessStore._bump

        def bump_then_die(self, entity, keys):
            bump(self, entity, keys)
            die()  # one entity updated in memory, the others not, nothing persisted

        InProcessStore._bump = bump_then_die
        return
    from redis.connection import Connection

    send = Connection.send_packed_command

    def send_half_then_die(self, command, check_health=True):
        data = b"".join(bytes(c) for c in ([command] if isinstance(command, (bytes, str)) else command))
        if b"MULTI" not in data:  # the fence's WATCH and GET go through
            return send(self, command, check_health)
        self._sock.sendall(data[: len(data) // 2])  # MULTI, part of the MSETs; never EXEC
        die()

    Connection.send_packed_command = send_half_then_die


def main() -> None:
    state_dir, config, kill_at, n = Path(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    store = store_from_config(config)
    online = OnlineFeatures(store, ITEMS)
    log = EventLog(state_dir / "events")
    for k in range(n):
        events = batch(k)
        seq = log.append(events)
        last = k == n - 1
        if last and kill_at == "after_append":
            die()
        if last and kill_at == "mid_commit":
            arm_mid_commit(store)
        if last and kill_at == "nonatomic_between":
            online.apply(events_frame(events))
            die()  # before store.write("meta", {LOG_SEQ_KEY: ...})
        apply_logged(online, events, seq, seq - len(events))
        if last and kill_at == "after_commit":
            die()
    raise SystemExit(f"KILL_AT {kill_at!r} never fired")


if __name__ == "__main__":
    main()
