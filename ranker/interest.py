"""The interest score: how well an item's text matches the user's recent history.

    score = cosine(user-history embedding, item-text embedding) = the dot product of unit rows

Every part of semrank computes it here, through `interest_scores`: the service for each request
(`serving.ranking.engine`), ranker training for each group (`training.lambdarank`), the
evaluation for each candidate and over the whole catalog (`training.evaluation`), the first stage
(`training.lambdarank.first_stage`) and the encoder's validation (`training.encoder.pairs`).

A NaN row stands for "no embedding" (a user without history, an item without text, a vector the
encoder could not produce) and gives a NaN score, which LightGBM treats as missing.

Pairs are computed row by row with `np.einsum` over float32, so the service and training round
alike and give bit-identical features (tests/test_train_serve_parity.py). Scoring every user
against every item is a matrix product (BLAS), which may differ from the pair form in the last
bit: it ranks a whole catalog (first stage, encoder-only models), while features fed to a bundle
always come from the pair form.
"""

from __future__ import annotations

import numpy as np

# Pairs gathered at once: each costs two gathered float32 rows (about 1.5 kB each at 384 dimensions).
PAIR_CHUNK = 100_000


def interest_scores(users: np.ndarray, items: np.ndarray,
                    pairs: tuple[np.ndarray | int, np.ndarray | None] | None = None) -> np.ndarray:
    """Interest scores (float32) of unit-row embeddings `users` (m, d) and `items` (n, d).

    - `pairs` None: every user against every item, (m, n).
    - `pairs` (u, i): one score per pair, users[u[k]] . items[i[k]]. `u` may be one int (the same
      user for every pair, never copied); `i` None means items row k for pair k. An index of -1
      gives NaN, as does a NaN row.
    """
    users = np.asarray(users, dtype=np.float32)
    items = np.asarray(items, dtype=np.float32)
    if users.ndim != 2 or items.ndim != 2 or users.shape[1] != items.shape[1]:
        raise ValueError(f"interest_scores needs (m, d) users and (n, d) items of one d; got {users.shape}, {items.shape}")
    if pairs is None:
        return users @ items.T
    u, i = pairs
    if np.ndim(u) == 0:
        return _one_user(users[int(u)], items, None if i is None else np.asarray(i, dtype=np.int64))
    i = np.arange(items.shape[0]) if i is None else np.asarray(i, dtype=np.int64)
    u = np.asarray(u, dtype=np.int64)
    if u.shape != i.shape:
        raise ValueError(f"pairs need as many user rows as item rows, got {u.shape} and {i.shape}")
    out = np.full(u.shape[0], np.nan, dtype=np.float32)
    ok = np.flatnonzero((u >= 0) & (i >= 0))
    for a in range(0, ok.size, PAIR_CHUNK):
        k = ok[a : a + PAIR_CHUNK]
        out[k] = np.einsum("ij,ij->i", users[u[k]], items[i[k]])
    return out


def _one_user(user: np.ndarray, items: np.ndarray, i: np.ndarray | None) -> np.ndarray:
    """The same einsum as the pair form, with the user row broadcast instead of gathered."""
    rows = items if i is None else items[np.where(i >= 0, i, 0)]  # None: every item in order, no gather
    out = np.einsum("ij,ij->i", rows, np.broadcast_to(user, rows.shape))
    if i is not None and (i < 0).any():
        out[i < 0] = np.nan
    return out
