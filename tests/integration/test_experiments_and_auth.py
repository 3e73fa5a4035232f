"""A/B assignment in the request path (holdout, shares, exposure records) and TLS with bearer tokens,
end to end.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone

import grpc
import pytest
from grpc_health.v1 import health_pb2

from featurizer.contracts.experiments import load_experiments
from featurizer.contracts.exposures import read_exposures
from semrank.ranking.v1 import ranking_service_pb2 as pb
from serving.config import ServeConfig, TlsConfig, TokenAuth, channel_credentials
from tests.integration.production_kit import (
    RPC_TIMEOUT_S,
    health_status,
    stub,
)
from tests.integration.serving_kit import (
    ADMIN_TOKEN,
    CLIENT_TOKEN,
    TOKEN_SPEC,
    WRITER_TOKEN,
    ServerThread,
    copy_bundle,
    make_server_pki,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


# -- 4. A/B in the request path ---------------------------------------------------------------------


def test_ab_assignment_holdout_shares_and_exposures(small_shop, small_bundle, catalog, tmp_path):
    bundles = tmp_path / "bundles"
    copy_bundle(small_bundle[0], bundles / "control", version="ab-control-v1")
    copy_bundle(small_bundle[0], bundles / "treatment", version="ab-treatment-v2")
    now = datetime.now(timezone.utc)
    shares = {"control": 0.45, "treatment": 0.45, "holdout": 0.10}
    exp_file = tmp_path / "experiments.toml"
    exp_file.write_text(
        f'[[experiment]]\nname = "prod-ab"\nsalt = "prod-ab-salt"\n'
        f"start = {(now - timedelta(days=1)).strftime('%Y-%m-%dT%H:%M:%SZ')}\n"
        f"end = {(now + timedelta(days=1)).strftime('%Y-%m-%dT%H:%M:%SZ')}\n"
        '  [[experiment.variant]]\n  name = "control"\n  share = 0.45\n  bundle = "bundles/control"\n'
        '  [[experiment.variant]]\n  name = "treatment"\n  share = 0.45\n  bundle = "bundles/treatment"\n'
        '  [[experiment.variant]]\n  name = "holdout"\n  share = 0.10\n  holdout = true\n'
    )
    experiments = load_experiments(exp_file)
    versions = {"control": "ab-control-v1", "treatment": "ab-treatment-v2", "holdout": ""}
    state = tmp_path / "state"
    cfg = ServeConfig(bundle_dir=bundles / "control", data_dir=small_shop, state_dir=state, port=0, reload_poll_s=0,
                      experiments_file=exp_file)
    rng = random.Random(11)
    requests = []
    for k in range(2000):
        ids = rng.sample(catalog, 8)
        requests.append(pb.RankRequest(request_id=f"ab-{k}", user_id=f"ab-user-{k}",
                                       candidates=[pb.RankCandidate(item_id=i) for i in ids]))
    with ServerThread(cfg) as st, grpc.insecure_channel(f"127.0.0.1:{st.port}") as channel:
        info = stub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=RPC_TIMEOUT_S)
        (exp,) = info.experiments
        assert exp.active and {v.name: v.bundle_version for v in exp.variants} == versions
        responses = []
        for start in range(0, len(requests), 16):
            futures = [stub(channel).Rank.future(r, timeout=RPC_TIMEOUT_S) for r in requests[start : start + 16]]
            responses += [f.result() for f in futures]
        st.stop()  # flushes the exposure log
    counts = dict.fromkeys(shares, 0)
    for req, resp in zip(requests, responses):
        a = experiments.assign(req.user_id, datetime.now(timezone.utc))
        assert (resp.experiment, resp.variant) == ("prod-ab", a.variant), req.user_id
        assert resp.model_version == versions[a.variant]
        if a.holdout:
            assert [it.item_id for it in resp.items] == [c.item_id for c in req.candidates]
        counts[a.variant] += 1
    n = len(requests)
    for name, p in shares.items():
        assert abs(counts[name] - n * p) <= 4.5 * (n * p * (1 - p)) ** 0.5, counts

    exposures = read_exposures(state / "exposures")
    assert exposures.height == n and exposures["request_id"].n_unique() == n
    by_id = {row["request_id"]: row for row in exposures.iter_rows(named=True)}
    for req, resp in zip(requests, responses):
        row = by_id[req.request_id]
        assert (row["user_id"], row["experiment"], row["variant"], row["bundle_version"]) == (
            req.user_id, "prod-ab", resp.variant, resp.model_version)
        assert row["item_ids"] == [it.item_id for it in resp.items]



def _inverted_copy(src, dst, version: str):
    """A copy of a bundle whose trees score every item negated: it ranks worst first (a planted worse ranker)."""
    import re

    copy_bundle(src, dst, version=version)
    text = (dst / "ranker.txt").read_text()
    flip = lambda m: "leaf_value=" + " ".join(repr(-float(x)) for x in m.group(1).split())  # noqa: E731
    text = re.sub(r"leaf_value=([^\n]*)", flip, text)
    (dst / "ranker.txt").write_text(re.sub(r"^tree_sizes=.*\n", "", text, flags=re.M))  # the byte sizes changed
    return dst


def test_an_interleaved_arm_end_to_end_with_its_preference_beside_the_ab_result(small_shop, small_bundle, catalog,
                                                                               tmp_path):
    """control = bundle A, treatment = bundle B (A's trees negated: worst first), interleaved = [A, B].
    Rank over gRPC, exposures with teams, clicks that follow A's taste, then `semrank ab report`: the
    interleaved arm's preference favours A, beside the A/B comparisons."""
    import json

    import polars as pl

    from featurizer.contracts.interleaving import TEAM_A
    from semrank.cli import main

    bundles = tmp_path / "bundles"
    copy_bundle(small_bundle[0], bundles / "a", version="il-a")
    _inverted_copy(small_bundle[0], bundles / "b", version="il-b")
    now = datetime.now(timezone.utc)
    exp_file = tmp_path / "experiments.toml"
    exp_file.write_text(
        f'[[experiment]]\nname = "il"\nsalt = "il-salt"\n'
        f"start = {(now - timedelta(days=1)).strftime('%Y-%m-%dT%H:%M:%SZ')}\n"
        f"end = {(now + timedelta(days=1)).strftime('%Y-%m-%dT%H:%M:%SZ')}\n"
        '  [[experiment.variant]]\n  name = "control"\n  share = 0.3\n  bundle = "bundles/a"\n'
        '  [[experiment.variant]]\n  name = "treatment"\n  share = 0.3\n  bundle = "bundles/b"\n'
        '  [[experiment.variant]]\n  name = "interleaved"\n  share = 0.4\n  interleaved = ["bundles/a", "bundles/b"]\n'
    )
    state = tmp_path / "state"
    cfg = ServeConfig(bundle_dir=bundles / "a", data_dir=small_shop, state_dir=state, port=0, reload_poll_s=0,
                      experiments_file=exp_file)
    rng = random.Random(5)
    requests = [pb.RankRequest(request_id=f"il-{k}", user_id=f"il-user-{k}", top_k=6 if k % 2 else 0,
                               candidates=[pb.RankCandidate(item_id=i) for i in rng.sample(catalog, 10)])
                for k in range(900)]
    with ServerThread(cfg) as st, grpc.insecure_channel(f"127.0.0.1:{st.port}") as channel:
        responses = [stub(channel).Rank(r, timeout=RPC_TIMEOUT_S) for r in requests]
        st.stop()  # flushes the exposure log
    exposures = {row["request_id"]: row for row in read_exposures(state / "exposures").iter_rows(named=True)}
    clicks = []
    n_inter = 0
    for req, resp in zip(requests, responses):
        row = exposures[req.request_id]
        shown = [it.item_id for it in resp.items]
        assert row["item_ids"] == shown and len(shown) == (req.top_k or len(req.candidates))
        if resp.variant == "interleaved":
            n_inter += 1
            assert resp.model_version == "il-a+il-b" and len(row["teams"]) == len(shown)
            assert [it.rank for it in resp.items] == list(range(1, len(shown) + 1))
            liked = [i for i, t in zip(shown[:3], row["teams"][:3]) if t == TEAM_A]  # A's taste is the users'
        else:
            assert row["teams"] == [] and resp.model_version == {"control": "il-a", "treatment": "il-b"}[resp.variant]
            liked = shown[:1] if resp.variant == "control" or rng.random() < 0.3 else []
        clicks += [{"ts": row["ts"] + timedelta(seconds=5), "user_id": req.user_id, "item_id": i, "event": "click",
                    "request_id": req.request_id} for i in liked]
    assert n_inter > 250
    pl.DataFrame(clicks).write_csv(tmp_path / "events.csv")
    assert main(["ab", "report", "--exposures", str(state / "exposures"), "--events", str(tmp_path / "events.csv"),
                 "--experiments", str(exp_file), "--out-dir", str(tmp_path / "report"), "--json",
                 str(tmp_path / "r.json"), "--min-users", "1"]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    pref = report["interleaving"]["interleaved"]
    assert (pref["team_a"], pref["team_b"], pref["users"]) == ("il-a", "il-b", n_inter)
    assert pref["favours"] == "A" and pref["wins_b"] == 0 and pref["significant"]
    assert set(report["comparisons"]) == {"treatment", "interleaved"}  # the A/B result beside it
    assert report["comparisons"]["treatment"]["ctr"]["diff"] < 0
    md = (tmp_path / "report" / "ab-il.md").read_text()
    assert "**Interleaved arm interleaved** (A = il-a, B = il-b): users prefer **il-a**" in md
    assert "| interleaved | il-a | il-b |" in md


# -- 7. security -------------------------------------------------------------------------------------


def test_tls_and_tokens_end_to_end(small_shop, small_bundle, catalog, tmp_path):
    pki = make_server_pki(tmp_path / "pki")
    cfg = ServeConfig(bundle_dir=small_bundle[0], data_dir=small_shop, state_dir=tmp_path / "state", port=0,
                      reload_poll_s=0, tls=TlsConfig(pki.server_cert, pki.server_key),
                      tokens=TokenAuth.from_spec(TOKEN_SPEC, source="test tokens"))
    request = pb.RankRequest(user_id="sec-user", candidates=[pb.RankCandidate(item_id=i) for i in catalog[:5]])

    def code(call, req, token: str | None) -> grpc.StatusCode:
        md = [("authorization", f"Bearer {token}")] if token else None
        try:
            call(req, timeout=RPC_TIMEOUT_S, metadata=md)
        except grpc.RpcError as e:
            return e.code()
        return grpc.StatusCode.OK

    with ServerThread(cfg) as st:
        with grpc.secure_channel(f"127.0.0.1:{st.port}", channel_credentials(pki.ca)) as channel:
            s = stub(channel)
            assert code(s.Rank, request, CLIENT_TOKEN) == grpc.StatusCode.OK
            assert code(s.Rank, request, None) == grpc.StatusCode.UNAUTHENTICATED
            assert code(s.Rank, request, "not-a-token-0123456789") == grpc.StatusCode.UNAUTHENTICATED
            assert code(s.LogEvents, iter([pb.LogEventsRequest()]), None) == grpc.StatusCode.UNAUTHENTICATED
            # issue 14, problem 1: writes need a writer (or admin) token
            assert code(s.LogEvents, iter([pb.LogEventsRequest()]), CLIENT_TOKEN) == grpc.StatusCode.PERMISSION_DENIED
            assert code(s.UpsertItems, iter([pb.UpsertItemsRequest()]), CLIENT_TOKEN) == grpc.StatusCode.PERMISSION_DENIED
            assert code(s.LogEvents, iter([pb.LogEventsRequest()]), WRITER_TOKEN) == grpc.StatusCode.OK
            assert code(s.ReloadBundle, pb.ReloadBundleRequest(), WRITER_TOKEN) == grpc.StatusCode.PERMISSION_DENIED
            assert code(s.ReloadBundle, pb.ReloadBundleRequest(), CLIENT_TOKEN) == grpc.StatusCode.PERMISSION_DENIED
            assert code(s.ReloadBundle, pb.ReloadBundleRequest(), ADMIN_TOKEN) == grpc.StatusCode.OK
            assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING  # no token needed
        with grpc.insecure_channel(f"127.0.0.1:{st.port}") as plain:  # plaintext to the TLS port
            with pytest.raises(grpc.RpcError) as e:
                health_status(plain)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
