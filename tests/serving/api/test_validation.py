import pytest

from semrank.ranking.v1 import ranking_service_pb2 as pb
from serving.api.validation import InvalidRequest, validate_rank_request
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