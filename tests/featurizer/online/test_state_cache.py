"""Caches of decoded online state: a read through them equals decoding the store's current values,
whatever was written in between (by this reader's apply, another reader's, or a delete)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from featurizer.contracts.schema import EVENT_TYPES
from featurizer.definitions import NAMES, FeatureParams
from featurizer.online.features import OnlineFeatures, to_us
from featurizer.online.state import WINDOW_KEY_US, user_item_key
from featurizer.online.item_index import ItemIndex
from featurizer.online.state_cache import DecodedCache
from featurizer.online.user_state import CoocState, UserState, cooc_counts
from featurizer.store.base import OnlineStore, WriteConflict
from featurizer.store.in_process import InProcessStore
from tests.featurizer.test_feature_definitions import (
    CANDIDATES,
    ITEMS,
    USERS,
    D,
    H,
    at,
    event_rows,
    make_events,
)

PARAMS = FeatureParams(history_items=2, cooc_window_s=2 * 24 * 3600)
# Events a few minutes apart: reads between applies then often fall in the tile of a cached read.
dense_rows = st.lists(
    st.tuples(st.integers(0, 20), st.sampled_from(USERS), st.sampled_from(CANDIDATES), st.sampled_from(EVENT_TYPES)),
    max_size=30,
)


class Unversioned(OnlineStore):
    """The same data, seen through a store that cannot say what changed (as Redis): no caching."""

    def __init__(self, inner: InProcessStore):
        self.inner = inner

    def write_batch(self, rows, expect=None):
        self.inner.write_batch(rows, expect)

    def read(self, entity, keys):
        return self.inner.read(entity, keys)

    def delete(self, entity, keys):
        self.inner.delete(entity, keys)

    def close(self):
        pass


def reference(store: InProcessStore) -> OnlineFeatures:
    return OnlineFeatures(Unversioned(store), ITEMS, PARAMS)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.one_of(dense_rows, event_rows), cuts=st.lists(st.integers(1, 25), min_size=1, max_size=4),
       later=st.lists(st.sampled_from([0, 1, 2, 4, 5, 6, H, H + 5, D, 7 * D + 3, 31 * D]), min_size=1, max_size=4))
def test_interleaved_applies_and_reads_equal_uncached_reads(rows, cuts, later):
    ev = make_events(sorted(rows, key=lambda r: r[0]))
    bounds = [0, *sorted(min(c, ev.height) for c in cuts), ev.height]
    store = InProcessStore()
    online = OnlineFeatures(store, ITEMS, PARAMS)
    other = OnlineFeatures(store, ITEMS, PARAMS)  # reads what `online` writes (a foreign writer to its caches)
    for a, b in zip(bounds, bounds[1:]):
        online.apply(ev.slice(a, b - a))
        mark = online.watermark or at(0)
        ref = reference(store)
        for minutes in later:  # at the latest event (its delta is left out), within its tile, in later tiles
            t = at((mark - at(0)).total_seconds() / 60 + minutes)
            for u in [*USERS, "new-user"]:
                want = ref.features(u, CANDIDATES + ["i0"], t)
                for reader in (online, other, online):  # twice: the second read is served from the caches
                    np.testing.assert_array_equal(reader.features(u, CANDIDATES + ["i0"], t), want)
                    assert reader.history(u, t, 2) == ref.history(u, t, 2)


def test_events_applied_after_a_read_are_seen_by_the_next_read_in_the_same_tile():
    ev = make_events([(0, "u0", "i0", "click"), (1, "u1", "i0", "click"), (1, "u0", "i1", "click"), (2, "u1", "i1", "click")])
    store = InProcessStore()
    online = OnlineFeatures(store, ITEMS, PARAMS)
    online.apply(ev.slice(0, 1))
    online.features("u0", CANDIDATES, at(1))  # cached for the tile of minutes 0-4
    online.apply(ev.slice(1, 3))
    np.testing.assert_array_equal(online.features("u0", CANDIDATES, at(2)), reference(store).features("u0", CANDIDATES, at(2)))
    online.apply(ev.slice(3, 1))  # i1's co-occurrence with i0 and u1's history change
    np.testing.assert_array_equal(online.features("u1", CANDIDATES, at(3)), reference(store).features("u1", CANDIDATES, at(3)))


def test_deleted_and_rewritten_states_are_read_fresh():
    ev = make_events([(0, "u0", "i0", "click"), (1, "u0", "i1", "click"), (2, "u1", "i0", "purchase")])
    store = InProcessStore()
    online = OnlineFeatures(store, ITEMS, PARAMS)
    online.apply(ev)
    t = at(10)
    before = online.features("u0", CANDIDATES, t)
    store.delete("item", ["i0"])
    store.delete("user", ["u0"])
    store.delete("ui", [user_item_key("u0", "i1")])
    after = online.features("u0", CANDIDATES, t)
    np.testing.assert_array_equal(after, reference(store).features("u0", CANDIDATES, t))
    assert not np.array_equal(before, after, equal_nan=True)
    assert online.history("u0", t, 2) == []


def test_user_item_states_follow_items_the_index_learns_later_and_writes_of_the_user():
    """u0 saw i4, which is not in the catalog (an impression: not in u0's history either): the first
    read packs u0's states without it, as the index does not hold i4 yet; once a read asks for i4
    the index holds it, and u0's impression of i4 must be there. A later event of u0 on i1 must
    show in the next read."""
    ev = make_events([(0, "u0", "i4", "impression"), (1, "u0", "i1", "click"), (2, "u1", "i1", "click")])
    store = InProcessStore()
    online = OnlineFeatures(store, ITEMS, PARAMS)
    online.apply(ev)
    seen, engaged = NAMES.index("user_item_impressions_all"), NAMES.index("user_item_engagements_all")
    for items in (["i1", "i2"], ["i4", "i1", "i4"], CANDIDATES):
        got = online.features("u0", items, at(9))
        np.testing.assert_array_equal(got, reference(store).features("u0", items, at(9)))
    assert got[-1, seen] == 1 and got[CANDIDATES.index("i1"), engaged] == 1
    online.apply(make_events([(10, "u0", "i1", "click")]))
    got = online.features("u0", CANDIDATES, at(11))
    np.testing.assert_array_equal(got, reference(store).features("u0", CANDIDATES, at(11)))
    assert got[CANDIDATES.index("i1"), engaged] == 2


def test_a_write_does_not_revive_packed_states_the_index_outgrew():
    """u0's states are packed while the index lacks i4 (u0 saw it); then another user's read adds i4 to
    the index, and u0 writes on an item the index does not hold either. The patch must not take the
    packed states, which lack i4, for current."""
    ev = make_events([(0, "u0", "i4", "impression"), (1, "u0", "i1", "click")])
    store = InProcessStore()
    online = OnlineFeatures(store, ITEMS, PARAMS)
    online.apply(ev)
    seen = NAMES.index("user_item_impressions_all")
    online.features("u0", ["i1", "i2"], at(9))  # packed without i4
    online.features("u1", ["i4"], at(9))  # the index learns i4
    online.apply(make_events([(10, "u0", "zz", "impression")]))  # zz: in no index either
    got = online.features("u0", ["i4", "i1"], at(11))
    np.testing.assert_array_equal(got, reference(store).features("u0", ["i4", "i1"], at(11)))
    assert got[0, seen] == 1


def test_packed_user_item_states_are_bounded():
    ev = make_events([(k, u, i, "click") for k, (u, i) in enumerate((u, i) for u in USERS for i in CANDIDATES)])
    store = InProcessStore()
    online = OnlineFeatures(store, ITEMS, PARAMS)
    online.apply(ev)
    online._user_items.max_records = len(CANDIDATES) + 1  # room for one user's states
    for u in USERS:
        np.testing.assert_array_equal(online.features(u, CANDIDATES, at(99)), reference(store).features(u, CANDIDATES, at(99)))
        assert online._user_items._held <= online._user_items.max_records
    assert list(online._user_items._records) == [USERS[-1]]


def test_item_window_counts_follow_the_tile_of_t():
    ev = make_events([(0, "u0", "i0", "click"), (3, "u1", "i0", "click")])
    store = InProcessStore()
    online = OnlineFeatures(store, ITEMS, PARAMS)
    online.apply(ev)
    assert WINDOW_KEY_US == 5 * 60 * 1_000_000
    col = list(online.features("u0", ["i0"], at(3))[0])  # warm the caches at the latest event
    for minutes in (3, 4, 59, 60, 61, 64, 65, 66, 24 * 60 + 1, 24 * 60 + 6):
        t = at(minutes)
        assert to_us(t) // WINDOW_KEY_US >= 0
        np.testing.assert_array_equal(online.features("u0", ["i0"], t), reference(store).features("u0", ["i0"], t))
    assert col  # (the first read exercised the delta at the latest instant)


def test_item_cache_past_its_size_starts_over_and_stays_exact():
    ev = make_events([(0, "u0", "i0", "click"), (1, "u1", "i2", "click"), (2, "u0", "i4", "purchase")])
    store = InProcessStore()
    online = OnlineFeatures(store, ITEMS, PARAMS)
    online.apply(ev)
    online._index.max_items = 3  # the catalog's 4 ids are in it already: the next new id starts it over
    epochs = []
    for items in (["i0", "i1"], CANDIDATES, ["i4", "i0", "x", "y"], CANDIDATES, ["i3", "i3", "i4"]):
        np.testing.assert_array_equal(online.features("u0", items, at(9)), reference(store).features("u0", items, at(9)))
        epochs.append(online._index.epoch)
    assert epochs[-1] >= 2, epochs  # it did start over, more than once


def test_cooc_counts_follow_partners_the_index_learns_later():
    """i4 is not in the catalog: the first read's co-occurrence arrays of i0 cannot hold it; once a
    read asks for i4, the index holds it and the counts must include it."""
    ev = make_events([(0, "u1", "i0", "click"), (1, "u1", "i4", "click"), (2, "u1", "i1", "click"),
                      (3, "u0", "i0", "click"), (4, "u2", "i4", "purchase"), (5, "u2", "i0", "click")])
    store = InProcessStore()
    online = OnlineFeatures(store, ITEMS, PARAMS)
    online.apply(ev)
    for items in (["i1", "i2"], ["i4", "i1", "i4"], CANDIDATES, ["i0", "i4"]):
        for t in (at(5), at(9)):  # at the latest pair instant (its delta left out) and after it
            np.testing.assert_array_equal(online.features("u0", items, t), reference(store).features("u0", items, t))
    cooc = online.features("u0", ["i4", "i1"], at(9))[:, NAMES.index("cooc_cosine_max_recent")]
    assert (cooc > 0).all(), cooc  # u0's recent item i0 co-occurred with both


def test_store_lists_changed_keys_since_a_version():
    store = InProcessStore()
    assert store.changes("item", None) == (0, None)  # nothing known yet: everything may have changed
    store.write("item", {"a": b"1", "b": b"2"})
    v1, keys = store.changes("item", 0)
    assert (v1, keys) == (1, frozenset({"a", "b"}))
    store.write("item", {"c": b"3"})
    store.delete("item", ["a", "zz"])
    store.write("user", {"u": {"x": 1}})
    assert store.changes("item", v1) == (3, frozenset({"c", "a", "zz"}))
    assert store.changes("item", 3) == (3, frozenset())
    assert store.changes("item", 99)[1] is None  # a version this store never had


def test_store_change_log_is_bounded(monkeypatch):
    monkeypatch.setattr(InProcessStore, "_CHANGE_LOG", 3)  # writes
    monkeypatch.setattr(InProcessStore, "_CHANGE_KEYS", 2)  # keys of one write
    store = InProcessStore()
    store.changes("item", None)
    for k in range(5):
        store.write("item", {f"k{k}": b"x"})
    assert store.changes("item", 4) == (5, frozenset({"k4"}))
    assert store.changes("item", 2) == (5, frozenset({"k2", "k3", "k4"}))
    assert store.changes("item", 1)[1] is None  # older than the last 3 writes
    store.write("item", {"a": b"x", "b": b"y", "c": b"z"})  # too many keys to list
    assert store.changes("item", 5)[1] is None

    monkeypatch.setattr(InProcessStore, "_CHANGE_LOG", 100)
    monkeypatch.setattr(InProcessStore, "_CHANGE_LOG_KEYS", 4)  # keys of all logged writes
    store = InProcessStore()
    store.changes("item", None)
    store.write("item", {"a": b"x", "b": b"y"})
    store.write("item", {"c": b"x"})
    store.write("item", {"d": b"x", "e": b"y"})  # 5 keys logged: the first write is dropped
    assert store.changes("item", 1) == (3, frozenset({"c", "d", "e"}))
    assert store.changes("item", 0)[1] is None


def test_decoded_cache_is_bounded_and_decodes_only_what_changed():
    store = InProcessStore()
    store.write("user", {f"u{k}": UserState().to_dict() for k in range(5)})
    decoded = []

    def decode(raw):
        decoded.append(raw)
        return UserState.from_dict(raw)

    cache = DecodedCache(store, "user", decode, capacity=3)
    first = cache.get(["u0", "u1", "missing", "u0"])
    assert first[0] is first[3] and first[2] is None and len(decoded) == 2
    assert cache.get(["u1"])[0] is first[1] and len(decoded) == 2
    store.write("user", {"u1": UserState().to_dict()})
    assert cache.get(["u1"])[0] is not first[1] and len(decoded) == 3
    cache.get(["u2", "u3", "u4"])
    assert len(cache) == 3
    unversioned = DecodedCache(Unversioned(store), "user", UserState.from_dict)
    a, b = unversioned.get(["u0"])[0], unversioned.get(["u0"])[0]
    assert a is not b and len(unversioned) == 0


def test_cooc_arrays_are_rebuilt_when_the_index_starts_over():
    index = ItemIndex(max_items=4)
    s = CoocState()
    for other, at_us in (("a", 1), ("b", 2), ("b", 3), ("c", 3)):
        s.add(other, at_us)
    rows = index.rows(["b", "a", "b", "c"])  # every partner in the index: the arrays are complete
    np.testing.assert_array_equal(cooc_counts([s], index, rows, 9), [[2, 1, 2, 1]])
    np.testing.assert_array_equal(cooc_counts([s], index, rows, 3), [[1, 1, 1, 0]])  # the delta at 3 left out
    rows = index.rows(["c", "x", "y", "a"])  # past max_items: every id gets a new row, "b"'s is now "c"'s
    assert index.epoch == 1 and rows.tolist() == [0, 1, 2, 3]
    np.testing.assert_array_equal(cooc_counts([s], index, rows, 9), [[1, 0, 0, 1]])
    s.add("x", 10)  # a change drops the arrays
    np.testing.assert_array_equal(cooc_counts([s, CoocState()], index, rows, 11), [[1, 1, 0, 1], [0, 0, 0, 0]])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.one_of(dense_rows, event_rows), cuts=st.lists(st.integers(1, 25), min_size=1, max_size=5),
       writers=st.lists(st.integers(0, 1), min_size=6, max_size=6), refused=st.lists(st.booleans(), min_size=6, max_size=6))
def test_writers_that_keep_their_states_decoded_still_fold_and_read_what_the_store_holds(rows, cuts, writers, refused):
    """Two OnlineFeatures over one store take turns folding (each keeps the user and co-occurrence
    states it rewrites decoded), some folds are refused by their fence (nothing committed, their
    changed objects dropped), and reads between them by both: every fold counts from the store's
    state, not from a decoded copy another writer or a refused commit left behind."""
    ev = make_events(sorted(rows, key=lambda r: r[0]))
    bounds = [0, *sorted(min(c, ev.height) for c in cuts), ev.height]
    store, plain = InProcessStore(), InProcessStore()
    feats = [OnlineFeatures(store, ITEMS, PARAMS), OnlineFeatures(store, ITEMS, PARAMS)]
    uncached = OnlineFeatures(Unversioned(plain), ITEMS, PARAMS)  # the same folds, nothing kept decoded
    for k, (a, b) in enumerate(zip(bounds, bounds[1:])):
        part = ev.slice(a, b - a)
        writer = feats[writers[k % len(writers)]]
        if refused[k % len(refused)] and part.height:
            with pytest.raises(WriteConflict):
                writer.apply(part, expect=("meta", "fence", {"seq": -1}))
        writer.apply(part)
        uncached.apply(part)
        assert {e: t for e, t in store._data.items() if t} == {e: t for e, t in plain._data.items() if t}
        t = max((f.watermark for f in feats if f.watermark), default=at(0))
        for u in [*USERS, "new-user"]:
            want = uncached.features(u, CANDIDATES + ["i0"], t)
            for reader in (*feats, writer):
                np.testing.assert_array_equal(reader.features(u, CANDIDATES + ["i0"], t), want)
                assert reader.history(u, t, 2) == uncached.history(u, t, 2)


def test_a_fold_keeps_what_it_wrote_decoded_and_reads_decode_nothing_after_it():
    store = InProcessStore()
    online = OnlineFeatures(store, ITEMS, PARAMS)
    online.apply(make_events([(0, "u0", "i0", "click"), (1, "u0", "i1", "click")]))
    decoded = []
    for cache in (online._users, online._cooc):
        decode = cache.decode
        cache.decode = lambda raw, decode=decode: decoded.append(raw) or decode(raw)
    online.features("u0", CANDIDATES, at(5))
    online.apply(make_events([(6, "u0", "i2", "click")]))  # rewrites u0, and the co-occurrence of i2 with i1
    online.features("u0", CANDIDATES, at(9))
    assert decoded == [], "the fold and the read after it decoded states the fold had just written"
    store.write("user", {"u0": UserState().to_dict()})  # another writer: the kept state is dropped
    assert online.history("u0", at(9), 2) == [] and len(decoded) == 1


class RacedStore(InProcessStore):
    """Fault injection: right after a commit that writes user `u0`, another writer replaces it (as a
    thread could between the fold's commit and its bookkeeping)."""

    def write_batch(self, rows, expect=None):
        super().write_batch(rows, expect)
        if "u0" in rows.get("user", {}):
            super().write_batch({"user": {"u0": UserState().to_dict()}})


def test_a_fold_keeps_nothing_decoded_when_another_write_landed_after_its_commit():
    store = RacedStore()
    online = OnlineFeatures(store, ITEMS, PARAMS)
    online.apply(make_events([(0, "u0", "i0", "click"), (1, "u0", "i1", "click")]))
    assert online.history("u0", at(5), 2) == [] == reference(store).history("u0", at(5), 2)


@settings(max_examples=80, deadline=None)
@given(steps=st.lists(st.one_of(
    st.tuples(st.just("add"), st.sampled_from("abcdefg"), st.integers(0, 6)),
    st.tuples(st.just("read"), st.lists(st.sampled_from("abcdefgxyz"), min_size=1, max_size=6), st.integers(0, 8)),
), max_size=30), max_items=st.integers(3, 12))
def test_cooc_arrays_kept_across_changes_equal_arrays_built_afresh(steps, max_items):
    """A state read, changed (new partners, more counts, a newer instant) and read again gives the
    counts a state decoded from its JSON gives, while the index learns ids and starts over."""
    index = ItemIndex(max_items=max_items)
    kept = CoocState()
    for step in steps:
        if step[0] == "add":
            _, other, at_us = step
            kept.add(other, max(at_us, kept.last))  # pairs arrive in time order
            continue
        _, ids, t = step
        rows = index.rows(ids)
        fresh = CoocState.from_dict(kept.to_dict())
        t = max(t, kept.last)
        np.testing.assert_array_equal(cooc_counts([kept], index, rows, t), cooc_counts([fresh], index, rows, t))
