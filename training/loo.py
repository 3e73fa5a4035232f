"""Leave-one-out split of interaction sequences, as in the SASRec / TIGER benchmarks.

Per user, the engaged items (click, add_to_cart, purchase; each item once, at
its first engagement) ordered by time, ties broken by `seq_pos` where the data
has it and by file order otherwise:
  last item         -> test target
  second-to-last    -> validation target
  the rest          -> training history.
Users with fewer than 3 distinct items have no test target and only contribute
training interactions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from featurizer.schema import ENGAGEMENTS, Dataset

MIN_SEQUENCE = 3


@dataclass
class LooSplit:
    item_ids: list[str]  # catalog order; item index k <-> item_ids[k]
    item_index: dict[str, int]
    titles: list[str]
    users: list[str]  # users with a test target
    sequences: list[np.ndarray]  # per user in `users`: item indices, oldest first
    train_only: list[np.ndarray]  # sequences of users too short to evaluate (all training)

    def history(self, u: int, target: str) -> np.ndarray:
        """Items before the target, oldest first: `valid` -> seq[:-2], `test` -> seq[:-1]."""
        seq = self.sequences[u]
        return seq[:-2] if target == "valid" else seq[:-1]

    def target(self, u: int, target: str) -> int:
        seq = self.sequences[u]
        return int(seq[-2] if target == "valid" else seq[-1])

    def training_sequences(self) -> list[np.ndarray]:
        """What a model may learn from when it is evaluated on `test`: every user's sequence
        without its test item (the validation item included) plus the short sequences."""
        return [s[:-1] for s in self.sequences] + self.train_only

    def train_item_counts(self, target: str = "test") -> np.ndarray:
        """Interactions per item that precede the evaluation targets (popularity without leakage)."""
        cut = 1 if target == "test" else 2
        seqs = [s[:-cut] for s in self.sequences] + self.train_only
        flat = np.concatenate(seqs) if seqs else np.zeros(0, dtype=np.int64)
        return np.bincount(flat, minlength=len(self.item_ids)).astype(np.float64)


def loo_split(ds: Dataset) -> LooSplit:
    items = ds.items.select("item_id", "title")
    item_ids = items["item_id"].to_list()
    index = {i: k for k, i in enumerate(item_ids)}
    ev = (
        ds.events.with_row_index("_row")
        .filter(pl.col("event").is_in(list(ENGAGEMENTS)) & pl.col("item_id").is_in(items["item_id"].implode()))
        .sort(["user_id", "ts", "seq_pos", "_row"], nulls_last=True)
        .unique(["user_id", "item_id"], keep="first", maintain_order=True)
        .with_columns(pl.col("item_id").replace_strict(index, return_dtype=pl.Int64).alias("_idx"))
        .group_by("user_id", maintain_order=True)
        .agg(pl.col("_idx"))
    )
    users, seqs, short = [], [], []
    for user, seq in zip(ev["user_id"].to_list(), ev["_idx"].to_list()):
        arr = np.asarray(seq, dtype=np.int64)
        if arr.size >= MIN_SEQUENCE:
            users.append(user)
            seqs.append(arr)
        else:
            short.append(arr)
    return LooSplit(item_ids=item_ids, item_index=index, titles=items["title"].to_list(), users=users, sequences=seqs, train_only=short)
