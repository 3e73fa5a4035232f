"""Appends batches to an EventLog until killed; prints one line per acknowledged batch, flushed after
append returns: `<last seq> <event id>,<event id>,...`. The events follow from their ids (`event_for`).

    python -m tests.serving.ingest.event_log_crash_writer DIR SEED {sync,async}
"""

from __future__ import annotations

import asyncio
import random
import sys
from pathlib import Path

from featurizer.contracts.schema import EVENT_TYPES
from serving.ingest.event_log import EventLog
from serving.ingest.log_format import LoggedEvent


def event_for(event_id: str) -> LoggedEvent:
    n = sum(ord(c) * (k + 1) for k, c in enumerate(event_id))
    return LoggedEvent(
        ts_us=1_767_225_600_000_000 + n, user_id=f"u{n % 7}", item_id=f"i{n % 13}", event=EVENT_TYPES[n % 4],
        request_id=f"r-{event_id}", position=n % 5, event_id=event_id,
    )


def ack(seq: int, batch: list[LoggedEvent]) -> None:
    print(seq, ",".join(e.event_id for e in batch), flush=True)


def batch_of(rng: random.Random, prefix: str, k: int) -> list[LoggedEvent]:
    # Some batches are large, so that a kill can land inside a write.
    size = rng.choice([1, 2, 5, 20, 400])
    return [event_for(f"{prefix}{k}.{j}") for j in range(size)]


async def writer(log: EventLog, rng: random.Random, task: int) -> None:
    for k in range(10**9):
        batch = batch_of(rng, f"t{task}.", k)
        ack(await log.append_async(batch), batch)


def main() -> None:
    directory, seed, mode = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    rng = random.Random(seed)
    log = EventLog(directory, segment_bytes=32 << 10)
    if mode == "async":
        async def run() -> None:
            await asyncio.gather(*(writer(log, random.Random(seed * 100 + t), t) for t in range(8)))

        asyncio.run(run())
    for k in range(10**9):
        batch = batch_of(rng, "s.", k)
        ack(log.append(batch), batch)


if __name__ == "__main__":
    main()
