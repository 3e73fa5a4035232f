"""Incremental state behind the online features: what is kept per entity, how an event updates it,
and how it is read at an instant t (vectorised over candidates).

Every state knows its latest instant `last` and the additive part contributed by events at exactly
`last` (`delta`, `d_*`): a read at t == last subtracts it, so a query sees events strictly before t,
as offline does. Window counts live in rings of tiles (`Window`): the tile of `last` and the
ring_size - 1 tiles before it, which is all any t >= last can ask for.

Kept per entity (see `FeatureParams` for N and the co-occurrence window):
- item ("item", packed `ITEM_DTYPE`): last, first instant, totals and delta per event type, distinct
  engaged users and their delta, rings of 5-minute / hour / day tiles.
- user ("user", JSON): the same counters with a day ring; the last two distinct engagement instants;
  engagements per category and brand; sum and count of log prices of engaged items; for each of the
  most recent items its last two distinct engagement instants (N + |items engaged at the latest
  instant| of them, enough for any t >= last); first touches (below) within the co-occurrence
  window of the latest one, to pair new first touches with.
- user x item ("ui", packed `UI_DTYPE`): totals and delta; last two distinct impression and
  engagement instants.
- co-occurrence ("cooc", JSON, per item i): c(i, j) for every j, and the delta at the latest pair instant.

A first touch is a user's first engagement with an item; co-occurrence counts users, not events:
c(i, j) = users whose first touches of i and j are at most the co-occurrence window apart (known at
the later one), n_i = users who engaged with i; c <= min(n_i, n_j), so c / sqrt(n_i n_j) is a cosine.

Exactness: for events applied in nondecreasing time order (any chunking), a read at any
t >= the latest applied event equals the offline features. Late events (older than ones already
applied) are counted in totals and in tiles still kept; what was pruned (old tiles, items beyond
the recent list, first touches beyond the pairing window) cannot be revisited, so features that
depend on those may differ from an offline recomputation.
"""

from __future__ import annotations

import math
import struct

import numpy as np

from featurizer.definitions import (
    EVENT_PLURALS,
    ITEM_WINDOWS,
    TILE_NAMES,
    USER_WINDOWS,
    WINDOWS,
    ring_sizes,
)

NO_TS = int(np.iinfo(np.int64).min)  # "no such instant" for latest-instant fields
NO_FIRST = int(np.iinfo(np.int64).max)  # ... for the earliest-instant field
N_EVENTS = len(EVENT_PLURALS)
ITEM_RINGS = ring_sizes(ITEM_WINDOWS)
USER_RINGS = ring_sizes(USER_WINDOWS)

ITEM_DTYPE = np.dtype(
    [("last", "<i8"), ("first", "<i8"), ("tot", "<i8", (N_EVENTS,)), ("delta", "<i8", (N_EVENTS,)), ("users", "<i8"), ("d_users", "<i8")]
    + [(f"ring_{TILE_NAMES[tile]}", "<i4", (size, N_EVENTS)) for tile, size in ITEM_RINGS.items()]
)
UI_DTYPE = np.dtype(
    [("last", "<i8"), ("tot", "<i8", (N_EVENTS,)), ("delta", "<i8", (N_EVENTS,)), ("imp", "<i8", (2,)), ("eng", "<i8", (2,))]
)
# The same layouts as structs: the fold packs and unpacks a state per item and per user x item it
# touches, and struct does it in a few µs where numpy's record assignment took tens (bench/fold_profile.py).
_ITEM_RING_INTS = {tile: size * N_EVENTS for tile, size in ITEM_RINGS.items()}
_ITEM_STRUCT = struct.Struct(f"<{4 + 2 * N_EVENTS}q{sum(_ITEM_RING_INTS.values())}i")
_UI_STRUCT = struct.Struct(f"<{5 + 2 * N_EVENTS}q")
_TILE_5M, _TILE_1H, _TILE_1D = ITEM_RINGS  # (each ring unpacked by name: twice as fast as chaining them)
assert _ITEM_STRUCT.size == ITEM_DTYPE.itemsize and _UI_STRUCT.size == UI_DTYPE.itemsize


def push_instant(pair: list[int], ts: int) -> None:
    """Keep the two latest distinct instants, [latest, previous]."""
    if ts > pair[0]:
        pair[1], pair[0] = pair[0], ts
    elif pair[1] < ts < pair[0]:
        pair[1] = ts


def instant_before(last, prev, t):
    """The latest of the two instants that is strictly before t (NO_TS if none); ints or arrays."""
    return np.where(last < t, last, prev) if isinstance(last, np.ndarray) else (last if last < t else prev)


class Counts:
    """Totals, the delta at the latest instant, and rings of tiles per event type."""

    __slots__ = ("last", "tot", "delta", "rings")

    def __init__(self, rings: dict[int, int]):
        self.last = NO_TS
        self.tot = [0] * N_EVENTS
        self.delta = [0] * N_EVENTS
        self.rings = {tile: [0] * (size * N_EVENTS) for tile, size in rings.items()}

    def add(self, ts: int, code: int) -> bool:
        """Count one event; True when it is at the (possibly new) latest instant."""
        for tile, ring in self.rings.items():
            _ring_add(ring, len(ring) // N_EVENTS, tile, self.last, ts, code)
        if ts > self.last:
            self.last, self.delta = ts, [0] * N_EVENTS
        self.tot[code] += 1
        if ts == self.last:
            self.delta[code] += 1
            return True
        return False


def _ring_add(ring: list[int], size: int, tile: int, last: int, ts: int, code: int) -> None:
    s = ts // tile
    if last != NO_TS:
        head = last // tile
        if s > head:  # advance: clear the tiles that the ring now reuses
            for idx in range(head + 1, min(s, head + size) + 1):
                base = (idx % size) * N_EVENTS
                ring[base : base + N_EVENTS] = [0] * N_EVENTS
        elif s <= head - size:
            return  # older than any window of a t >= last
    ring[(s % size) * N_EVENTS + code] += 1


def window_counts(ring: np.ndarray, last: np.ndarray, t: int, tile: int, window: str) -> np.ndarray:
    """(n, N_EVENTS) counts in [window start, t) from rings (n, size, N_EVENTS), before the delta at t."""
    size = ring.shape[1]
    head = (last // tile)[:, None]
    idx = head - ((head - np.arange(size)[None, :]) % size)  # the tile each slot holds
    mask = idx >= WINDOWS[window].start_us(t) // tile
    return np.einsum("nsk,ns->nk", ring, mask.astype(ring.dtype)).astype(np.int64)


def window_counts_one(ring: list[int], last: int, t: int, tile: int, window: str) -> list[int]:
    """`window_counts` of one flat ring (size * N_EVENTS ints), in plain Python (one state: numpy's
    per-call overhead would dominate). The slots in the window hold the tiles from the window's
    start (or the oldest the ring holds) to last's: one circular run of slots, summed by slices."""
    size = len(ring) // N_EVENTS
    head = last // tile
    m = min(head - WINDOWS[window].start_us(t) // tile + 1, size)  # tiles in the window that the ring holds
    if m <= 0:
        return [0] * N_EVENTS
    lo = (head - m + 1) % size
    run = ring[lo * N_EVENTS : (lo + m) * N_EVENTS]
    if lo + m > size:  # it wraps around
        run += ring[: (lo + m - size) * N_EVENTS]
    return [sum(run[k::N_EVENTS]) for k in range(N_EVENTS)]


# ---------------------------------------------------------------- item


class ItemState(Counts):
    """Counts, the first instant, and the number of distinct engaged users (first touches)."""

    __slots__ = ("first", "users", "d_users")

    def __init__(self) -> None:
        super().__init__(ITEM_RINGS)
        self.first = NO_FIRST
        self.users = self.d_users = 0

    def add(self, ts: int, code: int, first_touch: bool = False) -> bool:
        self.first = min(self.first, ts)
        if ts > self.last:
            self.d_users = 0
        at_last = super().add(ts, code)
        if first_touch:
            self.users += 1
            self.d_users += at_last
        return at_last

    def to_bytes(self) -> bytes:
        """The packed `ITEM_DTYPE` record."""
        try:
            r = self.rings
            return _ITEM_STRUCT.pack(self.last, self.first, *self.tot, *self.delta, self.users, self.d_users,
                                     *r[_TILE_5M], *r[_TILE_1H], *r[_TILE_1D])
        except struct.error:  # a tile count past int32 (never seen): numpy's cast, as the records always had
            return self._record().tobytes()

    def _record(self) -> np.ndarray:
        rec = np.zeros((), dtype=ITEM_DTYPE)
        rec["last"], rec["first"], rec["tot"], rec["delta"] = self.last, self.first, self.tot, self.delta
        rec["users"], rec["d_users"] = self.users, self.d_users
        for tile, ring in self.rings.items():
            rec[f"ring_{TILE_NAMES[tile]}"] = np.asarray(ring).reshape(-1, N_EVENTS)
        return rec

    @classmethod
    def from_bytes(cls, blob: bytes) -> ItemState:
        v = _ITEM_STRUCT.unpack(blob)
        s = cls.__new__(cls)  # (not __init__: its empty rings would be replaced at once)
        n = N_EVENTS
        s.last, s.first, s.tot, s.delta = v[0], v[1], list(v[2 : 2 + n]), list(v[2 + n : 2 + 2 * n])
        s.users, s.d_users = v[2 + 2 * n], v[3 + 2 * n]
        s.rings, at = {}, 4 + 2 * n
        for tile, ints in _ITEM_RING_INTS.items():
            s.rings[tile] = list(v[at : at + ints])
            at += ints
        return s


EMPTY_ITEM = ItemState().to_bytes()


def item_base(blobs: list[bytes | None], t: int) -> dict[str, np.ndarray]:
    """item_n_{event}_{window|all}, item_n_users_all and item_first_age_us for packed item states
    (None: never seen)."""
    rec = np.frombuffer(b"".join(EMPTY_ITEM if b is None else b for b in blobs), dtype=ITEM_DTYPE)
    return item_base_from_parts(item_parts(rec, t), t)


# Item window counts depend on t only through t // WINDOW_KEY_US (every tile is a multiple of it),
# so they can be kept per item and reused for any t >= the item's last event with the same key.
WINDOW_KEY_US = math.gcd(*(WINDOWS[w].tile_us for w in ITEM_WINDOWS))
ITEM_PART_FIELDS = ("last", "first", "users", "d_users", "tot", "delta", "window")


def item_parts(rec: np.ndarray, t: int) -> dict[str, np.ndarray]:
    """What item_base needs of packed item states `rec` at t (>= their last event): the scalars,
    and per ITEM_WINDOWS the event counts in the window before the delta at t, (n, windows, events)."""
    out = {name: rec[name] for name in ITEM_PART_FIELDS[:-1]}
    window = np.empty((len(rec), len(ITEM_WINDOWS), N_EVENTS), dtype=np.int64)
    for k, w in enumerate(ITEM_WINDOWS):
        tile = WINDOWS[w].tile_us
        window[:, k] = window_counts(rec[f"ring_{TILE_NAMES[tile]}"], rec["last"], t, tile, w)
    out["window"] = window
    return out


def item_base_from_parts(parts: dict[str, np.ndarray], t: int) -> dict[str, np.ndarray]:
    """item_base from `item_parts` (computed at t, or at any t' with the same t' // WINDOW_KEY_US)."""
    out = item_counts_from_parts(parts, parts["last"] == t)
    out["item_first_age_us"] = item_first_age(parts["first"], t)
    return out


def item_counts_from_parts(parts: dict[str, np.ndarray], at: np.ndarray) -> dict[str, np.ndarray]:
    """item_n_users_all and item_n_{event}_{window|all} from `item_parts`; `at`: the items whose latest
    instant is t (their delta is left out)."""
    at_t = parts["delta"] * at[:, None]
    out = {"item_n_users_all": parts["users"] - parts["d_users"] * at}
    cols = {"all": parts["tot"] - at_t}
    for k, w in enumerate(ITEM_WINDOWS):
        cols[w] = parts["window"][:, k] - at_t
    for w, counts in cols.items():
        for k, p in enumerate(EVENT_PLURALS):
            out[f"item_n_{p}_{w}"] = counts[:, k]
    return out


def item_first_age(first: np.ndarray, t: int) -> np.ndarray:
    """item_first_age_us: t - the item's first instant (NaN for none before t)."""
    seen = first < t
    return np.where(seen, (t - np.where(seen, first, t)).astype(np.float64), np.nan)


# ---------------------------------------------------------------- user x item


class UserItemState(Counts):
    __slots__ = ("imp", "eng")

    def __init__(self) -> None:
        super().__init__({})
        self.imp, self.eng = [NO_TS, NO_TS], [NO_TS, NO_TS]

    def add(self, ts: int, code: int) -> bool:
        push_instant(self.imp if code == 0 else self.eng, ts)
        return super().add(ts, code)

    def to_bytes(self) -> bytes:
        """The packed `UI_DTYPE` record."""
        return _UI_STRUCT.pack(self.last, *self.tot, *self.delta, *self.imp, *self.eng)

    @classmethod
    def from_bytes(cls, blob: bytes) -> UserItemState:
        v = _UI_STRUCT.unpack(blob)
        s = cls.__new__(cls)
        n = N_EVENTS
        s.rings = {}
        s.last, s.tot, s.delta = v[0], list(v[1 : 1 + n]), list(v[1 + n : 1 + 2 * n])
        s.imp, s.eng = list(v[1 + 2 * n : 3 + 2 * n]), list(v[3 + 2 * n :])
        return s


EMPTY_UI = UserItemState().to_bytes()
assert len(EMPTY_UI) == UI_DTYPE.itemsize


def user_item_key(user_id: str, item_id: str) -> str:
    """Unambiguous for any ids: the user id's length first."""
    return f"{len(user_id)}:{user_id}:{item_id}"


def user_item_keys(user_id: str, item_ids: list[str]) -> list[str]:
    """`user_item_key` for many items of one user (str ids)."""
    prefix = f"{len(user_id)}:{user_id}:"
    return [prefix + i for i in item_ids]


def parse_user_item_key(key: str) -> tuple[str, str] | None:
    """(user id, item id) of a `user_item_key`; None for any other string."""
    length, sep, rest = key.partition(":")
    if not sep or not length.isdigit() or rest[int(length) : int(length) + 1] != ":":
        return None
    n = int(length)
    return rest[:n], rest[n + 1 :]


def user_item_records(blobs: list[bytes | None]) -> np.ndarray:
    """Packed user x item states (None: never seen), writable."""
    return np.frombuffer(b"".join(EMPTY_UI if b is None else b for b in blobs), dtype=UI_DTYPE).copy()


# The user x item base aggregates, in the row order of `user_item_block`.
UI_BASE_NAMES: tuple[str, ...] = (*(f"ui_n_{p}_all" for p in EVENT_PLURALS), "ui_imp_age_us", "ui_eng_age_us")
# user_item_block reads UI_DTYPE as int64 words: last, tot, delta, imp, eng
assert [UI_DTYPE.fields[f][1] // 8 for f in UI_DTYPE.names] == [0, 1, 1 + N_EVENTS, 1 + 2 * N_EVENTS, 3 + 2 * N_EVENTS]


def user_item_block(rec: np.ndarray, t: int) -> np.ndarray:
    """(len(UI_BASE_NAMES), len(rec)) float64: the base aggregates of packed user x item states at t
    (counts before t; hours-to-be in µs since the latest impression / engagement before t, NaN for
    none), computed over the records as one int64 matrix."""
    m = np.ascontiguousarray(rec).view("<i8").reshape(len(rec), UI_DTYPE.itemsize // 8)
    n = N_EVENTS
    out = np.empty((len(UI_BASE_NAMES), len(rec)))
    out[:n] = (m[:, 1 : 1 + n] - m[:, 1 + n : 1 + 2 * n] * (m[:, :1] == t)).T
    instants = m[:, 1 + 2 * n :].reshape(len(rec), 2, 2)  # imp [latest, previous], eng [latest, previous]
    before = instant_before(instants[:, :, 0], instants[:, :, 1], t)
    none = before == NO_TS
    out[n:] = np.where(none, np.nan, (t - np.where(none, t, before)).astype(np.float64)).T
    return out


# The user x item base aggregates (UI_BASE_NAMES) of a pair with no state (no event): the same at any t.
UNSEEN_USER_ITEM = user_item_block(user_item_records([None]), 0)[:, 0]


def user_item_base_from_records(rec: np.ndarray, t: int) -> dict[str, np.ndarray]:
    return dict(zip(UI_BASE_NAMES, user_item_block(rec, t)))
