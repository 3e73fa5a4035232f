"""The event log's on-disk format, and `read_log`, its reader for processes beside the writer.

Layout: segment files `events-<first seq, 20 digits>.log` and a `LOCK` file (fcntl, one writer
process). A segment starts with a 20-byte header `<8s I Q>`: magic b"SEMRLOG\\0", format version,
first seq. Then records, one per appended batch, each a 20-byte header `<I I Q I>`: payload length,
CRC32 of (first seq, count, payload), first seq, count; then the payload, compact UTF-8 JSON
`[[ts_us, user_id, item_id, event, request_id, position, event_id], ...]`, where null stands for an
erased event (`EventLog.erase`). Seqs count from 1 over the log's life and run on without gaps
across records and segments.

A bad record at the very end of the last segment (cut short, bad CRC, zeros) is a torn write
(`TornRecord.torn`); anywhere else it is corruption (`EventLogCorrupt`, naming the file and
byte offset). serving/ingest/event_log.py is the writer.
"""

from __future__ import annotations

import json
import os
import re
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from featurizer.contracts.schema import EVENT_TYPES
from featurizer.errors import SemrankError

MAGIC, VERSION = b"SEMRLOG\0", 1
SEGMENT_HEADER = struct.Struct("<8sIQ")
RECORD_HEADER = struct.Struct("<IIQI")
SEQ_COUNT = struct.Struct("<QI")
SEGMENT_NAME = re.compile(r"^events-(\d{20})\.log$")


class EventLogError(SemrankError, RuntimeError):
    """The log cannot serve the call (closed, locked, failed write, unreadable)."""

    grpc_code = "UNAVAILABLE"
    reason = "EVENT_LOG_UNAVAILABLE"


class EventLogLocked(EventLogError):
    """Another EventLog (this or another process) has the directory open for writing."""

    grpc_code = "FAILED_PRECONDITION"
    reason = "EVENT_LOG_LOCKED"


class EventLogCorrupt(EventLogError):
    """A bad record or segment that is not a torn tail; names the file and byte offset."""

    grpc_code = "DATA_LOSS"
    reason = "EVENT_LOG_CORRUPT"

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
    position: int = 0  # as on the wire (Event.position): 1-based slot in the ranked list, 0 = not shown
    event_id: str = ""


def encode_batch(events: Sequence[LoggedEvent]) -> bytes:
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


def record_bytes(first_seq: int, count: int, payload: bytes) -> bytes:
    crc = zlib.crc32(payload, zlib.crc32(SEQ_COUNT.pack(first_seq, count)))
    return RECORD_HEADER.pack(len(payload), crc, first_seq, count) + payload


def segment_path(directory: Path, first_seq: int) -> Path:
    return directory / f"events-{first_seq:020d}.log"


def events_frame(events: Sequence[LoggedEvent]) -> pl.DataFrame:
    """The contract's events columns, in the given order (OnlineFeatures.apply takes it): ts (UTC, µs),
    user_id, item_id, event (Enum of EVENT_TYPES), request_id (Utf8, null for "") and position (Int64).

    Position is converted here, the one place logged events become the data contract: the API's
    1-based slot (0 = not shown) becomes the contract's 0-based one (null = not shown), so events
    logged over gRPC and events in a data file mean the same slot (tests/serving/ingest/test_event_log.py)."""
    return pl.DataFrame(
        {
            "ts": [e.ts_us for e in events],
            "user_id": [e.user_id for e in events],
            "item_id": [e.item_id for e in events],
            "event": [e.event for e in events],
            "request_id": [e.request_id or None for e in events],
            "position": [e.position - 1 if e.position > 0 else None for e in events],
        },
        schema={"ts": pl.Int64, "user_id": pl.Utf8, "item_id": pl.Utf8, "event": pl.Enum(list(EVENT_TYPES)),
                "request_id": pl.Utf8, "position": pl.Int64},
    ).with_columns(pl.col("ts").cast(pl.Datetime("us", "UTC")))


class TornRecord(Exception):
    """A bad record at `offset`; `torn` when it can only be an unfinished write at the end of the file."""

    def __init__(self, offset: int, problem: str, torn: bool):
        self.offset, self.problem, self.torn = offset, problem, torn


def iter_records(path: Path, first_seq: int, stop_after: int | None = None) -> Iterator[tuple[int, int, bytes, int]]:
    """(first seq, count, payload, end offset) of each record; raises TornRecord at a bad one."""
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
                raise TornRecord(offset, "partial record header", torn=True)
            n, crc, rec_seq, count = RECORD_HEADER.unpack(head)
            end = offset + RECORD_HEADER.size + n
            if end > size:
                raise TornRecord(offset, f"record of {n} bytes runs past the end of the file", torn=True)
            payload = f.read(n)
            if n == 0 or count == 0 or zlib.crc32(payload, zlib.crc32(SEQ_COUNT.pack(rec_seq, count))) != crc:
                zeros = not (head + payload + f.read()).strip(b"\0")
                raise TornRecord(offset, "bad record CRC", torn=end == size or zeros)
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
    found = sorted(int(m[1]) for p in directory.iterdir() if (m := SEGMENT_NAME.match(p.name)))
    for k, first in enumerate(found):
        if k + 1 < len(found) and found[k + 1] <= after_seq + 1:
            continue
        path = segment_path(directory, first)
        try:
            for rec_seq, count, payload, _ in iter_records(path, first):
                if rec_seq + count - 1 > after_seq:
                    for seq, row in enumerate(json.loads(payload), start=rec_seq):
                        if row is not None and seq > after_seq:  # (null: an erased event)
                            yield seq, LoggedEvent(*row)
        except TornRecord as t:
            if k < len(found) - 1 or not t.torn:
                raise EventLogCorrupt(path, t.offset, t.problem) from None
            return
        except FileNotFoundError:  # deleted by the writer's retention since the listing: past it
            if k + 1 == len(found):
                raise
