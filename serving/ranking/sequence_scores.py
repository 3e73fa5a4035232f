"""A bundle's sequence model as the engine runs it (issue 31 item 3): `sequence_score`.

    scorer = SequenceScorer(bundle.sequence, items, cache_size)
    user, hit = scorer.user_vector(user_id, history)   # history: OnlineFeatures.sequence, oldest first
    scores = scorer.scores(user, rows)                  # rows: the candidates' item-store rows

- **The user side** (`ranker.sequence.SequenceState.user_vector`, numpy, in the ranking process: no
  Triton call) runs over the user's sequence as the online state keeps it (`featurizer.online.
  user_sequence`, the order the model was trained on), its items mapped to the model's catalog:
  items the model never saw (upserted after it was trained) are left out, and the last `max_len`
  of the rest are read. It is cached per user with the rows it was computed from, so it is
  recomputed only after the user engaged with a new item.
- **The item side** is a row of the model's table per candidate; a candidate the model does not
  know scores NaN (missing, which LightGBM routes as trained), as does every candidate of a user
  with no known item in their sequence.

The map from item-store rows to the model's catalog grows with the item store (rows keep their
place there), so a Rank maps its candidates with one gather.
"""

from __future__ import annotations

import numpy as np

from ranker.sequence import SequenceState
from serving.ranking.lru import LruCache


class SequenceScorer:
    def __init__(self, model: SequenceState, items, cache_size: int):
        self.model = model
        self.items = items  # serving.ranking.item_store.ItemStore
        self._catalog = np.zeros(0, dtype=np.int64)  # item-store row -> the model's catalog index (-1: unknown)
        self._users = LruCache(cache_size)  # user id -> (the catalog indices read, user vector or None)

    def forget(self, users: set[str]) -> int:
        """Drop the cached states of `users` (an erasure)."""
        return self._users.discard_where(users.__contains__)

    def catalog(self, rows: np.ndarray) -> np.ndarray:
        """The model's catalog index of each item-store row (-1: an unknown row or item)."""
        n = len(self.items)
        if len(self._catalog) < n:
            new = self.items.item_ids[len(self._catalog):n]
            index = self.model.index
            more = np.fromiter((index.get(i, -1) for i in new), dtype=np.int64, count=len(new))
            self._catalog = np.concatenate([self._catalog, more])
        rows = np.asarray(rows, dtype=np.int64)
        if not len(self._catalog):
            return np.full(len(rows), -1, dtype=np.int64)
        return np.where(rows >= 0, self._catalog[np.maximum(rows, 0)], -1)

    def user_vector(self, user_id: str, history: list[str]) -> tuple[np.ndarray | None, bool]:
        """(the model's state after the user's sequence, or None when no item of it is known to the
        model; whether it came from the cache)."""
        known = self.catalog(self.items.rows(history))
        known = known[known >= 0][-self.model.cfg.max_len:]
        key = known.tobytes()
        cached = self._users.get(user_id)
        if cached is not None and cached[0] == key:
            return cached[1], True
        user = self.model.user_vector(known)
        self._users.put(user_id, (key, user))
        return user, False

    def scores(self, user: np.ndarray | None, rows: np.ndarray) -> np.ndarray:
        """float64 per candidate (item-store rows): the model's score, NaN where it has none."""
        out = np.full(len(rows), np.nan)
        if user is None:
            return out
        index = self.catalog(rows)
        known = index >= 0
        out[known] = self.model.scores(user, index[known])
        return out
