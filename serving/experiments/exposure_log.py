"""Exposure log writer: one JSON line per Rank, written off the request path; `semrank ab report` reads it.

The format (keys, ts format, file names) and the reader live in `featurizer.contracts.exposures`, the data
contract shared with training; `read_exposures` and `read_exposures_report` are re-exported here.
Files are `exposures-<UTC yyyymmddTHHMMSS>-<seq>.jsonl`; a process never appends to a file it did
not create, so a torn last line (a crash mid-write) stays the last line of its file.

`ExposureLog.record()` only appends to an in-memory buffer under a lock that the writer thread holds
for a list swap, never across I/O; when the writer is more than `max_backlog` records behind, new
records are dropped and counted in `dropped` instead of blocking the caller. What is lost (dropped,
or failed to write) is also counted per experiment and variant in this writer's
`exposure-losses-<stamp>-<pid>.json` beside the segments, so the report can say which arm lost what
(`featurizer.contracts.exposures.read_losses`).

Retention (`expire`, run by the server: serving.retention): files last written more than the maximum
age ago are deleted, never the one this writer has open; a file also closes when it is
`segment_max_age_s` old, so a quiet log's records age out too.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Callable, Iterable

import orjson

from featurizer.contracts.exposures import FILE_GLOB, FILE_PREFIX, FILE_SUFFIX, LOSSES_GLOB, TS_FORMAT, losses_file_name

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class Exposure:
    request_id: str
    user_id: str
    experiment: str  # "" when the user is in no experiment
    variant: str
    bundle_version: str
    item_ids: tuple[str, ...]  # as returned, best first; a list is copied to a tuple
    ts: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    teams: tuple[str, ...] = ()  # an interleaved arm: each item's team ("A" / "B"), aligned with item_ids

    def __post_init__(self) -> None:
        if self.ts.tzinfo is None or self.ts.utcoffset() is None:
            raise ValueError("Exposure.ts must be timezone-aware (the server's UTC time of the Rank)")
        object.__setattr__(self, "item_ids", tuple(self.item_ids))
        object.__setattr__(self, "teams", tuple(self.teams))
        if self.teams and len(self.teams) != len(self.item_ids):
            raise ValueError(f"Exposure.teams has {len(self.teams)} entries for {len(self.item_ids)} items")

    def to_bytes(self) -> bytes:
        """The log line (UTF-8 JSON, without newline). Raises TypeError for a non-string field, so a
        bad record never reaches the file, where it would break every reader. orjson: the writer
        thread shares the server's GIL, and json took about 100 µs for a 1,000-item exposure."""
        strings = (self.request_id, self.user_id, self.experiment, self.variant, self.bundle_version)
        if not all(type(v) is str for v in strings) or not set(map(type, self.item_ids)) <= {str}:
            raise TypeError(f"Exposure fields and item_ids must be strings: {self!r}"[:500])
        ts = self.ts.astimezone(timezone.utc).strftime(TS_FORMAT)
        record = {"ts": ts, "request_id": self.request_id, "user_id": self.user_id, "experiment": self.experiment,
                  "variant": self.variant, "bundle_version": self.bundle_version, "item_ids": self.item_ids}
        if self.teams:
            record["teams"] = self.teams
        return orjson.dumps(record)

    def to_json(self) -> str:
        """`to_bytes` as text."""
        return self.to_bytes().decode()


class ExposureLog:
    """Buffered, rotating JSON Lines writer with a background thread. Use as a context manager or call close()."""

    def __init__(
        self,
        directory: Path,
        flush_interval_s: float = 1.0,
        max_buffer: int = 1000,
        segment_bytes: int = 64 << 20,
        max_backlog: int = 100_000,
        fault_injection_before_write: Callable[[int], None] | None = None,
        segment_max_age_s: float | None = None,
    ):
        """`fault_injection_before_write(n)` is for tests only: the writer thread calls it before writing
        each batch of n records, while holding the I/O lock (so it can slow or stall the writer)."""
        if flush_interval_s <= 0 or max_buffer < 1 or segment_bytes < 1 or max_backlog < 1:
            raise ValueError("flush_interval_s, max_buffer, segment_bytes and max_backlog must be positive")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.flush_interval_s = flush_interval_s
        self.max_buffer = max_buffer
        self.segment_bytes = segment_bytes
        self.max_backlog = max_backlog
        self.segment_max_age_s = segment_max_age_s  # None: a file closes only when full
        self._fault_injection_before_write = fault_injection_before_write
        self.dropped = 0  # records refused because the writer was behind, or recorded after close()
        self.failed = 0  # records lost to write errors (logged)
        self.written = 0
        self._buffer: list[Exposure] = []
        self._in_flight = 0  # taken by the writer, not yet written
        self._dropping = False
        self._closed = False
        self._lock = threading.Lock()  # guards the buffer and counters; never held across I/O
        self._io_lock = threading.Lock()  # serialises batch writes, so file order is record order
        self._wake = threading.Event()
        self._file: IO[bytes] | None = None
        self._file_bytes = 0
        self._file_opened = 0.0  # time.time() when the open file was created
        self._seq = 0
        self._lost: dict[str, Counter] = {"dropped": Counter(), "failed": Counter()}  # "<experiment>\t<variant>"
        self._lost_written = 0  # total lost when the losses file was last written
        self._losses_path = self.directory / losses_file_name(datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S"),
                                                               os.getpid())
        self._thread = threading.Thread(target=self._run, name="exposure-log-writer", daemon=True)
        self._thread.start()

    def record(self, exposure: Exposure) -> None:
        """Queue one exposure. Never blocks on the writer; drops (and counts) when it is too far behind."""
        with self._lock:
            if self._closed or len(self._buffer) + self._in_flight >= self.max_backlog:
                self.dropped += 1
                self._lost["dropped"][f"{exposure.experiment}\t{exposure.variant}"] += 1
                warn = not self._dropping
                self._dropping = True
            else:
                self._buffer.append(exposure)
                if len(self._buffer) >= self.max_buffer:
                    self._wake.set()
                return
        if warn:
            reason = "it is closed" if self._closed else f"the writer is {self.max_backlog} records behind"
            log.warning("exposure log %s: dropping records because %s (dropped so far: %d)",
                        self.directory, reason, self.dropped)

    def flush(self) -> None:
        """Write everything recorded so far and fsync it. Blocks; don't call it from the event loop."""
        with self._io_lock:
            self._write_pending()
            if self._file is not None:
                self._file.flush()
                os.fsync(self._file.fileno())

    def close(self) -> None:
        """Stop the writer, then write, fsync and close everything recorded. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._wake.set()
        self._thread.join()
        with self._io_lock:
            self._write_pending()
            self._close_segment()
            self._write_losses()

    def __enter__(self) -> ExposureLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            with self._io_lock:
                self._write_pending()

    def _write_pending(self) -> None:
        """Write the buffered batch; caller holds _io_lock."""
        with self._lock:
            batch, self._buffer = self._buffer, []
            self._in_flight = len(batch)
        lines: list[bytes] = []
        try:
            for exp in batch:
                try:
                    lines.append(exp.to_bytes() + b"\n")
                except (TypeError, ValueError):
                    self.failed += 1
                    with self._lock:
                        self._lost["failed"][f"{exp.experiment}\t{exp.variant}"] += 1
                    log.exception("exposure log %s: skipping a record that cannot be written", self.directory)
            if lines:
                if self._fault_injection_before_write is not None:
                    self._fault_injection_before_write(len(lines))
                self._write_lines(lines)
                self.written += len(lines)
        except Exception:
            log.exception("exposure log %s: failed to write %d records; starting a new segment",
                          self.directory, len(lines))
            self.failed += len(lines)
            with self._lock:
                for exp in batch:
                    self._lost["failed"][f"{exp.experiment}\t{exp.variant}"] += 1
            self._close_segment(quiet=True)
        finally:
            with self._lock:
                self._in_flight = 0
                caught_up = self._dropping and not self._closed and len(self._buffer) < self.max_backlog // 2
                if caught_up:
                    self._dropping = False
            if caught_up:
                log.warning("exposure log %s: caught up; dropped %d records so far", self.directory, self.dropped)
            self._write_losses()

    def _write_losses(self) -> None:
        """Replace this writer's losses file when something more was lost (caller holds _io_lock)."""
        with self._lock:
            total = sum(self.dropped_and_failed().values())
            if total == self._lost_written:
                return
            data = {kind: dict(c) for kind, c in self._lost.items()}
        tmp = self._losses_path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(data, ensure_ascii=False) + "\n")
            os.replace(tmp, self._losses_path)
            self._lost_written = total
        except OSError:
            log.exception("exposure log %s: cannot write %s", self.directory, self._losses_path.name)

    def expire(self, max_age_s: float, now: float | None = None) -> int:
        """Retention: delete the directory's exposure files and loss counts last written more than
        `max_age_s` ago, except this writer's open file and its own counts; returns how many."""
        now = time.time() if now is None else now
        removed = 0
        with self._io_lock:  # the open file cannot change meanwhile
            keep = {self._losses_path, *([Path(self._file.name)] if self._file is not None else [])}
            for p in [*self.directory.glob(FILE_GLOB), *self.directory.glob(LOSSES_GLOB)]:
                try:
                    if p not in keep and now - p.stat().st_mtime >= max_age_s:
                        p.unlink()
                        removed += 1
                except FileNotFoundError:  # another writer's retention got there first
                    pass
        if removed:
            log.info("exposure log %s: retention deleted %d file(s) written more than %.0f s ago", self.directory,
                     removed, max_age_s)
        return removed

    def erase(self, user_ids: set[str]) -> int:
        """Erasure (issue 18 item 3) with this writer running: what is buffered is written, the open
        file closed (the next record opens a new one), then every file of the directory is rewritten
        without the records of `user_ids` (`erase_exposures`); records wait meanwhile. Returns how
        many records went."""
        with self._io_lock:
            self._write_pending()
            self._close_segment()
            return erase_exposures(self.directory, user_ids)

    def dropped_and_failed(self) -> Counter:
        """Lost records per "<experiment>\t<variant>" (dropped and failed together)."""
        return self._lost["dropped"] + self._lost["failed"]

    def _write_lines(self, lines: Iterable[bytes]) -> None:
        chunk: list[bytes] = []
        aged = (self._file is not None and self.segment_max_age_s is not None
                and time.time() - self._file_opened >= self.segment_max_age_s)
        for line in lines:
            if self._file is not None and self._file_bytes > 0 and (aged or self._file_bytes + len(line) > self.segment_bytes):
                aged = False
                self._file.write(b"".join(chunk))
                chunk = []
                self._close_segment()
            if self._file is None:
                self._open_segment()
            chunk.append(line)
            self._file_bytes += len(line)
        if chunk:
            self._file.write(b"".join(chunk))  # type: ignore[union-attr]
            self._file.flush()  # type: ignore[union-attr]  # visible to readers; fsync on flush/rotate/close

    def _open_segment(self) -> None:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        while True:
            self._seq += 1
            path = self.directory / f"{FILE_PREFIX}{stamp}-{self._seq:06d}{FILE_SUFFIX}"
            try:
                self._file = path.open("xb")  # never append to another process's (or run's) file
                self._file_opened = time.time()
                break
            except FileExistsError:
                continue
        self._file_bytes = 0

    def _close_segment(self, quiet: bool = False) -> None:
        f, self._file, self._file_bytes = self._file, None, 0
        if f is None:
            return
        try:
            f.flush()
            os.fsync(f.fileno())
            f.close()
        except OSError:
            if not quiet:
                raise


def erase_exposures(directory: Path, user_ids: set[str]) -> int:
    """Erasure (issue 18 item 3): rewrite every exposure file of `directory` without the records of
    `user_ids` (stored ids), each through a temp file renamed over it; returns how many records went.
    For a directory no writer has open (an erasure job, server stopped; a running writer's
    `ExposureLog.erase` closes its file first). A line that does not parse
    (a torn last line) is kept as it is."""
    removed = 0
    for path in sorted(Path(directory).glob(FILE_GLOB)):
        kept, gone = [], 0
        with open(path, "rb") as f:
            for line in f:
                try:
                    user = orjson.loads(line).get("user_id")
                except orjson.JSONDecodeError:
                    user = None
                if user in user_ids:
                    gone += 1
                else:
                    kept.append(line)
        if gone:
            tmp = path.with_name(path.name + ".erasing")
            with open(tmp, "wb") as f:
                f.write(b"".join(kept))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            removed += gone
    return removed

