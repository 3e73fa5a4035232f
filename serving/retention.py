"""Retention (issue 18 item 4): how long `semrank serve` keeps what shoppers did, applied by
compaction while it runs (`Retention.run`, every `every_s`, the first time at start-up).

- **The event log** (`--retain-events-days`): closed segments whose last write is older than the
  age and whose events a persisted feature state holds are deleted (`EventLog.compact`): the
  features keep counting what they counted, a restart never misses an event the snapshot lacks,
  and only the raw events go. With the in-process store, "persisted" is the last snapshot this
  process wrote (so with `--snapshot-interval-s 0` nothing is ever deleted, and start-up warns);
  with Redis, whatever the store committed. At most 1/8 of the age is added by the open segment,
  which closes at that age. Must be at least the exactly-once window (`Limits.dedup_window_s`):
  the log is what rebuilds it at start-up.
- **Exposures** (`--retain-exposures-days`): exposure files and loss counts last written before
  the age (`ExposureLog.expire`); the open file closes at 1/8 of the age.
- **Logs**: semrank writes its JSON logs to stderr and keeps none itself: their retention is the
  collector's (journald, the container runtime, the log shipper); they carry pseudonyms, never raw
  ids (docs/privacy.md).
- **JetStream** (`--events jetstream`): the stream's own `max_age` limits it; no local event log.

What a deletion does to the features: nothing. They are aggregates already counted; a rebuild
from scratch (a lost Redis, a new replica without a snapshot) sees only the retained events and
the data directory's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from featurizer.errors import ConfigError

log = logging.getLogger(__name__)

DAY_S = 86_400.0
SEGMENT_AGE_SHARE = 8  # an open segment or exposure file closes at 1/8 of the retention age


@dataclass(frozen=True)
class RetentionConfig:
    events_s: float = 0.0  # the event log's maximum age; 0: kept for ever
    exposures_s: float = 0.0  # the exposure log's; 0: kept for ever
    every_s: float = 600.0  # how often compaction runs

    def __post_init__(self) -> None:
        if self.events_s < 0 or self.exposures_s < 0 or self.every_s <= 0:
            raise ConfigError(f"retention ages must be >= 0 (0: for ever) and every_s > 0, got {self}")

    def check(self, dedup_window_s: float) -> None:
        if 0 < self.events_s < dedup_window_s:
            raise ConfigError(f"event retention of {self.events_s:.0f} s is shorter than the exactly-once window "
                              f"({dedup_window_s:.0f} s) that the event log rebuilds at start-up")

    @staticmethod
    def segment_age(age_s: float) -> float | None:
        """How old an open segment (or exposure file) may grow under a retention age (None: no limit)."""
        return age_s / SEGMENT_AGE_SHARE if age_s > 0 else None


class Retention:
    """Applies a RetentionConfig to one server's event log and exposure log. `covered()` gives the last
    event-log seq a persisted feature state holds."""

    def __init__(self, cfg: RetentionConfig, event_log, exposures, covered: Callable[[], int]):
        self.cfg, self.event_log, self.exposures, self.covered = cfg, event_log, exposures, covered

    def run_once(self, now: float | None = None) -> dict[str, int]:
        """One compaction: events deleted from the log, exposure files deleted."""
        now = time.time() if now is None else now
        out = {"events": 0, "exposure_files": 0}
        if self.cfg.events_s and self.event_log is not None:
            out["events"] = self.event_log.compact(self.cfg.events_s, self.covered(), now)
        if self.cfg.exposures_s and self.exposures is not None:
            out["exposure_files"] = self.exposures.expire(self.cfg.exposures_s, now)
        return out

    async def run(self) -> None:
        """`run_once` every `every_s` (off the event loop), the first time now; failures are logged."""
        while True:
            try:
                await asyncio.to_thread(self.run_once)
            except Exception:  # noqa: BLE001 - retried at the next interval
                log.exception("retention compaction failed")
            await asyncio.sleep(self.cfg.every_s)
