"""The per-request readers of online state against their reference forms: `window_counts_one` (one
ring, plain Python slices) against `window_counts` (numpy over many rings), and `user_item_block`
(packed records read as int64 words) against the states it packs, decoded and read one at a time."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from featurizer.definitions import WINDOWS
from featurizer.online.state import (
    N_EVENTS,
    NO_TS,
    UI_BASE_NAMES,
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
