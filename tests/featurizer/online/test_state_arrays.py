"""The per-request readers of online state against their reference forms: `window_counts_one` (one
ring, plain Python slices) against `window_counts` (numpy over many rings), and `user_item_block`
(packed records read as int64 words) against the states it packs, decoded and read one at a time;
the fold's struct codecs of item and user x item states against the numpy records they must equal
byte for byte (`ITEM_DTYPE`, `UI_DTYPE`: what snapshots hold and the readers decode)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from featurizer.definitions import WINDOWS
from featurizer.online.state import (
    ITEM_DTYPE,
    N_EVENTS,
    NO_TS,
    UI_BASE_NAMES,
    UI_DTYPE,
    ItemState,
    UserItemState,
    instant_before,
    user_item_block,
    user_item_records,
    window_counts,
    window_counts_one,
)

DAY = WINDOWS["7d"].tile_us


@settings(max_examples=300, deadline=None)
@given(
    window=st.sampled_from(sorted(WINDOWS)),
    size=st.integers(1, 40),
    last_tile=st.integers(-3, 400),
    ahead=st.integers(0, 20_000),  # t past last, in the window's tiles / 100
    never=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_one_ring_by_slices_equals_the_vectorised_counts(window, size, last_tile, ahead, never, seed):
    tile = WINDOWS[window].tile_us
    ring = np.random.default_rng(seed).integers(0, 9, size * N_EVENTS)
    last = NO_TS if never else last_tile * tile + seed % tile
    t = (0 if never else last) + ahead * tile // 100 + 1
    want = window_counts(ring.reshape(1, size, N_EVENTS).astype(np.int32), np.array([last]), t, tile, window)[0]
    assert window_counts_one(ring.tolist(), last, t, tile, window) == want.tolist()


def _events(draw_codes: list[int], draw_ts: list[int]) -> UserItemState:
    s = UserItemState()
    for ts, code in sorted(zip(draw_ts, draw_codes)):
        s.add(ts, code)
    return s


@settings(max_examples=200, deadline=None)
@given(
    states=st.lists(
        st.lists(st.tuples(st.integers(0, 50), st.integers(0, N_EVENTS - 1)), max_size=12), min_size=1, max_size=8),
    never=st.lists(st.booleans(), min_size=8, max_size=8),
    t_after=st.integers(0, 5),
)
def test_user_item_block_equals_each_state_read_alone(states, never, t_after):
    built = [None if never[k] else _events([c for _, c in ev], [ts * 1000 for ts, _ in ev]) for k, ev in enumerate(states)]
    last = max([s.last for s in built if s is not None and s.last != NO_TS] or [0])
    t = last + t_after  # t_after 0: a read at exactly the latest instant leaves its events out
    block = user_item_block(user_item_records([None if s is None else s.to_bytes() for s in built]), t)
    assert block.shape == (len(UI_BASE_NAMES), len(built))
    for k, s in enumerate(built):
        s = s or UserItemState()
        at = s.last == t
        want = [s.tot[e] - (s.delta[e] if at else 0) for e in range(N_EVENTS)]
        for pair in (s.imp, s.eng):
            before = instant_before(pair[0], pair[1], t)
            want.append(np.nan if before == NO_TS else float(t - before))
        np.testing.assert_array_equal(block[:, k], want)


_EVENTS = st.lists(st.tuples(st.integers(0, 40 * DAY), st.integers(0, N_EVENTS - 1), st.booleans()), max_size=40)


def _ui_record(s: UserItemState) -> bytes:
    rec = np.zeros((), dtype=UI_DTYPE)
    rec["last"], rec["tot"], rec["delta"], rec["imp"], rec["eng"] = s.last, s.tot, s.delta, s.imp, s.eng
    return rec.tobytes()


@settings(max_examples=300, deadline=None)
@given(events=_EVENTS, start=st.integers(0, 2**52))
def test_state_codecs_write_the_numpy_records_and_read_them_back(events, start):
    item, ui = ItemState(), UserItemState()
    for ts, code, first in sorted(events):
        item.add(start + ts, code, first)
        ui.add(start + ts, code)
    blob = item.to_bytes()
    assert blob == item._record().tobytes() and len(blob) == ITEM_DTYPE.itemsize
    back = ItemState.from_bytes(blob)
    assert (back.last, back.first, back.tot, back.delta, back.users, back.d_users, back.rings) == (
        item.last, item.first, item.tot, item.delta, item.users, item.d_users, item.rings)
    back.add(start + 41 * DAY, 1, True)  # what it decodes is the fold's to change: lists, not tuples
    item.add(start + 41 * DAY, 1, True)
    assert back.to_bytes() == item.to_bytes()
    blob = ui.to_bytes()
    assert blob == _ui_record(ui)
    back = UserItemState.from_bytes(blob)
    assert (back.last, back.tot, back.delta, back.imp, back.eng) == (ui.last, ui.tot, ui.delta, ui.imp, ui.eng)
    back.add(start + 41 * DAY, 0)
    ui.add(start + 41 * DAY, 0)
    assert back.to_bytes() == ui.to_bytes()


def test_a_tile_count_past_int32_is_written_as_numpy_casts_it():
    item = ItemState()
    item.add(10**15, 1, True)
    ring = next(iter(item.rings.values()))
    ring[ring.index(1)] = 2**31 + 5  # (never seen: a struct would refuse it, the record wraps it)
    assert item.to_bytes() == item._record().tobytes()
