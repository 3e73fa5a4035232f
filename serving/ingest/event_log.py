"""A durable, append-only event log: what LogEvents writes before it acknowledges.

    log = EventLog(Path("var/events"))
    last = log.append([LoggedEvent(ts_us, "u1", "i9", "click")])   # returns after fsync
    last = await log.append_async(events)                          # same, group-committed
    online.apply(log.frame(after_seq=applied))

Layout: segment files `events-<first seq, 20 digits>.log` and a `LOCK` file (fcntl, one writer
process). A segment starts with a 20-byte header `<8s I Q>`: magic b"SEMRLOG\\0", format version,
first seq. Then records, one per appended batch, each a 20-byte header `<I I Q I>`: payload length,
CRC32 of (first seq, count, payload), first seq, count; then the payload, compact UTF-8 JSON
`[[ts_us, user_id, item_id, event, request_id, position, event_id], ...]`. Seqs count from 1 over the
log's life and run on without gaps across records and segments.

Writes go to one committer thread: it writes every batch queued so far, fsyncs once and then
acknowledges them all (group commit). A new segment is written to a temp file, fsynced, renamed and
the directory fsynced, so a segment always has its header. On open, a record cut short (or with a bad
CRC) at the very end of the last segment is a torn write from a crash and is truncated; any other bad
record raises EventLogCorrupt. With fsync=False, acknowledged events survive a process kill but not
a power loss.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import logging
import os
import re
import struct
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from featurizer.contracts.schema import EVENT_TYPES

log = logging.getLogger(__name__)

MAGIC, VERSION = b"SEMRLOG\0", 1
SEGMENT_HEADER = struct.Struct("<8sIQ")
RECORD_HEADER = struct.Struct("<IIQI")
_SEQ_COUNT = struct.Struct("<QI")
_SEGMENT_NAME = re.compile(r"^events-(\d{20})\.log$")


class EventLogError(RuntimeError):
    """The log cannot serve the call (closed, locked, failed write, unreadable)."""


class EventLogLocked(EventLogError):
    """Another EventLog (this or another process) has the directory open for writing."""


class EventLogCorrupt(EventLogError):
    """A bad record or segment that is not a torn tail; names the file and byte offset."""

    def __init__(self, path: Path, offset: int, problem: str):
        self.path, self.offset = path, offset
        super().__init__(
            f"{path}: byte {offset}: {problem}; the log cannot be read past it. Restore this segment from a "
            "backup, or move it and later segments out of the directory to keep the events before it"
        )


@dataclass(frozen=True)
class LoggedEvent:
    ts_us: int  # event time, µs since epoch UTC
    user_id: str
    item_id: str
    event: str  # one of featurizer.contracts.schema.EVENT_TYPES
    request_id: str = ""
    position: int = 0  # 0 = none
    event_id: str = ""


def _encode(events: Sequence[LoggedEvent]) -> bytes:
    """The JSON payload of one batch; ValueError/TypeError names the first bad event."""
    for k, e in enumerate(events):
        if not isinstance(e, LoggedEvent):
            raise TypeError(f"events[{k}] is a {type(e).__name__}; pass LoggedEvent")
        if e.event not in EVENT_TYPES:
            raise ValueError(f"events[{k}].event {e.event!r}: expected one of {', '.join(EVENT_TYPES)}")
        if not all(isinstance(s, str) for s in (e.user_id, e.item_id, e.request_id, e.event_id)):
            raise TypeError(f"events[{k}]: user_id, item_id, request_id and event_id must be str")
        if not e.user_id or not e.item_id:
            raise ValueError(f"events[{k}]: user_id and item_id must not be empty")
        if type(e.ts_us) is not int or type(e.position) is not int or e.position < 0:
            raise ValueError(f"events[{k}]: ts_us must be an int (µs since epoch) and position an int >= 0")
    rows = [(e.ts_us, e.user_id, e.item_id, e.event, e.request_id, e.position, e.event_id) for e in events]
    return json.dumps(rows, ensure_ascii=False, separators=(",", ":")).encode()


def _record(first_seq: int, count: int, payload: bytes) -> bytes:
    crc = zlib.crc32(payload, zlib.crc32(_SEQ_COUNT.pack(first_seq, count)))
    return RECORD_HEADER.pack(len(payload), crc, first_seq, count) + payload


def _segment_path(directory: Path, first_seq: int) -> Path:
    return directory / f"events-{first_seq:020d}.log"


def events_frame(events: Sequence[LoggedEvent]) -> pl.DataFrame:
    """The contract's events columns, in the given order (OnlineFeatures.apply takes it): ts (UTC, µs),
    user_id, item_id, event (Enum of EVENT_TYPES), request_id (Utf8) and position (Int64), null for ""/0."""
    return pl.DataFrame(
        {
            "ts": [e.ts_us for e in events],
            "user_id": [e.user_id for e in events],
            "item_id": [e.item_id for e in events],
            "event": [e.event for e in events],
            "request_id": [e.request_id or None for e in events],
            "position": [e.position or None for e in events],
        },
        schema={"ts": pl.Int64, "user_id": pl.Utf8, "item_id": pl.Utf8, "event": pl.Enum(list(EVENT_TYPES)),
                "request_id": pl.Utf8, "position": pl.Int64},
    ).with_columns(pl.col("ts").cast(pl.Datetime("us", "UTC")))


class _Torn(Exception):
    def __init__(self, offset: int, problem: str, torn: bool):
        self.offset, self.problem, self.torn = offset, problem, torn


def _records(path: Path, first_seq: int, stop_after: int | None = None) -> Iterator[tuple[int, int, bytes, int]]:
    """(first seq, count, payload, end offset) of each record; raises _Torn at a bad one."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(SEGMENT_HEADER.size)
        if len(head) < SEGMENT_HEADER.size or SEGMENT_HEADER.unpack(head)[0] != MAGIC:
            raise EventLogCorrupt(path, 0, "not an event log segment (bad header)")
        _, version, seq = SEGMENT_HEADER.unpack(head)
        if version != VERSION:
            raise EventLogError(f"{path}: format version {version}; this semrank reads version {VERSION} (upgrade it)")
        if seq != first_seq:
            raise EventLogCorrupt(path, 0, f"header says first seq {seq}, the file name {first_seq}")
        offset = SEGMENT_HEADER.size
        while offset < size and (stop_after is None or seq <= stop_after):
            head = f.read(RECORD_HEADER.size)
            if len(head) < RECORD_HEADER.size:
                raise _Torn(offset, "partial record header", torn=True)
            n, crc, rec_seq, count = RECORD_HEADER.unpack(head)
            end = offset + RECORD_HEADER.size + n
            if end > size:
                raise _Torn(offset, f"record of {n} bytes runs past the end of the file", torn=True)
            payload = f.read(n)
            if n == 0 or count == 0 or zlib.crc32(payload, zlib.crc32(_SEQ_COUNT.pack(rec_seq, count))) != crc:
                zeros = not (head + payload + f.read()).strip(b"\0")
                raise _Torn(offset, "bad record CRC", torn=end == size or zeros)
            if rec_seq != seq:
                raise EventLogCorrupt(path, offset, f"record starts at seq {rec_seq}, expected {seq}")
            seq += count
            offset = end
            yield rec_seq, count, payload, end


def read_log(directory: Path, after_seq: int = 0) -> Iterator[tuple[int, LoggedEvent]]:
    """(seq, event) of the events after `after_seq` in seq order, read without the writer lock.

    For readers beside a live writer (batch scoring): a torn or half-written record at the end of
    the last segment ends the read (it was not acknowledged yet); a bad record anywhere else raises
    EventLogCorrupt. A missing directory is an empty log. Writes nothing."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    found = sorted(int(m[1]) for p in directory.iterdir() if (m := _SEGMENT_NAME.match(p.name)))
    for k, first in enumerate(found):
        if k + 1 < len(found) and found[k + 1] <= after_seq + 1:
            continue
        path = _segment_path(directory, first)
        try:
            for rec_seq, count, payload, _ in _records(path, first):
                if rec_seq + count - 1 > after_seq:
                    for seq, row in enumerate(json.loads(payload), start=rec_seq):
                        if seq > after_seq:
                            yield seq, LoggedEvent(*row)
        except _Torn as t:
            if k < len(found) - 1 or not t.torn:
                raise EventLogCorrupt(path, t.offset, t.problem) from None
            return


class EventLog:
    """Append-only, fsynced event log in `directory`; one writer process (see the module docstring)."""

    def __init__(self, directory: Path, segment_bytes: int = 64 << 20, fsync: bool = True):
        self.directory, self.segment_bytes, self.fsync = Path(directory), segment_bytes, fsync
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
        found = sorted((int(m[1]), p) for p in self.directory.iterdir() if (m := _SEGMENT_NAME.match(p.name)))
        self._segments = [first for first, _ in found]
        if not found:
            self._segments = [1]
            self._create_segment(1)
        seq = self._segments[0]
        for k, first in enumerate(self._segments):
            path, end = _segment_path(self.directory, first), SEGMENT_HEADER.size
            if first != seq:
                raise EventLogCorrupt(path, 0, f"segment starts at seq {first}, expected {seq} (a segment is missing)")
            try:
                for rec_seq, count, _, end in _records(path, first):
                    seq = rec_seq + count
            except _Torn as t:
                if k < len(self._segments) - 1 or not t.torn:
                    raise EventLogCorrupt(path, t.offset, t.problem) from None
                dropped = path.stat().st_size - end
                log.warning("%s: truncating a torn tail of %d bytes at byte %d (%s; a write cut short by a crash, "
                            "never acknowledged)", path, dropped, end, t.problem)
                os.truncate(path, end)
                self._sync_path(path)
        self._last_seq, self._size = seq - 1, end
        self._fd = os.open(_segment_path(self.directory, self._segments[-1]), os.O_WRONLY | os.O_APPEND)

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
        path = _segment_path(self.directory, first_seq)
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
        payload = _encode(events)
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
        for payload, count, _ in batch:
            if self._size + len(buf) >= self.segment_bytes and self._size + len(buf) > SEGMENT_HEADER.size:
                self._write_all(buf)
                self._fsync(self._fd)
                self._create_segment(seq + 1)
                with self._lock:
                    os.close(self._fd)
                    self._fd = os.open(_segment_path(self.directory, seq + 1), os.O_WRONLY | os.O_APPEND)
                    self._segments.append(seq + 1)
                    self._size = SEGMENT_HEADER.size
            buf += _record(seq + 1, count, payload)
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

    def replay(self, after_seq: int = 0) -> Iterator[tuple[int, LoggedEvent]]:
        """(seq, event) for each acknowledged event with seq > after_seq, in seq order."""
        with self._lock:
            segments, last = list(self._segments), self._last_seq
        for k, first in enumerate(segments):
            if first > last or (k + 1 < len(segments) and segments[k + 1] <= after_seq + 1):
                continue
            path = _segment_path(self.directory, first)
            try:
                for rec_seq, count, payload, _ in _records(path, first, stop_after=last):
                    if rec_seq + count - 1 > after_seq:
                        for seq, row in enumerate(json.loads(payload), start=rec_seq):
                            if after_seq < seq <= last:
                                yield seq, LoggedEvent(*row)
            except _Torn as t:
                raise EventLogCorrupt(path, t.offset, t.problem) from None

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
