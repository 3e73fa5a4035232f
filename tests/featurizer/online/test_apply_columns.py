"""`OnlineFeatures.apply_columns` (the event log's fold: plain columns, no DataFrame) is `apply`
over the same events: the same state in the store, byte for byte, whatever the order and ties."""

from __future__ import annotations

from datetime import timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from featurizer.contracts.schema import EVENT_TYPES
from featurizer.definitions import EVENT_CODE
from featurizer.online.features import OnlineFeatures, to_us
from featurizer.store.in_process import InProcessStore
from tests.featurizer.online.test_user_history import ITEMS, T0, make_events

EVENTS = st.lists(st.tuples(st.integers(0, 30), st.sampled_from(["u0", "u1", "u2"]),
                            st.sampled_from(["i0", "i1", "i2", "i3", "i4"]), st.sampled_from(EVENT_TYPES)),
                  max_size=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=st.lists(EVENTS, min_size=1, max_size=4))
def test_apply_columns_writes_what_apply_writes(batches):
    by_frame, by_columns = InProcessStore(), InProcessStore()
    a, b = OnlineFeatures(by_frame, ITEMS), OnlineFeatures(by_columns, ITEMS)
    for rows in batches:  # unsorted, with ties at one minute: both sort stably by time
        a.apply(make_events(rows), meta={"log": {"seq": len(rows)}})
        b.apply_columns([to_us(T0 + timedelta(minutes=m)) for m, *_ in rows], [r[1] for r in rows],
                        [r[2] for r in rows], [EVENT_CODE[r[3]] for r in rows], meta={"log": {"seq": len(rows)}})
    assert by_frame._data == by_columns._data
    assert a.watermark == b.watermark
