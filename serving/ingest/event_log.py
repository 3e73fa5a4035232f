"""A durable, append-only event log: what LogEvents writes before it acknowledges.

    log = EventLog(Path("var/events"))
    last = log.append([LoggedEvent(ts_us, "u1", "i9", "click")])   # returns after fsync
    last = await log.append_async(events)                          # same, group-committed
    online.apply(log.frame(after_seq=applied))

The on-disk format (segments, records, CRCs) and the lock-free reader are serving/ingest/log_format.py.

Writes go to one committer thread: it writes every batch queued so far, fsyncs once and then
acknowledges them all (group commit). A new segment is written to a temp file, fsynced, renamed and
the directory fsynced, so a segment always has its header. On open, a record cut short (or with a bad
CRC) at the very end of the last segment is a torn write from a crash and is truncated; any other bad
record raises EventLogCorrupt. With fsync=False, acknowledged events survive a process kill but not
a power loss.

Erasure (`erase`, issue 18 item 3): the segments holding a user's events are rewritten (a temp
file, fsynced, renamed) with each of those events replaced by null: the seqs, which tokens and the
features' applied seq count, stay as they were, and no reader yields a null.

Retention (`compact`): whole closed segments are deleted once their last write is older than the
maximum age and every event in them is held by a persisted feature state (a snapshot, or a durable
store), so a restart never misses an event the features had counted. A segment also closes when it
is `segment_max_age_s` old, not only when full, so that a quiet log ages out too: an event leaves
the log at most max age + `segment_max_age_s` after it was written. Readers skip a segment deleted
under them (its events are past retention).
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import polars as pl

from serving.ingest.log_format import (
    MAGIC,
    SEGMENT_HEADER,
    SEGMENT_NAME,
    VERSION,
    EventLogCorrupt,
    EventLogError,
    EventLogLocked,
    LoggedEvent,
    TornRecord,
    encode_batch,
    events_frame,
    iter_records,
    record_bytes,
    segment_path,
)

log = logging.getLogger(__name__)


class EventLog:
    """Append-only, fsynced event log in `directory`; one writer process (see the module docstring)."""

    def __init__(self, directory: Path, segment_bytes: int = 64 << 20, fsync: bool = True,
                 segment_max_age_s: float | None = None):
        self.directory, self.segment_bytes, self.fsync = Path(directory), segment_bytes, fsync
        self.segment_max_age_s = segment_max_age_s  # None: a segment closes only when full
        self.fsync_count = 0  # os.fsync calls made (files and directory); group commit keeps it low
        if not self.directory.is_dir():
            self.directory.mkdir(parents=True)
            self._sync_path(self.directory.parent)
        self._lock_fd = os.open(self.directory / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(self._lock_fd, 32, 0).decode(errors="replace").strip()
            os.close(self._lock_fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise EventLogLocked(
                f"{self.directory} is open for writing by another EventLog (pid {holder or '?'}); one writer "
                "process per directory: stop it or use another directory"
            ) from None
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, f"{os.getpid()}\n".encode(), 0)
        self._lock = threading.Lock()  # guards the segment list, fd, sizes and last_seq
        self._write_lock = threading.Lock()  # held by the committer while it writes, and by `erase`
        self._cv = threading.Condition()  # guards the queue of pending batches
        self._queue: list[tuple[bytes, int, Callable[[int, BaseException | None], None]]] = []
        self._closed, self._failed = False, None
        try:
            self._recover()
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._committer = threading.Thread(target=self._commit_loop, name="event-log-commit", daemon=True)
        self._committer.start()

    # ------------------------------------------------------------ open and recovery

    def _recover(self) -> None:
        for tmp in self.directory.glob("events-*.log.tmp"):
            tmp.unlink()
        found = sorted((int(m[1]), p) for p in self.directory.iterdir() if (m := SEGMENT_NAME.match(p.name)))
        self._segments = [first for first, _ in found]
        if not found:
            self._segments = [1]
            self._create_segment(1)
        seq = self._segments[0]
        for k, first in enumerate(self._segments):
            path, end = segment_path(self.directory, first), SEGMENT_HEADER.size
            if first != seq:
                raise EventLogCorrupt(path, 0, f"segment starts at seq {first}, expected {seq} (a segment is missing)")
            try:
                for rec_seq, count, _, end in iter_records(path, first):
                    seq = rec_seq + count
            except TornRecord as t:
                if k < len(self._segments) - 1 or not t.torn:
                    raise EventLogCorrupt(path, t.offset, t.problem) from None
                dropped = path.stat().st_size - end
                log.warning("%s: truncating a torn tail of %d bytes at byte %d (%s; a write cut short by a crash, "
                            "never acknowledged)", path, dropped, end, t.problem)
                os.truncate(path, end)
                self._sync_path(path)
        self._last_seq, self._size = seq - 1, end
        self._opened_at = time.time()  # the open segment's age counts from here (its creation is not recorded)
        self._fd = os.open(segment_path(self.directory, self._segments[-1]), os.O_WRONLY | os.O_APPEND)

    def _fsync(self, fd: int) -> None:
        if self.fsync:
            os.fsync(fd)
            self.fsync_count += 1

    def _sync_path(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            self._fsync(fd)
        finally:
            os.close(fd)

    def _create_segment(self, first_seq: int) -> None:
        path = segment_path(self.directory, first_seq)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, SEGMENT_HEADER.pack(MAGIC, VERSION, first_seq))
            self._fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
        self._sync_path(self.directory)

    # ------------------------------------------------------------ writes

    def append(self, events: Sequence[LoggedEvent]) -> int:
        """Append one batch; returns the seq of its last event once it is fsynced."""
        done, box = threading.Event(), []
        self._submit(events, lambda seq, err: (box.append((seq, err)), done.set()))
        done.wait()
        seq, err = box[0]
        if err is not None:
            raise EventLogError(f"append failed: {err}") from err
        return seq

    async def append_async(self, events: Sequence[LoggedEvent]) -> int:
        """`append` without blocking the event loop; batches queued together share one fsync.
        Cancelling the await does not withdraw the batch."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def settle(seq: int, err: BaseException | None) -> None:
            if fut.done():  # cancelled
                return
            if err is not None:
                fut.set_exception(EventLogError(f"append failed: {err}"))
            else:
                fut.set_result(seq)

        def done(seq: int, err: BaseException | None) -> None:
            try:
                loop.call_soon_threadsafe(settle, seq, err)
            except RuntimeError:  # the caller's loop is closed
                pass

        self._submit(events, done)
        return await fut

    def _submit(self, events: Sequence[LoggedEvent], done: Callable[[int, BaseException | None], None]) -> None:
        payload = encode_batch(events)
        with self._cv:
            if self._closed:
                raise EventLogError(f"{self.directory}: the event log is closed")
            if self._failed is not None:
                raise EventLogError(f"{self.directory}: an earlier write failed ({self._failed}); reopen the log")
            if not events:
                done(self._last_seq, None)
                return
            self._queue.append((payload, len(events), done))
            self._cv.notify()

    def _commit_loop(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if not self._queue:
                    return
                batch, self._queue = self._queue, []
            try:
                with self._write_lock:
                    seqs = self._write(batch)
            except BaseException as e:  # the file state is unknown: refuse further writes
                with self._cv:
                    self._failed = e
                log.exception("%s: event log write failed", self.directory)
                for *_, done in batch:
                    done(0, e)
                continue
            for seq, (*_, done) in zip(seqs, batch):
                done(seq, None)

    def _write(self, batch: list[tuple[bytes, int, Callable]]) -> list[int]:
        seq, buf, seqs = self._last_seq, bytearray(), []
        aged = self.segment_max_age_s is not None and time.time() - self._opened_at >= self.segment_max_age_s
        for payload, count, _ in batch:
            if self._size + len(buf) > SEGMENT_HEADER.size and (aged or self._size + len(buf) >= self.segment_bytes):
                aged = False
                self._write_all(buf)
                self._fsync(self._fd)
                self._create_segment(seq + 1)
                with self._lock:
                    os.close(self._fd)
                    self._fd = os.open(segment_path(self.directory, seq + 1), os.O_WRONLY | os.O_APPEND)
                    self._segments.append(seq + 1)
                    self._size = SEGMENT_HEADER.size
                    self._opened_at = time.time()
            buf += record_bytes(seq + 1, count, payload)
            seq += count
            seqs.append(seq)
        self._write_all(buf)
        self._fsync(self._fd)
        with self._lock:
            self._last_seq = seq
        return seqs

    def _write_all(self, buf: bytearray) -> None:
        with memoryview(buf) as view:
            done = 0
            while done < len(view):
                done += os.write(self._fd, view[done:])
        self._size += len(buf)
        buf.clear()

    # ------------------------------------------------------------ reads

    @property
    def last_seq(self) -> int:
        """Seq of the last acknowledged (fsynced) event; 0 for an empty log."""
        with self._lock:
            return self._last_seq

    def _segment_events(self, first: int, last: int, after_seq: int = 0) -> Iterator[tuple[int, LoggedEvent]]:
        """(seq, event) of segment `first` with after_seq < seq <= last; a bad record is EventLogCorrupt.
        Nothing for a segment `compact` deleted meanwhile."""
        path = segment_path(self.directory, first)
        try:
            for rec_seq, count, payload, _ in iter_records(path, first, stop_after=last):
                if rec_seq + count - 1 > after_seq:
                    for seq, row in enumerate(json.loads(payload), start=rec_seq):
                        if row is not None and after_seq < seq <= last:  # (null: an erased event)
                            yield seq, LoggedEvent(*row)
        except TornRecord as t:
            raise EventLogCorrupt(path, t.offset, t.problem) from None
        except FileNotFoundError:
            with self._lock:
                if first in self._segments:
                    raise
            return

    def erase(self, user_ids: set[str]) -> int:
        """Replace every event of `user_ids` (stored ids) by null, rewriting the segments that hold
        one; returns how many were erased. Appends wait while it runs."""
        removed = 0
        with self._write_lock:
            with self._lock:
                segments = list(self._segments)
            for first in segments:
                path = segment_path(self.directory, first)
                out, hit = bytearray(SEGMENT_HEADER.pack(MAGIC, VERSION, first)), 0
                try:
                    for rec_seq, count, payload, _ in iter_records(path, first):
                        rows = json.loads(payload)
                        kept = [None if row is not None and row[1] in user_ids else row for row in rows]
                        gone = sum(row is not None for row in rows) - sum(row is not None for row in kept)
                        if gone:
                            payload, hit = json.dumps(kept, ensure_ascii=False, separators=(",", ":")).encode(), hit + gone
                        out += record_bytes(rec_seq, count, payload)
                except TornRecord as t:
                    raise EventLogCorrupt(path, t.offset, t.problem) from None
                if not hit:
                    continue
                tmp = path.with_name(path.name + ".tmp")  # (a crash leaves it: `_recover` deletes it)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    os.write(fd, bytes(out))
                    self._fsync(fd)
                finally:
                    os.close(fd)
                os.rename(tmp, path)
                self._sync_path(self.directory)
                with self._lock:
                    if first == self._segments[-1]:  # the open segment: append to the new file
                        os.close(self._fd)
                        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND)
                        self._size = len(out)
                removed += hit
        return removed

    def compact(self, max_age_s: float, covered_seq: int, now: float | None = None) -> int:
        """Retention: delete the oldest closed segments whose last write is more than `max_age_s` ago
        and whose events all have seq <= `covered_seq` (what a persisted feature state holds);
        returns how many events they held. The open segment is never deleted."""
        now = time.time() if now is None else now
        with self._lock:
            segments = list(self._segments)
        removed = 0
        for first, following in zip(segments, segments[1:]):
            path = segment_path(self.directory, first)
            if following - 1 > covered_seq or now - path.stat().st_mtime < max_age_s:
                break  # oldest first: the rest are newer
            with self._lock:
                self._segments.remove(first)
            path.unlink()
            removed += following - first
        if removed:
            self._sync_path(self.directory)
            log.info("%s: retention deleted %d event(s) written more than %.0f s ago", self.directory, removed, max_age_s)
        return removed

    def replay(self, after_seq: int = 0) -> Iterator[tuple[int, LoggedEvent]]:
        """(seq, event) for each acknowledged event with seq > after_seq, in seq order."""
        with self._lock:
            segments, last = list(self._segments), self._last_seq
        for k, first in enumerate(segments):
            if first > last or (k + 1 < len(segments) and segments[k + 1] <= after_seq + 1):
                continue
            yield from self._segment_events(first, last, after_seq)

    def events_since(self, ts_us: int) -> list[LoggedEvent]:
        """The acknowledged events with event time >= `ts_us`, reading segments from the newest
        back until one holds only older events (events arrive roughly in time order; a segment
        with a late-arriving old event is read whole). For rebuilding a time window at start-up."""
        with self._lock:
            segments, last = list(self._segments), self._last_seq
        out: list[LoggedEvent] = []
        for first in reversed(segments):
            if first > last:
                continue
            events = [e for _, e in self._segment_events(first, last)]
            out += [e for e in events if e.ts_us >= ts_us]
            if events and max(e.ts_us for e in events) < ts_us:
                break
        return out

    def frame(self, after_seq: int = 0) -> pl.DataFrame:
        """`events_frame` of the events after `after_seq`, in seq order."""
        return events_frame([e for _, e in self.replay(after_seq)])

    # ------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Commit what is queued, then release the files and the lock. Idempotent."""
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._cv.notify()
        self._committer.join()
        os.close(self._fd)
        os.close(self._lock_fd)

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
