"""Incremental state of a user and of an item's co-occurrences (see `featurizer.online.state` for the
layout of every state and what reads at t >= the latest event guarantee).

- `UserState` (entity "user", JSON): counters with a day ring, the last two distinct engagement
  instants, engagements per category and brand, log-price sums, the recent items and the first
  touches to pair new ones with;
- `CoocState` (entity "cooc", JSON, per item i): c(i, j) for every j, and the delta at the latest
  pair instant.
"""

from __future__ import annotations

from itertools import islice

import numpy as np

from featurizer.definitions import (
    ENGAGEMENT_CODES,
    EVENT_PLURALS,
    USER_WINDOWS,
    WINDOWS,
)
from featurizer.online.item_index import ItemIndex
from featurizer.online.state import (
    N_EVENTS,
    NO_TS,
    USER_RINGS,
    Counts,
    instant_before,
    window_counts_one,
)
from featurizer.store.base import Owned

# ---------------------------------------------------------------- user


def _pushed(pair: tuple[int, int], ts: int) -> tuple[int, int]:
    """`push_instant` of an immutable pair: the two latest distinct instants, (latest, previous)."""
    if ts > pair[0]:
        return ts, pair[0]
    if pair[1] < ts < pair[0]:
        return pair[0], ts
    return pair


_NO_PAIR = (NO_TS, NO_TS)


class UserState:
    """JSON-able per-user state.

    Its small pairs are tuples, not lists: decoded states stay in `DecodedCache` (up to 20k users),
    and a tuple of numbers leaves the garbage collector's lists at its first collection, where a
    list stays tracked for good. With lists a state held about 28 tracked objects, and under the
    serve bench's write flood a full collection walked them all (45 ms for 2,000 users, a Rank
    stall); with tuples it holds about 10. The JSON is the same (a tuple encodes as an array)."""

    __slots__ = ("counts", "eng", "cat", "d_cat", "brand", "d_brand", "lp", "d_lp", "recent", "buf")

    def __init__(self) -> None:
        self.counts = Counts(USER_RINGS)
        self.eng = _NO_PAIR
        self.cat: dict[str, int] = {}
        self.d_cat: dict[str, int] = {}
        self.brand: dict[str, int] = {}
        self.d_brand: dict[str, int] = {}
        self.lp = (0.0, 0)  # sum of log prices, count
        self.d_lp = (0.0, 0)
        self.recent: dict[str, tuple[int, int]] = {}  # item -> (last, previous) engagement instants
        self.buf: list[tuple[int, str]] = []  # (instant, item) of first touches within the pairing window of the latest

    def add(self, ts: int, code: int, item: str, category: str | None, brand: str | None, log_price: float | None,
            first_touch: bool, history_items: int, cooc_window_us: int) -> list[tuple[str, str, int]]:
        """Count one event; returns the co-occurrence pairs (item, other, instant) a first touch creates."""
        if ts > self.counts.last:
            self.d_cat, self.d_brand, self.d_lp = {}, {}, (0.0, 0)
        at_last = self.counts.add(ts, code)
        if code not in ENGAGEMENT_CODES:
            return []
        self.eng = _pushed(self.eng, ts)
        for key, total, delta in ((category, self.cat, self.d_cat), (brand, self.brand, self.d_brand)):
            if key is not None:
                total[key] = total.get(key, 0) + 1
                if at_last:
                    delta[key] = delta.get(key, 0) + 1
        if log_price is not None:
            self.lp = (self.lp[0] + log_price, self.lp[1] + 1)
            if at_last:
                self.d_lp = (self.d_lp[0] + log_price, self.d_lp[1] + 1)
        self.recent[item] = _pushed(self.recent.get(item, _NO_PAIR), ts)
        self._prune_recent(history_items)
        if not first_touch:
            return []
        pairs = [(item, other, max(ts, t2)) for t2, other in self.buf if abs(ts - t2) <= cooc_window_us]
        self.buf.append((ts, item))
        latest = max(e[0] for e in self.buf)
        self.buf = [e for e in self.buf if e[0] >= latest - cooc_window_us]
        return pairs

    def _prune_recent(self, n: int) -> None:
        """Keep the n + |items engaged at the latest instant| most recent items: a read at the latest
        instant drops or demotes only those, and every kept item still outranks every pruned one."""
        latest = self.eng[0]
        keep = n + sum(1 for pair in self.recent.values() if pair[0] == latest)
        if len(self.recent) > keep:
            ranked = sorted(self.recent.items(), key=lambda kv: (-kv[1][0], kv[0]))
            self.recent = dict(ranked[:keep])

    # -- reads at t (t >= last)

    def history(self, t: int, n: int | None) -> list[str]:
        """The last n (None: all kept) distinct engaged items before t, most recent first, ties by item id."""
        ranked = sorted((-instant_before(p[0], p[1], t), item) for item, p in self.recent.items())
        return [item for neg, item in ranked if -neg != NO_TS][:n]

    def base(self, t: int) -> dict[str, float]:
        c = self.counts
        at_t = c.last == t
        delta = c.delta if at_t else [0] * N_EVENTS
        out: dict[str, float] = {}
        for k, p in enumerate(EVENT_PLURALS):
            out[f"user_n_{p}_all"] = c.tot[k] - delta[k]
        for w in USER_WINDOWS:
            tile = WINDOWS[w].tile_us
            counts = window_counts_one(c.rings[tile], c.last, t, tile, w)
            for k, p in enumerate(EVENT_PLURALS):
                out[f"user_n_{p}_{w}"] = counts[k] - delta[k]
        before = instant_before(self.eng[0], self.eng[1], t)
        out["user_eng_age_us"] = np.nan if before == NO_TS else float(t - before)
        d_lp = self.d_lp if at_t else [0.0, 0]
        out["user_logprice_sum"] = self.lp[0] - d_lp[0]
        out["user_logprice_n"] = self.lp[1] - d_lp[1]
        return out

    def groups(self, kind: str) -> list[str]:
        """The categories (kind "category") or brands the user engaged with."""
        return list(self.cat if kind == "category" else self.brand)

    def group_count(self, t: int, kind: str, key: str | None) -> float:
        """Engagements before t on items of category / brand `key` (NaN for no key)."""
        if key is None:
            return np.nan
        total, delta = (self.cat, self.d_cat) if kind == "category" else (self.brand, self.d_brand)
        return total.get(key, 0) - (delta.get(key, 0) if self.counts.last == t else 0)

    def to_dict(self) -> dict:
        c = self.counts
        return {"last": c.last, "tot": c.tot, "delta": c.delta, "rings": {str(k): v for k, v in c.rings.items()},
                **{name: getattr(self, name) for name in self.__slots__ if name != "counts"}}

    @classmethod
    def from_dict(cls, d: dict) -> UserState:
        s = cls()
        s.counts.last, s.counts.tot, s.counts.delta = d["last"], d["tot"], d["delta"]
        s.counts.rings = {int(k): v for k, v in d["rings"].items()}
        s.cat, s.d_cat, s.brand, s.d_brand = d["cat"], d["d_cat"], d["brand"], d["d_brand"]
        s.eng, s.lp, s.d_lp = tuple(d["eng"]), tuple(d["lp"]), tuple(d["d_lp"])
        s.recent = {k: tuple(v) for k, v in d["recent"].items()}
        s.buf = [tuple(e) for e in d["buf"]]
        return s


# ---------------------------------------------------------------- co-occurrence


class CoocState:
    """c(i, j) for one item i, with the delta at the latest pair instant.

    `cooc_counts` reads it through arrays over an `ItemIndex`'s rows (`indexed`), built on first
    use and kept until the state changes or the index no longer matches them. The partners' rows
    outlive a change: partners only ever join (at the end of `n`, whose order dicts keep), so a
    change looks up the rows of its new partners only, not of all of them (a write flood changes
    the states every Rank reads)."""

    __slots__ = ("n", "last", "d", "_arrays", "_rows")

    def __init__(self) -> None:
        self.n: dict[str, int] = {}
        self.last = NO_TS
        self.d: dict[str, int] = {}
        self._arrays: tuple | None = None
        self._rows: tuple | None = None  # (index epoch, index size, the row of each of the first partners)

    def add(self, other: str, at: int) -> None:
        if at > self.last:
            self.last, self.d = at, {}
        self.n[other] = self.n.get(other, 0) + 1
        if at == self.last:
            self.d[other] = self.d.get(other, 0) + 1
        self._arrays = None

    def _partner_rows(self, index: ItemIndex) -> np.ndarray:
        """The row of every partner in `n`'s order (-1: not in `index`)."""
        r = self._rows
        if r is not None and r[0] == index.epoch and (r[1] == len(index) or (r[2] >= 0).all()):
            rows = r[2]
            if len(rows) < len(self.n):  # new partners since: theirs only
                rows = np.concatenate([rows, index.known(list(islice(self.n, len(rows), None)))])
        else:
            rows = index.known(list(self.n))
        self._rows = (index.epoch, len(index), rows)
        return rows

    def indexed(self, index: ItemIndex) -> tuple[np.ndarray, np.ndarray]:
        """(the rows of the partners j that `index` holds, c(i, j)), kept while the index keeps
        its epoch and, if some partner was not in it, its size."""
        a = self._arrays
        if a is not None and a[0] == index.epoch and (a[1] or a[2] == len(index)):
            return a[3]
        rows = self._partner_rows(index)
        held = rows >= 0
        n = np.fromiter(self.n.values(), dtype=np.int64, count=len(self.n))
        all_held = bool(held.all())
        arrays = (rows, n) if all_held else (rows[held], n[held])
        self._arrays = (index.epoch, all_held, len(index), arrays)
        return arrays

    def indexed_delta(self, index: ItemIndex) -> np.ndarray:
        """The delta at `last` of each partner `indexed` returns, in its order (a read at exactly
        `last` leaves it out; rarer than any other read, so never kept)."""
        rows = self._partner_rows(index)
        d = np.fromiter((self.d.get(j, 0) for j in self.n), dtype=np.int64, count=len(self.n)) \
            if self.d else np.zeros(len(self.n), dtype=np.int64)
        return d[rows >= 0]

    def to_dict(self) -> dict:
        return {"n": self.n, "last": self.last, "d": self.d}

    def to_owned(self) -> Owned:
        """`to_dict` as an `Owned` copy (the counts are ints: copying the dicts is enough)."""
        return Owned(n=dict(self.n), last=self.last, d=dict(self.d))

    @classmethod
    def from_dict(cls, d: dict) -> CoocState:
        s = cls()
        s.n, s.last, s.d = d["n"], d["last"], d["d"]
        return s


def cooc_counts(states: list[CoocState], index: ItemIndex, rows: np.ndarray, t: int) -> np.ndarray:
    """(len(states), len(rows)): c(i, j) before t of each state's item i and the item j at each of
    `rows` (rows of `index`, repeats allowed); one scatter over all the states' partners."""
    out = np.zeros((len(states), len(rows)), dtype=np.int64)
    if not states or not len(rows):
        return out
    arrays = [s.indexed(index) for s in states]
    partners = np.concatenate([a[0] for a in arrays])
    if not partners.size:
        return out
    # position of each row among the candidates: the last one for a repeated row, spread back below
    slot = np.full(max(int(rows.max()), int(partners.max())) + 1, -1, dtype=np.int64)
    slot[rows] = np.arange(len(rows))
    at = slot[partners]
    hit = at >= 0
    state = np.repeat(np.arange(len(states)), [len(a[0]) for a in arrays])
    c = np.concatenate([a[1] - s.indexed_delta(index) if s.last == t else a[1] for s, a in zip(states, arrays)])
    out[state[hit], at[hit]] = c[hit]
    return out[:, slot[rows]]
