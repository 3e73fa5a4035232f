import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from semrank.ranking.v1 import ranking_service_pb2 as pb
from serving.api.validation import InvalidRequest, Limits, validate_rank_request


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


def test_status_carries_bad_request_details():
    with pytest.raises(InvalidRequest) as e:
        validate_rank_request(req(user_id="", candidates=[]), Limits())
    status = e.value.to_status()
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "user_id" in status.details and "candidates" in status.details
    rich = rpc_status.from_call  # noqa: F841  (the client side is exercised in the integration test)
    br = error_details_pb2.BadRequest()
    from google.rpc import status_pb2

    st = status_pb2.Status.FromString(dict(status.trailing_metadata)["grpc-status-details-bin"])
    assert st.details[0].Unpack(br)
    assert [v.field for v in br.field_violations] == ["user_id", "candidates"]
