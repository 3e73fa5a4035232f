"""Admission (issue 30): per-token shares of the Ranks budget and the `--budget` settings, against a real
grpc.aio server whose stand-in RankingService holds Ranks of user "block" until released."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from featurizer.errors import ConfigError
from semrank.ranking.v1 import ranking_service_pb2_grpc as pb_grpc
from serving.api.auth import AuthInterceptor
from serving.api.errors import ErrorInterceptor
from serving.api.interceptors import AdmissionInterceptor
from serving.config import Budgets, TokenAuth
from tests.serving.api.grpc_testkit import call_code, rank_request, serve

TOKENS = {name: f"{name}-token-0123456789abcdef" for name in ("shop", "search", "batch")}


def bearer(name: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {TOKENS[name]}"),)


async def until(predicate, what: str) -> None:
    for _ in range(500):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def test_one_token_cannot_take_every_rank_slot():
    """With tokens, a caller holds at most `ranks_per_caller` Ranks in flight: the others' Ranks are
    answered while one caller's are stuck, and the refusal names the caller's share."""
    auth = TokenAuth.from_spec(",".join(f"{token}:client" for token in TOKENS.values()))
    admission = AdmissionInterceptor(Budgets(ranks=4, ranks_per_caller=2), by_token=True)

    async def run():
        async with serve([ErrorInterceptor(), admission, AuthInterceptor(auth)]) as (port, servicer):
            servicer.gate = asyncio.Event()
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = pb_grpc.RankingServiceStub(ch)
                held = [asyncio.ensure_future(stub.Rank(rank_request(user_id="block"), metadata=bearer("shop")))
                        for _ in range(2)]
                await until(lambda: servicer.entered == 2, "the shop's two Ranks to be admitted")
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.Rank(rank_request(user_id="block"), metadata=bearer("shop"))
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "this caller has 2 ranks open" in refused.value.details()
                # Another caller is answered beside the stuck one.
                assert len((await stub.Rank(rank_request(), metadata=bearer("search"))).items) == 3
                held += [asyncio.ensure_future(stub.Rank(rank_request(user_id="block"), metadata=bearer("search")))
                         for _ in range(2)]
                await until(lambda: servicer.entered == 5, "the search caller's two Ranks to be admitted")
                # All 4 slots are held: a third caller meets the total budget.
                with pytest.raises(grpc.aio.AioRpcError) as full:
                    await stub.Rank(rank_request(), metadata=bearer("batch"))
                assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "limit of 4 concurrent ranks" in full.value.details()
                servicer.gate.set()
                assert [len(r.items) for r in await asyncio.gather(*held)] == [3] * 4
                # The shares are given back.
                assert len((await stub.Rank(rank_request(), metadata=bearer("shop"))).items) == 3

    asyncio.run(run())
    assert admission.refused == {"ranks": 2}
    assert admission.inflight["ranks"] == 0 and not admission.per_caller


def test_without_tokens_ranks_have_no_per_caller_share():
    """One backend often sends every Rank from one address: without tokens only the total counts."""
    admission = AdmissionInterceptor(Budgets(ranks=4, ranks_per_caller=1), by_token=False)

    async def run():
        async with serve([ErrorInterceptor(), admission]) as (port, servicer):
            servicer.gate = asyncio.Event()
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = pb_grpc.RankingServiceStub(ch)
                held = [asyncio.ensure_future(stub.Rank(rank_request(user_id="block"))) for _ in range(4)]
                await until(lambda: servicer.entered == 4, "four Ranks from one address to be admitted")
                assert await call_code(stub.Rank(rank_request())) == grpc.StatusCode.RESOURCE_EXHAUSTED
                servicer.gate.set()
                await asyncio.gather(*held)

    asyncio.run(run())


def test_budget_settings_parse_and_name_what_is_wrong():
    b = Budgets.parse(["writes=64", "ranks-per-caller=10", "stream_idle_s=2.5"])
    assert (b.writes, b.ranks_per_caller, b.stream_idle_s, b.watches) == (64, 10, 2.5, Budgets().watches)
    assert Budgets().rank_share == 96 and Budgets(ranks=1).rank_share == 1 and b.rank_share == 10
    for spec, named in [("writez=3", "writez"), ("writes", "writes"), ("ranks=5", "--max-concurrent-rpcs"),
                        ("admin=two", "'two' is not a number")]:
        with pytest.raises(ConfigError, match=named):
            Budgets.parse([spec])
    with pytest.raises(ConfigError, match="ranks_per_caller"):
        Budgets.parse(["ranks_per_caller=0"])
