"""Online features: incremental state in an `OnlineStore`, read at request time.

    online = OnlineFeatures(store, items)          # items: the catalog (price, category, brand)
    online.apply(events)                           # any time; events of any chunk size
    x = online.features(user_id, item_ids, t)      # (len(item_ids), len(FEATURES)), FEATURES order

`features` reads the store once per entity kind (user, items, user x item pairs, co-occurrence of the
user's recent items), builds the base aggregates as numpy arrays and runs the same `derive` as
`offline_features`; for events applied in time order it returns the offline values at any
t >= the latest applied event (see `featurizer.online.state` for what late events do).

Reads of user, item and co-occurrence states go through `featurizer.online.state_cache`: with the
in-process store, decoded states (and item window counts) are kept until the store reports them
changed, so a request decodes only what changed since; with Redis every read decodes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timezone

import numpy as np
import polars as pl

from featurizer.definitions import (
    EVENT_CODE,
    ITEM_COUNT_NAMES,
    NAMES,
    NUMPY,
    FeatureParams,
    cooc_cosine,
    derive,
    derive_rest,
)
from featurizer.errors import SemrankError
from featurizer.online.catalog import Catalog
from featurizer.online.item_index import ItemIndex
from featurizer.online.state import (
    NO_TS,
    ItemState,
    UserItemState,
    item_base,
    item_base_from_parts,
    item_first_age,
    user_item_base_from_records,
    user_item_key,
    user_item_keys,
    user_item_records,
)
from featurizer.online.state_cache import DecodedCache, ItemPartsCache, UserItemIndex
from featurizer.online.user_sequence import UserSequence
from featurizer.online.user_state import CoocState, UserState, cooc_counts
from featurizer.store.base import Expect, OnlineStore, OnlineStoreError, Value

META_KEY = "state"
ITEM_COUNT_COLUMNS = np.array([NAMES.index(name) for name in ITEM_COUNT_NAMES])
REST_COLUMNS = tuple((k, name) for k, name in enumerate(NAMES) if name not in ITEM_COUNT_NAMES)


class StaleQueryError(SemrankError, ValueError):
    """features() was asked about an instant before events already applied."""

    grpc_code = "FAILED_PRECONDITION"
    reason = "STALE_FEATURE_QUERY"


class StateMismatchError(SemrankError, ValueError):
    """The store holds online state built with other feature definitions."""

    grpc_code = "FAILED_PRECONDITION"
    reason = "ONLINE_STATE_MISMATCH"


def to_us(t: datetime) -> int:
    """µs since the epoch; a naive datetime is taken as UTC."""
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    delta = t - datetime(1970, 1, 1, tzinfo=timezone.utc)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


class OnlineFeatures:
    def __init__(self, store: OnlineStore, items: pl.DataFrame, params: FeatureParams = FeatureParams(),
                 max_items: int = 500_000):
        """`max_items` bounds the ids the per-item arrays hold (`ItemIndex`); past it they start over."""
        self.store, self.params = store, params
        self._fingerprint = params.fingerprint()
        self._index = ItemIndex(max_items)  # item id -> row of every per-item array below
        self._catalog = Catalog(items, self._index)
        meta = store.read("meta", [META_KEY])[0]
        if meta is not None and meta.get("fingerprint") != params.fingerprint():
            raise StateMismatchError(
                "the online store holds state built with other feature definitions "
                f"({meta.get('fingerprint')} != {params.fingerprint()}); use a new namespace/path or rebuild it"
            )
        held = None if meta is None else meta.get("sequence_items")
        if held is not None and held != params.sequence_items:  # set when a state is made: the state's holds
            self.params = params = replace(params, sequence_items=held)
        # A store written before semrank kept sequences (no "sequence_items") holds partial ones: a
        # bundle with a sequence model is refused on it (serving.ranking.engine.serving_inputs).
        self.sequence_complete = meta is None or held is not None
        self._watermark = NO_TS if meta is None else int(meta["watermark"])
        self._watermark_dt: tuple[int, datetime | None] = (NO_TS, None)
        self._users = DecodedCache(store, "user", UserState.from_dict)
        self._cooc = DecodedCache(store, "cooc", CoocState.from_dict)
        self._item_parts = ItemPartsCache(store, self._index)
        self._user_items = UserItemIndex(store)
        self._history_memo: tuple = (None, None, [])  # (user state, t, its whole history at t)

    def upsert_items(self, items: pl.DataFrame) -> None:
        """Add items to the catalog, or update the price/category/brand of known ones (a null
        field leaves the known value unchanged).

        Only reads made after the call see them; events already applied keep the category and
        brand their item had then (as the offline pipeline, which joins the catalog as given)."""
        self._catalog = self._catalog.upsert(items)

    def rebind(self, store: OnlineStore) -> None:
        """Read and write `store` from now on, keeping every cache: for a store that adopted the one
        these features were built over, with its record of changes (`InProcessStore.adopt`)."""
        self.store = store
        for cache in (self._users, self._cooc, self._item_parts, self._user_items):
            cache.store = store

    def warm(self) -> None:
        """Do what the first read would (index every user x item key), so that no request pays it."""
        self._user_items.warm()

    def store_lost_state(self) -> bool:
        """True when this process applied events but the store no longer holds their state (its meta
        row is gone: a flush, an empty replica after failover). Raises OnlineStoreError when the store
        cannot be read (so it is also a readiness probe of the store: it always reads)."""
        meta = self.store.read("meta", [META_KEY])[0]
        return self._watermark != NO_TS and meta is None

    @property
    def watermark(self) -> datetime | None:
        """The latest applied event's instant (None before any)."""
        if self._watermark_dt[0] != self._watermark:
            dt = None if self._watermark == NO_TS else (
                datetime(1970, 1, 1, tzinfo=timezone.utc) + np.timedelta64(self._watermark, "us").item())
            self._watermark_dt = (self._watermark, dt)
        return self._watermark_dt[1]

    # ------------------------------------------------------------ writes

    def apply(self, events: pl.DataFrame, meta: Mapping[str, Value] | None = None, expect: Expect | None = None) -> None:
        """Fold events (the contract's ts, user_id, item_id, event) into the state.

        Sorted by ts here (stably). Events older than ones applied earlier are still counted;
        exact parity with offline holds when calls come in time order (see featurizer.online.state).
        Every state the events change, and the `meta` rows given (e.g. how far a durable event log
        is applied), are committed in one atomic `write_batch`: a crash leaves all or none of them.
        `expect` fences the commit (`OnlineStore.write_batch`): on WriteConflict nothing changed.
        """
        ev = events.select(
            pl.col("ts").dt.epoch("us").alias("t"), pl.col("user_id").cast(pl.Utf8), pl.col("item_id").cast(pl.Utf8),
            pl.col("event").cast(pl.Utf8).replace_strict(EVENT_CODE, return_dtype=pl.Int8).alias("code"),
        )
        self.apply_columns(*(ev[c].to_list() for c in ("t", "user_id", "item_id", "code")), meta=meta, expect=expect)

    def apply_columns(self, ts: Sequence[int], users: Sequence[str], items: Sequence[str], codes: Sequence[int],
                      meta: Mapping[str, Value] | None = None, expect: Expect | None = None) -> None:
        """`apply` over plain columns, one entry per event: µs since the epoch (UTC), user id, item
        id, and event code (`featurizer.definitions.EVENT_CODE`). The event log's fold calls it
        directly: a few events per call, where building a DataFrame cost more than the fold."""
        if not len(ts):
            if meta:
                self.store.write_batch({"meta": meta}, expect=expect)
            return
        order = sorted(range(len(ts)), key=ts.__getitem__)  # stable: ties keep their order
        ts, users, items, codes = ([col[k] for k in order] for col in (ts, users, items, codes))
        item_ids = list(dict.fromkeys(items))
        user_ids = list(dict.fromkeys(users))
        ui_keys = list(dict.fromkeys(user_item_key(u, i) for u, i in zip(users, items)))
        item_st = {k: ItemState() if v is None else ItemState.from_bytes(v) for k, v in zip(item_ids, self.store.read("item", item_ids))}
        ui_st = {k: UserItemState() if v is None else UserItemState.from_bytes(v) for k, v in zip(ui_keys, self.store.read("ui", ui_keys))}
        # User and co-occurrence states (JSON, kilobytes each) come decoded from the read caches and are
        # changed in place: kept decoded after the commit, dropped if anything fails before it lands.
        self._history_memo = (None, None, [])  # it may hold a user state changed below
        user_st = self._users.for_update(user_ids, UserState)
        cooc_st: dict[str, CoocState] = {}
        try:
            self._fold(ts, users, items, codes, item_st, user_st, ui_st, cooc_st, meta, expect)
        except BaseException:
            self._users.discard(user_st)
            self._cooc.discard(cooc_st)
            raise
        self._users.written(user_st)
        self._cooc.written(cooc_st)
        try:
            self._item_parts.written(list(item_st), self._watermark)
        except OnlineStoreError:  # the commit landed; the reads refresh these rows instead
            pass

    def _fold(self, ts, users, items, codes, item_st: dict, user_st: dict, ui_st: dict, cooc_st: dict,
              meta: Mapping[str, Value] | None, expect: Expect | None) -> None:
        """Count the events (sorted) into the states read for them, read the co-occurrence states
        their first touches pair (into `cooc_st`), and commit everything in one write."""
        n_hist, window = self.params.history_items, self.params.cooc_window_us
        cat, brand, lp = self._catalog.category, self._catalog.brand, self._catalog.log_price
        pairs: list[tuple[str, str, int]] = []
        seq_events: list[tuple[str, int, str, bool]] = []  # the first and the late engagements
        sequences = self.params.sequence_items > 0
        for t, u, i, code in zip(ts, users, items, codes):
            ui = ui_st[user_item_key(u, i)]
            first_touch = code > 0 and ui.eng[0] == NO_TS
            if sequences and code > 0 and (first_touch or t < user_st[u].eng[0]):
                seq_events.append((u, t, i, first_touch))
            ui.add(t, code)
            item_st[i].add(t, code, first_touch)
            new = user_st[u].add(t, code, i, cat.get(i), brand.get(i), lp.get(i), first_touch, n_hist, window)
            if new:
                pairs.extend(new)

        cooc_ids = list(dict.fromkeys(x for a, b, _ in pairs for x in (a, b)))
        cooc_st.update(self._cooc.for_update(cooc_ids, CoocState))
        for a, b, at in pairs:
            cooc_st[a].add(b, at)
            cooc_st[b].add(a, at)

        seqs = self._sequences_after(seq_events)
        watermark = max(self._watermark, max(ts))
        seq_meta = {"sequence_items": self.params.sequence_items} if self.sequence_complete else {}
        self.store.write_batch({
            "seq": seqs,
            "item": {k: s.to_bytes() for k, s in item_st.items()},
            "ui": {k: s.to_bytes() for k, s in ui_st.items()},
            # Encoded now (a couple of KB, but dozens of small lists: copies held until the snapshot made
            # the collector run 5x as often); co-occurrence states are handed over as Owned copies (large
            # dicts of ints, one tracked object each), encoded once per snapshot.
            "user": {k: s.to_dict() for k, s in user_st.items()},
            "cooc": {k: s.to_owned() for k, s in cooc_st.items()},
            "meta": {**(meta or {}), META_KEY: {"watermark": watermark, "fingerprint": self._fingerprint, **seq_meta}},
        }, expect=expect)
        self._watermark = watermark

    def _sequences_after(self, seq_events: list[tuple[str, int, str, bool]]) -> dict[str, dict]:
        """The changed "seq" rows of the users of `seq_events` (`featurizer.online.user_sequence`)."""
        if not seq_events:
            return {}
        keep = self.params.sequence_items
        users = list(dict.fromkeys(e[0] for e in seq_events))
        held = {u: UserSequence() if v is None else UserSequence.from_dict(v)
                for u, v in zip(users, self.store.read("seq", users))}
        changed = {u for u, t, i, first in seq_events if held[u].add(t, i, first, keep)}
        return {u: held[u].to_dict() for u in changed}

    # ------------------------------------------------------------ reads

    def sequence(self, user_id: str, t: datetime) -> list[str]:
        """The user's distinct engaged items by first engagement before t, oldest first: the last
        `params.sequence_items` of the sequence `training.data.loo` gives a sequence model."""
        held = self.store.read("seq", [user_id])[0]
        return [] if held is None else UserSequence.from_dict(held).before(to_us(t), self.params.sequence_items)

    def history(self, user_id: str, t: datetime, n: int) -> list[str]:
        """The user's last n (<= params.history_items) distinct engaged items before t, most recent
        first, ties by item id: the same as `offline.user_recent_items`."""
        if n > self.params.history_items:
            raise ValueError(f"history of {n} items asked; the online state keeps {self.params.history_items}")
        user = self._users.get([user_id])[0]
        return [] if user is None else self._history(user, to_us(t))[:n]

    def features(self, user_id: str, item_ids: Sequence[str], t: datetime, interest_score: np.ndarray | None = None,
                 inline: Mapping[str, Sequence] | None = None) -> np.ndarray:
        """(len(item_ids), len(FEATURES)) float64 in FEATURES order, from events strictly before t.

        `interest_score` (one per candidate) fills the text column; NaN without it. `inline`: item data
        the request carried, one entry per candidate ("price": float, NaN for none; "category",
        "brand": str or None), used for candidates the catalog does not hold (as the API promises:
        inline data is for items the service has not seen).
        Raises StaleQueryError when t is before the latest applied event.
        """
        t_us = to_us(t)
        if t_us < self._watermark:
            raise StaleQueryError(
                f"t={t.isoformat()} is before the latest applied event ({self.watermark.isoformat()}); "
                "online features are defined for t >= it (pass max(now, watermark))"
            )
        with np.errstate(divide="ignore", invalid="ignore"):
            return self._features(user_id, list(item_ids), t_us, interest_score, inline)

    def _history(self, user: UserState, t_us: int) -> list[str]:
        """user.history(t_us), remembered for the next call (a request asks twice: for its text
        and for co-occurrence)."""
        memo = self._history_memo
        if memo[0] is not user or memo[1] != t_us:
            memo = self._history_memo = (user, t_us, user.history(t_us, None))
        return memo[2]

    def _user_item_base(self, user_id: str, item_ids: list[str], rows: np.ndarray, t_us: int) -> dict:
        """`user_item_base_from_records` of the stored user x item state of each item (`rows`: their
        rows of the index, from this read's `rows` call): from the user's packed states when the store
        can say what changed (`UserItemIndex.base`), else read item by item."""
        base = self._user_items.base(user_id, self._index, rows, t_us)
        if base is None:
            return user_item_base_from_records(user_item_records(self.store.read("ui", user_item_keys(user_id, item_ids))), t_us)
        return base

    def _features(self, user_id: str, item_ids: list[str], t_us: int, interest_score: np.ndarray | None,
                  inline: Mapping[str, Sequence] | None = None) -> np.ndarray:
        n = len(item_ids)
        user = self._users.get([user_id])[0]  # shared with other reads: never mutated here
        if user is None:
            user = UserState()
        hist = self._history(user, t_us)[: self.params.history_items]

        all_rows = self._index.rows(item_ids + hist)  # the one pass over the ids; the rest is numpy
        rows = all_rows[:n]
        # The item-count features come per item from the cache (computed when the item changed), for a t
        # after every item's latest instant (always, when serving: t > the watermark); else derived here.
        kept = self._item_parts.gather_counts(all_rows, t_us)
        if kept is not None and not (kept["last"] == t_us).any():
            item_counts = kept["counts"][:n]
            users = kept["users"]
            b = {"item_first_age_us": item_first_age(kept["first"][:n], t_us)}
        else:
            parts = None if kept is None else self._item_parts.gather(all_rows, t_us)
            items = item_base(self.store.read("item", item_ids + hist), t_us) if parts is None else item_base_from_parts(parts, t_us)
            item_counts = None
            users = items["item_n_users_all"]
            b = {name: col[:n] for name, col in items.items()}
        ui = self._user_item_base(user_id, item_ids, rows, t_us)

        cos_max, cos_sum = np.zeros(n), np.zeros(n)
        states = [(k, s) for k, s in enumerate(self._cooc.get(hist)) if s is not None]
        if states:
            counts = cooc_counts([s for _, s in states], self._index, rows, t_us)  # (recent items, candidates)
            n_h = users[[n + k for k, _ in states]][:, None]
            cos = cooc_cosine(counts, users[:n], n_h, NUMPY)  # elementwise, as one recent item at a time
            # Summed in history order, as offline sums them: a reduction over axis 0 of a C-ordered
            # array adds row after row (numpy sums pairwise only along the contiguous axis).
            cos_max = np.maximum.reduce(cos, axis=0, initial=0.0)
            cos_sum = cos.sum(axis=0)

        # The user's aggregates and the instant are one value for every candidate: scalars, which
        # derive's arithmetic broadcasts (and the matrix below), not arrays of n copies.
        b.update(ui)
        b.update(user.base(t_us))
        catalog = self._catalog
        rows = catalog.rows(rows)
        unknown = np.flatnonzero(rows == catalog.unknown) if inline else np.zeros(0, dtype=np.int64)
        for name, kind, names, codes in (("user_cat_n", "category", catalog.category_names, catalog.category_code),
                                         ("user_brand_n", "brand", catalog.brand_names, catalog.brand_code)):
            per_code = np.zeros(len(names) + 1)  # the user's engagements per category (brand); last: none
            per_code[-1] = np.nan
            for g in user.groups(kind):
                if g in names:
                    per_code[names[g]] = user.group_count(t_us, kind, g)
            item_codes = codes[rows]
            if unknown.size and inline.get(kind) is not None:  # an unseen item's inline category (brand)
                given = inline[kind]
                item_codes[unknown] = [names.get(given[k], len(names)) if given[k] else len(names) for k in unknown]
            b[name] = per_code[item_codes]
        b["item_price"] = catalog.price[rows]
        if unknown.size and inline.get("price") is not None:  # an unseen item's inline price
            b["item_price"][unknown] = np.asarray(inline["price"], dtype=np.float64)[unknown]
        b["cooc_max"], b["cooc_sum"] = cos_max, cos_sum
        b["t_us"] = t_us
        if interest_score is None:
            b["interest_score"] = np.nan
        else:
            b["interest_score"] = np.asarray(interest_score, dtype=np.float64).reshape(n)
        out = np.empty((n, len(NAMES)), dtype=np.float64)
        if item_counts is None:
            cols = derive(b, NUMPY)
            for k, name in enumerate(NAMES):
                out[:, k] = cols[name]
        else:
            out[:, ITEM_COUNT_COLUMNS] = item_counts
            cols = derive_rest(b, NUMPY)
            for k, name in REST_COLUMNS:
                out[:, k] = cols[name]
        return out
