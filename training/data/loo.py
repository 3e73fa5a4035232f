"""Leave-one-out split of interaction sequences, as in the SASRec / TIGER benchmarks.

Per user, the engaged items (click, add_to_cart, purchase; each item once, at
its first engagement) ordered by time, ties broken by `seq_pos` where the data
has it and by file order otherwise:
  last item         -> test target
  second-to-last    -> validation target
  the rest          -> training history.
Users with fewer than 3 distinct items have no test target and only contribute
training interactions.

`loo_data` also makes the events' clock agree with that order. The public sets
are stamped by day (Amazon) or second (MovieLens), and about half the Amazon
users reviewed their last two items on one day: read "strictly before the test
item's time", their history would lack the validation item, which the
sequence models (given seq[:-1]) do see. So each user's events of one tick are
moved apart by 1 µs each, in sequence order, and the features read other
users' events only up to the previous tick (`offline_features(resolution_us=)`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from featurizer.contracts.schema import ENGAGEMENTS, Dataset

MIN_SEQUENCE = 3
# Candidate clock resolutions, coarsest first (µs).
RESOLUTIONS_US = (86_400_000_000, 3_600_000_000, 60_000_000, 1_000_000, 1_000, 1)


@dataclass
class LooSplit:
    item_ids: list[str]  # catalog order; item index k <-> item_ids[k]
    item_index: dict[str, int]
    titles: list[str]
    users: list[str]  # users with a test target
    sequences: list[np.ndarray]  # per user in `users`: item indices, oldest first
    train_only: list[np.ndarray]  # sequences of users too short to evaluate (all training)
    resolution_us: int = 1  # the events' clock resolution before `loo_data` broke the ties (1: exact)

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


def clock_resolution_us(events: pl.DataFrame) -> int:
    """The coarsest of `RESOLUTIONS_US` that divides every event timestamp (1 day for the Amazon sets)."""
    t = events["ts"].dt.epoch("us")
    for r in RESOLUTIONS_US:
        if t.is_empty() or bool(((t % r) == 0).all()):
            return r
    return 1


def break_ties(events: pl.DataFrame, resolution_us: int) -> pl.DataFrame:
    """Each user's events of one tick, in (seq_pos, file) order, get +0, +1, +2 ... µs; rows keep their order.

    Raises if a user has `resolution_us` or more events in one tick (they would spill into the next)."""
    if resolution_us <= 1:
        return events
    order = ["user_id", "ts", "seq_pos", "_row"] if "seq_pos" in events.columns else ["user_id", "ts", "_row"]
    ranked = (
        events.with_row_index("_row")
        .sort(order, nulls_last=True)
        .with_columns(pl.int_range(pl.len()).over("user_id", "ts").alias("_tie"))
        .sort("_row")
    )
    if ranked.height and int(ranked["_tie"].max()) >= resolution_us:
        raise ValueError(f"a user has more than {resolution_us} events in one tick of {resolution_us} µs; cannot order them")
    return ranked.with_columns((pl.col("ts") + pl.duration(microseconds=pl.col("_tie"))).alias("ts")).drop("_row", "_tie")


def loo_data(ds: Dataset) -> tuple[Dataset, LooSplit]:
    """The dataset with each user's same-tick events ordered 1 µs apart (see the module doc) and its split,
    which records the original resolution for `offline_features(resolution_us=split.resolution_us)`."""
    resolution = clock_resolution_us(ds.events)
    seq = Dataset(items=ds.items, events=break_ties(ds.events, resolution), report=ds.report)
    split = loo_split(seq)
    split.resolution_us = resolution
    return seq, split
