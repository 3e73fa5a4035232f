from datetime import datetime, timezone

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from semrank.ranking.v1 import ranking_service_pb2 as pb
from serving.api.validation import InvalidRequest, event_problem, validate_rank_request
from serving.config import Limits


def req(**kw):
    base = dict(user_id="u1", candidates=[pb.RankCandidate(item_id="i1")])
    base.update(kw)
    return pb.RankRequest(**base)


def fields(r, limits=Limits()):
    with pytest.raises(InvalidRequest) as e:
        validate_rank_request(r, limits)
    return [v.field for v in e.value.violations]


def test_valid_request_passes():
    validate_rank_request(req(), Limits())


def test_a_valid_request_gives_its_candidates_and_their_ids_in_order():
    r = req(candidates=[pb.RankCandidate(item_id="b"), pb.RankCandidate(item_id="a", title="Lamp", price=2.5),
                        pb.RankCandidate(item_id="c")])
    valid = validate_rank_request(r, Limits())
    assert valid.ids == ["b", "a", "c"]
    assert [c.item_id for c in valid.candidates] == valid.ids
    assert valid.candidates[1].title == "Lamp" and valid.candidates[1].HasField("price")


@pytest.mark.parametrize(
    "kw, expected",
    [
        (dict(user_id=""), ["user_id"]),
        (dict(user_id="   "), ["user_id"]),
        (dict(candidates=[]), ["candidates"]),
        (dict(user_id="", candidates=[]), ["user_id", "candidates"]),
        (dict(top_k=-1), ["top_k"]),
        (dict(candidates=[pb.RankCandidate(item_id="a"), pb.RankCandidate(item_id="")]), ["candidates[1].item_id"]),
        (dict(candidates=[pb.RankCandidate(item_id="a"), pb.RankCandidate(item_id="a")]), ["candidates[1].item_id"]),
        (dict(candidates=[pb.RankCandidate(item_id="a", title="x" * 5000)]), ["candidates[0].title"]),
    ],
)
def test_violations_name_the_field(kw, expected):
    assert fields(req(**kw)) == expected


def test_candidate_limit_is_configurable():
    many = [pb.RankCandidate(item_id=f"i{k}") for k in range(11)]
    assert fields(req(candidates=many), Limits(max_candidates=10)) == ["candidates"]
    validate_rank_request(req(candidates=many), Limits(max_candidates=11))


def test_violations_become_bad_request_details():
    """The status itself (code, ErrorInfo, BadRequest) is tested in test_errors.py, through the interceptor."""
    with pytest.raises(InvalidRequest) as e:
        validate_rank_request(req(user_id="", candidates=[]), Limits())
    assert e.value.grpc_code == "INVALID_ARGUMENT"
    assert "user_id" in str(e.value) and "candidates" in str(e.value)
    assert [f for f, _ in e.value.field_violations()] == ["user_id", "candidates"]

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=timezone.utc)


def event(seconds: int, nanos: int = 0) -> pb.Event:
    return pb.Event(ts=Timestamp(seconds=seconds, nanos=nanos), user_id="u1", item_id="i1", type=pb.EVENT_TYPE_CLICK)


@pytest.mark.parametrize("seconds, reason", [
    (10**15, "ts: 1000000000000000 s since 1970-01-01 is more than 300 s in the future"),
    (253_402_300_800, "ts: 253402300800 s since 1970-01-01 is more than 300 s in the future"),  # 10000-01-01
    (-10**15, "ts: -1000000000000000 s since 1970-01-01 is before 2000-01-01"),
    (0, "ts: 1970-01-01T00:00:00+00:00 is before 2000-01-01"),
    (int(NOW.timestamp()) + 3600, "ts: 2026-12-03T13:00:00+00:00 is more than 300 s in the future"),
])
def test_an_event_time_out_of_range_is_a_reason_never_an_overflow(seconds, reason):
    assert event_problem(event(seconds), Limits(max_event_clock_skew_s=300), NOW) == reason


def test_an_event_time_within_the_skew_is_accepted():
    assert event_problem(event(int(NOW.timestamp()) + 299, 999_999_999), Limits(max_event_clock_skew_s=300), NOW) is None


@pytest.mark.parametrize("price", [float("nan"), float("inf"), float("-inf"), -0.5])
def test_an_inline_price_must_be_finite_and_not_negative(price):
    r = req(candidates=[pb.RankCandidate(item_id="i1", title="Lamp", price=price)])
    assert fields(r) == ["candidates[0].price"]
    validate_rank_request(req(candidates=[pb.RankCandidate(item_id="i1", title="Lamp", price=0.0)]), Limits())
