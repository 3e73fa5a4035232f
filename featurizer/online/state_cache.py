"""Decoded online state kept between reads, for stores that say what changed.

A request reads the same states again and again (the catalog's item states, a user's state,
the co-occurrence rows of their recent items); decoding them on every read costs more than the
features computed from them. These caches keep what was decoded and drop an entry as soon as
the store reports its key written or deleted (`OnlineStore.changes`), so a read returns exactly
what decoding the store's current value would. With a store that cannot tell (Redis: other
processes write to it) nothing is kept and every read decodes.

- `DecodedCache(store, entity, decode)`: key -> decoded object (None when missing), LRU-bounded.
  Objects are shared between reads: callers must not mutate them, except the writer that takes
  them with `for_update` and hands them back with `written` (or `discard`): the fold keeps the
  states it rewrites decoded instead of decoding them again on its next event and on the next read.
- `ItemPartsCache(store, index)`: per row of an `ItemIndex`, the item's `item_parts` (scalars and
  window counts), recomputed when the item changed, t entered another `WINDOW_KEY_US` tile or the
  index started over; `gather` returns the parts of many rows as arrays, ready for
  `item_base_from_parts`.
- `UserItemIndex(store)`: per user, the items it has a user x item state for, and for the users
  read lately those states packed and keyed by index rows (`records`, patched as the user writes),
  so a request finds its candidates among them with one array search instead of probing the (large)
  table, or decoding, per candidate.

Memory, bounded: a decoded user state is about 6 KB, a co-occurrence state about 3.5 KB (40
partners), an item row about 250 B of parts and 224 B of count features (28 float64);
OnlineFeatures keeps up to 20k users, 20k co-occurrence states and 500k items
(`OnlineFeatures(max_items=)`; about 120 + 70 + 240 MB at most, plus about 50 MB for the
`ItemIndex` of their ids), and the index holds every user x item key. The packed user x item
states are bounded by their count (`UserItemIndex(max_records=)`, 500k: 112 B each with the row,
about 56 MB at most).

Not thread-safe with respect to each other's calls (one caller at a time, as OnlineFeatures).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from featurizer.definitions import ITEM_COUNT_NAMES, NUMPY, derive_item_counts
from featurizer.online.item_index import ItemIndex
from featurizer.online.state import (
    EMPTY_ITEM,
    ITEM_DTYPE,
    ITEM_PART_FIELDS,
    ITEM_WINDOWS,
    N_EVENTS,
    WINDOW_KEY_US,
    item_counts_from_parts,
    item_parts,
    UI_BASE_NAMES,
    UNSEEN_USER_ITEM,
    parse_user_item_key,
    user_item_block,
    user_item_keys,
    user_item_records,
)
from featurizer.store.base import OnlineStore

_MISS = object()
_NO_KEY = int(np.iinfo(np.int64).min)  # window counts not computed (or invalidated)


class DecodedCache:
    def __init__(self, store: OnlineStore, entity: str, decode: Callable[[Any], Any], capacity: int = 20_000):
        self.store, self.entity, self.decode, self.capacity = store, entity, decode, capacity
        self._d: OrderedDict[str, Any] = OrderedDict()
        self._version: int | None = None

    def _sync(self) -> bool:
        """Drop what changed in the store; False when the store cannot version (cache nothing)."""
        version, changed = self.store.changes(self.entity, self._version)
        if version is None:
            self._d.clear()
            return False
        if changed is None:
            self._d.clear()
        else:
            for key in changed:
                self._d.pop(key, None)
        self._version = version
        return True

    def get(self, keys: Sequence[str]) -> list[Any]:
        """The decoded value of each key (None when missing), as decoding the store's value would give."""
        if not self._sync():
            return [None if v is None else self.decode(v) for v in self.store.read(self.entity, keys)]
        d = self._d
        out = [d.get(k, _MISS) for k in keys]
        missing = list(dict.fromkeys(k for k, v in zip(keys, out) if v is _MISS))
        if missing:
            # A write racing this read is listed by the next _sync, which drops what is kept here.
            fresh = {k: None if v is None else self.decode(v) for k, v in zip(missing, self.store.read(self.entity, missing))}
            d.update(fresh)
            self._trim()
            out = [fresh[k] if v is _MISS else v for k, v in zip(keys, out)]
        for k in keys:
            if k in d:
                d.move_to_end(k)
        return out

    def for_update(self, keys: Sequence[str], new: Callable[[], Any]) -> dict[str, Any]:
        """key -> its decoded value (`new()` where the store holds none), for a writer that changes
        them in place and commits their encodings: then `written`, or `discard` if the commit (or
        anything before it) failed. Kept objects are the ones reads share, so the writer changes
        them only between reads (OnlineFeatures: one caller at a time); a write stops paying
        for decoding the states it rewrites, and the next read for decoding what it wrote."""
        return {k: new() if v is None else v for k, v in zip(keys, self.get(keys))}

    def written(self, values: Mapping[str, Any]) -> None:
        """After a successful commit of `values` (from `for_update`): keep them decoded when that
        commit was the only write since (the store's version moved by one, over these keys only);
        else drop whatever changed, as a read would."""
        version, changed = self.store.changes(self.entity, self._version)
        if version is None:
            return
        if (self._version is None or version != self._version + 1 or changed is None
                or not changed.issubset(values.keys())):
            self._sync()  # our keys are among the changed ones: dropped
            return
        d = self._d
        for k, v in values.items():
            d[k] = v
            d.move_to_end(k)
        self._trim()
        self._version = version

    def _trim(self) -> None:
        """Drop the least recently used entries past `capacity`."""
        while len(self._d) > self.capacity:
            self._d.popitem(last=False)

    def discard(self, keys) -> None:
        """Forget these keys (a writer changed their objects and its commit failed)."""
        for k in keys:
            self._d.pop(k, None)

    def __len__(self) -> int:
        return len(self._d)


class ItemPartsCache:
    """Rows of item parts, one per row of an `ItemIndex` (also ids the store does not hold), and of
    the features `derive_item_counts` makes of them."""

    def __init__(self, store: OnlineStore, index: ItemIndex):
        self.store, self.index = store, index
        self._version: int | None = None
        self._epoch = index.epoch
        self._key = np.full(0, _NO_KEY, dtype=np.int64)  # per row: the t // WINDOW_KEY_US its parts are for
        template = item_parts(np.frombuffer(EMPTY_ITEM, dtype=ITEM_DTYPE), 0)
        self._parts = {name: np.zeros((0, *template[name].shape[1:]), dtype=np.int64) for name in ITEM_PART_FIELDS}
        assert self._parts["window"].shape[1:] == (len(ITEM_WINDOWS), N_EVENTS)
        # Per row: derive_item_counts of its parts for a t after its latest instant (ITEM_COUNT_NAMES order).
        self._counts = np.zeros((0, len(ITEM_COUNT_NAMES)), dtype=np.float64)

    def _grow(self, need: int) -> None:
        capacity = len(self._key)
        if need <= capacity:
            return
        new = max(need, 2 * capacity, 1024)
        self._key = np.concatenate([self._key, np.full(new - capacity, _NO_KEY, dtype=np.int64)])
        for name, arr in self._parts.items():
            self._parts[name] = np.concatenate([arr, np.zeros((new - capacity, *arr.shape[1:]), dtype=arr.dtype)])
        self._counts = np.concatenate([self._counts, np.zeros((new - capacity, self._counts.shape[1]))])

    def _sync(self) -> bool:
        version, changed = self.store.changes("item", self._version)
        if version is None:
            return False
        if changed is None or self._epoch != self.index.epoch:
            self._key[:] = _NO_KEY
            self._epoch = self.index.epoch
        if changed is not None:
            for key in changed:
                r = self.index.get(key)
                if r is not None and r < len(self._key):
                    self._key[r] = _NO_KEY
        self._version = version
        return True

    def _refresh(self, rows: np.ndarray, t: int) -> bool:
        """Recompute the rows whose item changed or whose parts are for another t // WINDOW_KEY_US;
        False when the store cannot version (nothing is kept)."""
        if not self._sync():
            return False
        self._grow(len(self.index))
        key = t // WINDOW_KEY_US
        stale = rows[self._key[rows] != key]
        if stale.size:
            stale = np.unique(stale)
            ids = self.index.ids
            blobs = self.store.read("item", [ids[r] for r in stale.tolist()])
            rec = np.frombuffer(b"".join(EMPTY_ITEM if b is None else b for b in blobs), dtype=ITEM_DTYPE)
            parts = item_parts(rec, t)
            for name, values in parts.items():
                self._parts[name][stale] = values
            # for any t after the items' latest instant: no delta left out
            counts = derive_item_counts(item_counts_from_parts(parts, np.zeros(len(stale), dtype=bool)), NUMPY)
            self._counts[stale] = np.column_stack([np.broadcast_to(counts[name], len(stale)) for name in ITEM_COUNT_NAMES])
            self._key[stale] = key
        return True

    def written(self, item_ids: Sequence[str], t: int) -> None:
        """After a commit that wrote these items (t: at or after its latest event): recompute their rows
        now, for t's tile, so that the next reads find them current. Under a write flood most Ranks
        meet a few changed items, and a refresh costs about the same for one row as for dozens (its
        numpy calls): one per commit instead of one per Rank. Nothing before the first read (the rows
        are made by reads), nor when the store cannot version."""
        if self._version is None:
            return
        rows = self.index.known(item_ids)
        rows = rows[rows >= 0]
        if rows.size:
            self._refresh(rows, t)

    def gather(self, rows: np.ndarray, t: int) -> dict[str, np.ndarray] | None:
        """`item_parts` at t (t >= every applied event) of the items at `rows` of the index (from
        a `rows` call made since the last gather); None when the store cannot version."""
        if not self._refresh(rows, t):
            return None
        return {name: arr[rows] for name, arr in self._parts.items()}

    def gather_counts(self, rows: np.ndarray, t: int) -> dict[str, np.ndarray] | None:
        """As `gather`, but only "last", "first" and "users" of the parts, and "counts": the
        `derive_item_counts` features of each row (len(rows), len(ITEM_COUNT_NAMES)), which hold for
        a t after the item's latest instant (for a row with last == t, use `gather`)."""
        if not self._refresh(rows, t):
            return None
        parts = self._parts
        return {"last": parts["last"][rows], "first": parts["first"][rows], "users": parts["users"][rows],
                "counts": self._counts[rows]}


class UserItemIndex:
    """user id -> the item ids of its "ui" keys, from a store that lists keys and says what changed;
    and per user, on demand, those states packed and keyed by `ItemIndex` rows (`records`).

    Every written key is added before the next read; a deleted one is removed too, though a stale
    entry would only cost a read that returns None. A user's packed states follow each write or
    deletion of the user's keys (`_patch`: the changed states only, not the user's all)."""

    def __init__(self, store: OnlineStore, entity: str = "ui", max_records: int = 500_000):
        self.store, self.entity, self.max_records = store, entity, max_records
        self._version: int | None = None
        # user -> its items, as a dict of None: a set stays tracked by the garbage collector, and every
        # full collection walked the whole index (3,000 users x 180 items on the serve bench: the largest
        # part of a 45 ms pass); a dict of str keys and None values is untracked
        self._items: dict[str, dict[str, None]] = {}
        self._names: dict[str, str] = {}  # one str object per item id, shared by the users' entries
        # user -> (index epoch, every item held by the index, index size, rows ascending, packed states)
        self._records: OrderedDict[str, tuple] = OrderedDict()
        self._held = 0  # packed states in _records
        self._index: ItemIndex | None = None  # the index `records` was last called with

    def warm(self) -> None:
        """Read every key now (the first read's work: 0.7 s for 870k states), not in a request."""
        self._sync()

    def _add(self, key: str) -> None:
        parsed = parse_user_item_key(key)
        if parsed is not None:
            user, item = parsed
            item = self._names.setdefault(item, item)
            self._items.setdefault(user, {})[item] = None

    def _drop(self, user: str) -> None:
        entry = self._records.pop(user, None)
        if entry is not None:
            self._held -= len(entry[3])

    def _sync(self) -> bool:
        version, changed = self.store.changes(self.entity, self._version)
        if version is None:
            return False
        if changed is None:
            keys = self.store.keys(self.entity)
            if keys is None:
                return False
            self._items, self._names = {}, {}
            self._records.clear()
            self._held = 0
            for key in keys:
                self._add(key)
        elif changed:
            changed = list(changed)
            patches: dict[str, list[tuple[str, object]]] = {}
            for key, value in zip(changed, self.store.read(self.entity, changed)):  # written, or deleted?
                parsed = parse_user_item_key(key)
                if parsed is None:
                    continue
                if parsed[0] in self._records:
                    patches.setdefault(parsed[0], []).append((parsed[1], value))
                if value is not None:
                    self._add(key)
                elif parsed[0] in self._items:
                    self._items[parsed[0]].pop(parsed[1], None)
            for user, changes in patches.items():
                self._patch(user, changes)
        self._version = version
        return True

    @staticmethod
    def _current(entry: tuple, index: ItemIndex | None) -> bool:
        """Whether packed states still hold every item of theirs that `index` holds: the same epoch,
        and either every item was in it or it has not grown since."""
        return index is not None and entry[0] == index.epoch and (entry[1] or entry[2] == len(index))

    def _patch(self, user: str, changes: list[tuple[str, object]]) -> None:
        """Bring a user's packed states up to date with their keys' new values (None: deleted), so that
        a user who keeps acting (a write flood's readers rank right after they write) is not read whole
        again after each event. New arrays, never changed in place: a caller may hold the old ones."""
        entry, index = self._records[user], self._index
        if not self._current(entry, index):  # stale already: rebuilt at its next read
            self._drop(user)
            return
        epoch, all_held, size, rows, rec = entry
        n0 = len(rows)
        for item, value in changes:
            r = index.get(item)
            if r is None:  # not in the index: left out, and the entry is kept only while the index keeps its size
                all_held, size = False, len(index)
                continue
            at = int(np.searchsorted(rows, r))
            there = at < len(rows) and rows[at] == r
            if value is None:
                if there:
                    rows, rec = np.delete(rows, at), np.delete(rec, at)
            elif there:
                rec = rec.copy()
                rec[at] = user_item_records([value])[0]
            else:
                rows, rec = np.insert(rows, at, r), np.insert(rec, at, user_item_records([value])[0])
        rows.flags.writeable = rec.flags.writeable = False
        self._records[user] = (epoch, all_held, size, rows, rec)
        self._held += len(rows) - n0

    def records(self, user_id: str, index: ItemIndex) -> tuple[np.ndarray, np.ndarray] | None:
        """(rows, states): the `index` rows of the items `user_id` has a state for, ascending, and
        those states packed (`user_item_records`, same order; items the index does not hold are left
        out). Kept, and patched when the user's keys change, until the index starts over or, when some
        item was not in the index, the index grows; at most `max_records` states kept in all (least recently
        read users go first). None when the store cannot tell. Not to be changed by the caller."""
        self._index = index
        if not self._sync():
            return None
        hit = self._records.get(user_id)
        if hit is not None and self._current(hit, index):
            self._records.move_to_end(user_id)
            return hit[3], hit[4]
        self._drop(user_id)
        items = list(self._items.get(user_id) or ())
        rows = index.known(items)
        held = rows >= 0
        if not held.all():
            items = [i for i, h in zip(items, held.tolist()) if h]
            rows = rows[held]
        order = np.argsort(rows, kind="stable")
        rec = user_item_records(self.store.read(self.entity, user_item_keys(user_id, [items[k] for k in order.tolist()])))
        rows = rows[order]
        rows.flags.writeable = rec.flags.writeable = False
        self._records[user_id] = (index.epoch, bool(held.all()), len(index), rows, rec)
        self._held += len(rows)
        while self._held > self.max_records and len(self._records) > 1:
            self._drop(next(iter(self._records)))
        return rows, rec

    def base(self, user_id: str, index: ItemIndex, rows: np.ndarray, t: int) -> dict[str, np.ndarray] | None:
        """`user_item_base_from_records` of the user's states of the items at `rows` of `index` (from
        this read's `rows` call), from the packed states (`records`): only the candidates the user has a
        state for are computed, found by one `searchsorted`; the rest take the never-seen values, as
        scalars when no candidate has a state (derive broadcasts them, as it does the user's
        aggregates). None when the store cannot tell."""
        held = self.records(user_id, index)
        if held is None:
            return None
        user_rows, rec = held
        if user_rows.size:
            at = np.searchsorted(user_rows, rows)
            at[at == user_rows.size] = 0
            hits = np.flatnonzero(user_rows[at] == rows)
        if not user_rows.size or not hits.size:
            return dict(zip(UI_BASE_NAMES, UNSEEN_USER_ITEM))
        block = np.empty((len(UI_BASE_NAMES), len(rows)))
        block[:] = UNSEEN_USER_ITEM[:, None]
        block[:, hits] = user_item_block(rec[at[hits]], t)
        return dict(zip(UI_BASE_NAMES, block))
