"""Item id -> a dense row number, shared by the per-item arrays of one `OnlineFeatures`.

A request maps its candidate ids to rows once (`rows`); the catalog columns, the cached item
parts, the user x item lookups and the co-occurrence counts are then numpy indexing over those
rows, with no further Python work per candidate.

    index = ItemIndex()
    rows = index.rows(["a", "b", "a"])   # array([0, 1, 0]): new ids are added
    index.known(["b", "zz"])             # array([1, -1]): adds nothing

Rows are append-only while the index holds at most `max_items` ids. The `rows` call that would
pass it starts over: `epoch` goes up and every id gets a new row, so an array indexed by rows
must be rebuilt when the epoch it was built for is not the current one. Only `rows` can start
over, so rows from one `rows` call stay valid for `known` lookups made after it.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import repeat

import numpy as np


class ItemIndex:
    def __init__(self, max_items: int = 500_000):
        self.max_items = max_items
        self.epoch = 0
        self._row: dict[str, int] = {}
        self.ids: list[str] = []  # the id of each row

    def __len__(self) -> int:
        return len(self.ids)

    def get(self, item_id: str) -> int | None:
        return self._row.get(item_id)

    def known(self, item_ids: Sequence[str]) -> np.ndarray:
        """The row of each id; -1 for ids the index does not hold. Adds nothing."""
        return np.fromiter(map(self._row.get, item_ids, repeat(-1)), dtype=np.int64, count=len(item_ids))

    def rows(self, item_ids: Sequence[str]) -> np.ndarray:
        """The row of each id, adding the new ones (which may start the index over, see above)."""
        rows = self.known(item_ids)
        if rows.size and rows.min() < 0:
            new = list(dict.fromkeys(i for i, r in zip(item_ids, rows.tolist()) if r < 0))
            if len(self.ids) + len(new) > self.max_items:
                self._row, self.ids = {}, []
                self.epoch += 1
                new = list(dict.fromkeys(item_ids))
            start = len(self.ids)
            self._row.update(zip(new, range(start, start + len(new))))
            self.ids.extend(new)
            rows = self.known(item_ids)
        return rows
