"""Exactly-once for events that carry an `event_id`: ids seen within a window are not stored again.

    dedup = EventDedup(window_s=86_400)
    fresh, dupes = dedup.reserve(batch, now_us)   # before the append: claims the new ids
    ...append fresh...; dedup.release(fresh) if the append failed

The contract (docs/serving.md, "Exactly once"):
- An event with an `event_id` whose id was stored within the window (by event time: the window
  ends at the newest event time seen, or the server clock when that is later) is a duplicate: it
  is not stored or applied again, and LogEvents counts it in `duplicates`, not `accepted`. A
  client that retries a call after any failure, with the same ids, never double-counts.
- Ids are claimed before the append, in the event loop, so two concurrent calls with one id store
  it once; a failed append gives the claims back.
- The set survives a restart: `rebuild(events)` reads the ids of the event log's events inside
  the window (the log is the truth; nothing else is persisted).
- Events without an `event_id` are never deduplicated.

Memory: one Python int (a 64-bit hash of the id) per id in the window, bucketed by hour of event
time, about 100 bytes each; a window of 24 h at 100 events/s holds 8.6M ids, about 0.9 GB. The
window is configurable (`Limits.dedup_window_s`; 0 turns deduplication off).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

from serving.ingest.log_format import LoggedEvent

BUCKET_US = 3_600_000_000  # one hour of event time per bucket: expiry drops whole buckets


def id_hash(event_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(event_id.encode(), digest_size=8).digest(), "little", signed=True)


class EventDedup:
    def __init__(self, window_s: float = 86_400.0):
        if window_s < 0:
            raise ValueError(f"window_s={window_s} must be >= 0 (0 turns deduplication off)")
        self.window_us = int(window_s * 1e6)
        self._buckets: dict[int, set[int]] = {}
        self._newest_us = 0

    @property
    def enabled(self) -> bool:
        return self.window_us > 0

    def __len__(self) -> int:
        return sum(len(b) for b in self._buckets.values())

    def _seen(self, h: int) -> bool:
        return any(h in b for b in self._buckets.values())

    def _expire(self, now_us: int) -> None:
        self._newest_us = max(self._newest_us, now_us)
        oldest = (self._newest_us - self.window_us) // BUCKET_US
        for k in [k for k in self._buckets if k < oldest]:
            del self._buckets[k]

    def _add(self, h: int, ts_us: int) -> None:
        self._buckets.setdefault(ts_us // BUCKET_US, set()).add(h)

    def reserve(self, events: Sequence[LoggedEvent], now_us: int) -> tuple[list[LoggedEvent], int]:
        """(the events to store, how many were duplicates). Claims the new ids at once."""
        if not self.enabled:
            return list(events), 0
        self._expire(now_us)
        fresh, dupes = [], 0
        for e in events:
            if e.event_id:
                h = id_hash(e.event_id)
                if self._seen(h):
                    dupes += 1
                    continue
                self._add(h, e.ts_us)
            fresh.append(e)
        return fresh, dupes

    def release(self, events: Iterable[LoggedEvent]) -> None:
        """Give back the claims of events whose append failed."""
        for e in events:
            if e.event_id:
                self._buckets.get(e.ts_us // BUCKET_US, set()).discard(id_hash(e.event_id))

    def rebuild(self, events: Iterable[LoggedEvent], now_us: int) -> int:
        """Claim the ids of stored events (the event log, at start-up); returns how many are kept."""
        if not self.enabled:
            return 0
        for e in events:
            if e.event_id:
                self._add(id_hash(e.event_id), e.ts_us)
                self._newest_us = max(self._newest_us, e.ts_us)
        self._expire(now_us)
        return len(self)
