"""One event validator for every entry point (issue 30): the same random events, sent to LogEvents'
check (a `pb.Event` at the server's clock) and folded from the stream (its JSON message at the
message's JetStream time, through `MessageChecks.event`, the check the fold makes), get the
same decision, and a refusal names the same field."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from featurizer.contracts.event_rules import EventRules, problem_field
from semrank.ranking.v1 import ranking_service_pb2 as pb
from serving.api.convert import EVENT_NAMES, to_logged
from serving.api.validation import event_problem
from serving.config import Limits
from serving.ingest.stream_checks import MessageChecks
from serving.ingest.stream_format import BadStreamMessage, encode_event

NOW = datetime(2026, 12, 5, 12, 0, tzinfo=timezone.utc)
LIMITS = Limits(max_user_id_chars=40, max_item_id_chars=30, max_event_clock_skew_s=300)
NOW_S = int(NOW.timestamp())

ids = st.one_of(st.text(max_size=45), st.just(""), st.just("   "), st.sampled_from(["u1", "i1", "é/ü"]))
seconds = st.one_of(
    st.integers(NOW_S - 10**9, NOW_S + 10**4),  # around now, past and future
    st.integers(-(2**62), 2**62),  # anywhere an int64 Timestamp can be
    st.sampled_from([0, 946_684_799, 946_684_800, NOW_S + 300, NOW_S + 301, 253_402_300_800]),
)
events = st.builds(
    lambda user, item, s, ns, kind, pos, rid, eid: pb.Event(
        user_id=user, item_id=item, ts=Timestamp(seconds=s, nanos=ns), type=kind, position=pos, request_id=rid,
        event_id=eid),
    ids, ids, seconds, st.integers(0, 999_999_999), st.sampled_from(sorted(EVENT_NAMES)),
    st.integers(-(2**31), 2**31 - 1), st.text(max_size=35), st.text(max_size=35),
)


def folded_decision(ev: pb.Event, checks: MessageChecks) -> str | None:
    """What the fold decides for this event's stream message, stamped by JetStream at NOW."""
    msg = SimpleNamespace(data=encode_event(to_logged(ev)), metadata=SimpleNamespace(timestamp=NOW))
    try:
        checks.event(msg)
    except BadStreamMessage as e:
        return str(e).removeprefix("refused by the event rules: ")
    return None


@pytest.fixture(scope="module")
def checks():
    return MessageChecks(LIMITS.event_rules, LIMITS.item_rules, refused={})


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ev=events)
def test_log_events_and_the_fold_decide_alike(ev, checks):
    api = event_problem(ev, LIMITS, NOW)
    stream = folded_decision(ev, checks)
    assert (api is None) == (stream is None), (api, stream)
    if api is not None:
        assert problem_field(api) == problem_field(stream) and api == stream


def test_the_future_bound_is_the_messages_time_not_the_replicas_clock(checks):
    """Two replicas folding one message at different times decide alike: the bound is its stamp."""
    ev = pb.Event(user_id="u", item_id="i", ts=Timestamp(seconds=NOW_S + 200), type=pb.EVENT_TYPE_CLICK)
    msg = SimpleNamespace(data=encode_event(to_logged(ev)), metadata=SimpleNamespace(timestamp=NOW))
    assert checks.event(msg).ts_us == (NOW_S + 200) * 1_000_000  # whatever this process's clock says
    late = SimpleNamespace(data=msg.data, metadata=SimpleNamespace(timestamp=NOW - timedelta(seconds=101)))
    with pytest.raises(BadStreamMessage, match="ts: .* in the future"):
        checks.event(late)


def test_the_rules_check_types_a_json_producer_can_send():
    rules = EventRules()
    base = {"ts_us": NOW_S * 10**6, "user_id": "u", "item_id": "i", "event": "click", "request_id": "",
            "position": 0, "event_id": ""}
    for change, field in [({"ts_us": True}, "ts"), ({"ts_us": 1.5e15}, "ts"), ({"position": False}, "position"),
                          ({"position": 2**31}, "position"), ({"user_id": 5}, "user_id"), ({"item_id": None}, "item_id"),
                          ({"request_id": ["x"]}, "request_id"), ({"event": "view"}, "type")]:
        problem = rules.problem(SimpleNamespace(**{**base, **change}), NOW_S * 10**6)
        assert problem is not None and problem_field(problem) == field, (change, problem)
    assert rules.problem(SimpleNamespace(**base), NOW_S * 10**6) is None
