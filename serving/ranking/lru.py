"""A bounded least-recently-used map: the engine's caches (user vectors, inline item vectors,
sequence-model user states)."""

from __future__ import annotations

from collections import OrderedDict


class LruCache:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self._d: OrderedDict = OrderedDict()

    def get(self, key):
        v = self._d.get(key)
        if v is not None:
            self._d.move_to_end(key)
        return v

    def put(self, key, value) -> None:
        self._d[key] = value
        self._d.move_to_end(key)
        if len(self._d) > self.capacity:
            self._d.popitem(last=False)

    def discard_where(self, drop) -> int:
        """Remove the entries whose key `drop(key)` is true; returns how many."""
        keys = [k for k in self._d if drop(k)]
        for k in keys:
            del self._d[k]
        return len(keys)

    def __len__(self) -> int:
        return len(self._d)
