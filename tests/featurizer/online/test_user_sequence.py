"""The per-user sequence of the sequence model (`featurizer.online.user_sequence`, entity "seq"):
`OnlineFeatures.sequence` must give the sequence `training.data.loo` builds from the same events
(each item once, at its first engagement, by time, ties in file order), cut to its last
`sequence_items`, whatever the chunks and the order the events arrive in."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from featurizer.contracts.schema import read_dataset, validate_events, validate_items
from featurizer.definitions import FeatureParams
from featurizer.online.features import META_KEY, OnlineFeatures
from featurizer.online.user_sequence import UserSequence
from featurizer.store.in_process import InProcessStore
from training.data.loo import loo_split

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
ITEMS = validate_items(pl.DataFrame({"item_id": [f"i{k}" for k in range(8)], "title": list("abcdefgh")}))
US = 60_000_000  # a minute in µs


def make_events(rows) -> pl.DataFrame:
    """rows: (minute, user, item, event)"""
    return validate_events(pl.DataFrame(
        {"ts": [T0 + timedelta(minutes=m) for m, *_ in rows], "user_id": [r[1] for r in rows],
         "item_id": [r[2] for r in rows], "event": [r[3] for r in rows]},
        schema={"ts": pl.Datetime("us", "UTC"), "user_id": pl.Utf8, "item_id": pl.Utf8, "event": pl.Utf8}))


def loo_sequences(ev: pl.DataFrame, items: pl.DataFrame = ITEMS) -> dict[str, list[str]]:
    """Every user's whole sequence as the offline split builds it (short users included)."""
    from featurizer.contracts.schema import Dataset

    split = loo_split(Dataset(items=items, events=ev, report=None))
    ids = split.item_ids
    out = {u: [ids[k] for k in s] for u, s in zip(split.users, split.sequences)}
    # the users too short to evaluate: their training-only sequences, by user id (the split's order)
    engaged = ev.filter((pl.col("event") != "impression") & pl.col("item_id").is_in(items["item_id"].implode()))
    short = sorted(set(engaged["user_id"].to_list()) - set(out))
    assert len(short) == len(split.train_only)
    out.update((u, [ids[k] for k in s]) for u, s in zip(short, split.train_only))
    return out


def test_the_stored_value_round_trips_ids_and_instants():
    from featurizer.store.base import decode_value, encode_value

    seq = UserSequence([5, 7, 7, 2**62], ["a", "é☃", "", "x" * 300])
    back = UserSequence.from_dict(decode_value(encode_value(seq.to_dict())))
    assert (back.ts, back.items) == (seq.ts, seq.items)


def test_add_orders_by_first_engagement_keeps_the_last_n_and_the_latest_instant():
    s = UserSequence()
    for ts, item in [(1, "a"), (2, "b"), (3, "c"), (3, "d")]:
        assert s.add(ts, item, first=True, keep=2)
    # keep 2, plus every item at the latest instant (3): a read at 3 drops those and still has 2
    assert s.items == ["a", "b", "c", "d"] and s.before(3, 2) == ["a", "b"] and s.before(4, 2) == ["c", "d"]
    assert s.add(4, "e", first=True, keep=2) and s.items == ["c", "d", "e"] and s.before(4, 2) == ["c", "d"]


def test_a_late_engagement_moves_an_item_back_and_a_repeat_never_moves_it():
    s = UserSequence()
    for ts, item in [(10, "a"), (20, "b"), (30, "c")]:
        s.add(ts, item, first=True, keep=5)
    assert not s.add(40, "a", first=False, keep=5)  # a repeat: first engagement stays at 10
    assert s.add(5, "c", first=False, keep=5)  # a late one, earlier than c's kept instant
    assert s.items == ["c", "a", "b"] and s.ts == [5, 10, 20]
    assert not s.add(15, "z", first=False, keep=5)  # not first and not kept: engaged before what is kept


@pytest.mark.parametrize("keep", [1, 3, 50])
def test_online_sequence_equals_the_offline_split_on_the_synthetic_shop(small_shop, keep):
    ds = read_dataset(small_shop)
    ev = ds.events.sort("ts", maintain_order=True)
    cut = ev["ts"][ev.height * 2 // 3]
    online = OnlineFeatures(InProcessStore(), ds.items, FeatureParams(sequence_items=keep))
    for part in ev.filter(pl.col("ts") < cut).iter_slices(997):  # chunks of any size
        online.apply(part)
    before = loo_sequences(ev.filter(pl.col("ts") < cut), ds.items)
    assert len(before) > 100
    for u, seq in before.items():
        assert online.sequence(u, cut) == seq[-keep:], u
    online.apply(ev.filter(pl.col("ts") >= cut))
    end = ev["ts"].max() + timedelta(seconds=1)
    for u, seq in loo_sequences(ev, ds.items).items():
        assert online.sequence(u, end) == seq[-keep:], u
    assert online.sequence("nobody", end) == []


EVENTS = st.lists(st.tuples(st.sampled_from(["u0", "u1"]), st.sampled_from(ITEMS["item_id"].to_list()),
                            st.sampled_from(["impression", "click", "add_to_cart", "purchase"])), min_size=1, max_size=40)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=EVENTS, order=st.randoms(use_true_random=False), chunk=st.integers(1, 7), keep=st.integers(1, 6))
def test_chunks_in_time_order_and_late_events_within_what_is_kept_give_the_offline_sequence(rows, order, chunk, keep):
    """Events (one a minute) in chunks of any size in time order give the offline sequence's last
    `keep`; in shuffled chunks (late events: items placed, and moved back, by time) they do too
    while nothing was pruned (keep >= the 8 items). A late event older than what was pruned cannot
    bring the pruned item back, as for every other online state (featurizer.online.state). (Ties at
    one instant keep their arrival order, as the offline split keeps file order: the synthetic
    shop's test covers them.)"""
    ev = make_events([(m, *r) for m, r in enumerate(rows)])
    end = T0 + timedelta(minutes=len(rows))
    offline = loo_sequences(ev)
    shuffled = list(range(len(rows)))
    order.shuffle(shuffled)
    for arrival, n in ((list(range(len(rows))), keep), (shuffled, 8)):
        online = OnlineFeatures(InProcessStore(), ITEMS, FeatureParams(sequence_items=n))
        for a in range(0, len(rows), chunk):
            online.apply(ev[arrival[a:a + chunk]])
        for u, seq in offline.items():
            assert online.sequence(u, end) == seq[-n:], u


def test_reads_before_the_latest_instant_leave_its_items_out():
    online = OnlineFeatures(InProcessStore(), ITEMS, FeatureParams(sequence_items=2))
    online.apply(make_events([(0, "u0", "i0", "click"), (1, "u0", "i1", "click"), (2, "u0", "i2", "purchase"),
                              (2, "u0", "i3", "click"), (2, "u0", "i0", "click")]))
    at = lambda m: T0 + timedelta(minutes=m)  # noqa: E731
    assert online.sequence("u0", at(2)) == ["i0", "i1"] and online.sequence("u0", at(3)) == ["i2", "i3"][-2:]


def test_the_store_records_its_sequence_length_keeps_it_and_a_store_from_before_opens_partial():
    store = InProcessStore()
    online = OnlineFeatures(store, ITEMS, FeatureParams(sequence_items=3))
    assert online.sequence_complete
    online.apply(make_events([(0, "u0", "i0", "click")]))
    assert store.read("meta", [META_KEY])[0]["sequence_items"] == 3
    other = OnlineFeatures(store, ITEMS, FeatureParams(sequence_items=4))  # the value is the state's, once made
    assert other.params.sequence_items == 3 and other.sequence("u0", T0 + timedelta(minutes=1)) == ["i0"]
    # a store written before sequences were kept: its meta row has no "sequence_items"
    meta = store.read("meta", [META_KEY])[0]
    del meta["sequence_items"]
    store.write("meta", {META_KEY: meta})
    old = OnlineFeatures(store, ITEMS, FeatureParams(sequence_items=3))
    assert not old.sequence_complete
    old.apply(make_events([(1, "u1", "i1", "click")]))  # keeps adding, never claims it is complete
    assert "sequence_items" not in store.read("meta", [META_KEY])[0]
    assert old.sequence("u1", T0 + timedelta(minutes=2)) == ["i1"]


def test_a_user_sequence_costs_about_21_bytes_plus_the_id_per_item():
    from featurizer.store.base import encode_value

    s = UserSequence()
    for k in range(50):
        s.add(1_780_000_000_000_000 + k, f"item-{k:05d}", first=True, keep=50)
    assert 50 * (21 + 10) - 50 <= len(encode_value(s.to_dict())) <= 50 * (21 + 10) + 20
