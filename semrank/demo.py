"""`semrank demo`: synth -> train -> serve (real Triton + gRPC) -> rank a few users -> table.

Everything runs on the embedded default (a synthetic shop generated here); no
external server is needed. Triton and the gRPC server are shut down at the
end, and the demo checks that no tritonserver process is left behind.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import subprocess
import time
from pathlib import Path

import grpc
import numpy as np
import polars as pl

log = logging.getLogger(__name__)


def _tritonservers_left() -> list[str]:
    out = subprocess.run(["pgrep", "-af", "bin/tritonserver"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line.strip()]


async def _rank_some_users(data_dir: Path, bundle_dir: Path, seed: int) -> None:
    from featurizer.contracts.schema import read_dataset
    from featurizer.privacy import Pseudonyms
    from semrank.ranking.v1 import ranking_service_pb2 as pb
    from semrank.ranking.v1 import ranking_service_pb2_grpc as pb_grpc
    from serving.config import ServeConfig
    from serving.server import RankingServer

    ds = read_dataset(data_dir)
    titles = dict(zip(ds.items["item_id"].to_list(), ds.items["title"].to_list()))
    cats = dict(zip(ds.items["item_id"].to_list(), ds.items["category"].to_list()))
    state_dir = data_dir.parent / "state"
    if state_dir.exists():
        import shutil

        shutil.rmtree(state_dir)  # a fresh event log and exposure log for every demo run
    # Pseudonymous user ids on (docs/privacy.md): a key of this run's own, so the state holds only pseudonyms.
    names = Pseudonyms(secrets.token_bytes(32))
    server = RankingServer(ServeConfig(bundle_dir=bundle_dir, data_dir=data_dir, state_dir=state_dir, port=0, reload_poll_s=0,
                                       pseudonyms=names))
    t0 = time.monotonic()
    port = await server.start()
    print(f"\n== serving on 127.0.0.1:{port} (Triton + gRPC up in {time.monotonic() - t0:.1f}s; pseudonymous user ids "
          f"{names.describe()})")
    try:
        rng = np.random.default_rng(seed)
        active = (
            ds.events.filter(pl.col("event") != "impression").group_by("user_id").len().sort(["len", "user_id"], descending=True)
        )
        users = active["user_id"].head(2).to_list() + ["brand-new-user"]
        item_ids = ds.items["item_id"].to_list()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.RankingServiceStub(channel)
            for u in users:
                cands = [pb.RankCandidate(item_id=i) for i in rng.choice(item_ids, size=20, replace=False)]
                if u == users[0]:
                    cands.append(
                        pb.RankCandidate(
                            item_id="never-seen-sku-1",
                            title="Limited Edition Wireless Earbuds",
                            category="audio",
                            description="New arrival, not yet in the catalog: scored from its inline text.",
                        )
                    )
                history = server.engine.online.history(names(u), server.engine.now(), 3)  # stored under its pseudonym
                resp = await stub.Rank(pb.RankRequest(request_id=f"demo-{u}", user_id=u, candidates=cands))
                print(f"\n-- user {u}: top 8 of {len(cands)} candidates  (bundle {resp.model_version})")
                print("   recent history: " + ("; ".join(titles.get(i, i) for i in history[:3]) or "none (cold start)"))
                inline = {c.item_id: c for c in cands if c.item_id not in titles}
                for it in resp.items[:8]:
                    if it.item_id in inline:
                        label, name = "inline, unseen", inline[it.item_id].title
                    else:
                        label, name = cats.get(it.item_id), titles[it.item_id]
                    print(f"   {it.rank:2d}. {it.score:+.3f}  [{label}] {name}")
                for it in resp.items:
                    if it.item_id in inline:
                        print(f"   the unseen inline item '{it.item_id}' was scored from its text: rank {it.rank}, score {it.score:+.3f}")
            await _events_then_rank(stub, pb, ds, titles, cats, rng)
            try:
                await stub.Rank(pb.RankRequest(user_id="", candidates=[]))
            except grpc.aio.AioRpcError as e:
                print(f"\n-- a malformed request gets {e.code().name}: {e.details()}")
    finally:
        await server.stop()


async def _events_then_rank(stub, pb, ds, titles, cats, rng) -> None:
    """A brand-new user buys two items (LogEvents); the very next Rank already uses them."""
    from google.protobuf.timestamp_pb2 import Timestamp

    user = "demo-new-customer"
    cat = ds.items["category"].drop_nulls().unique(maintain_order=True)[0]
    in_cat = ds.items.filter(pl.col("category") == cat)["item_id"].to_list()
    others = ds.items.filter(pl.col("category") != cat)["item_id"].to_list()
    bought = in_cat[:2]
    ts = Timestamp()
    ts.GetCurrentTime()

    async def events():
        yield pb.LogEventsRequest(events=[pb.Event(ts=ts, user_id=user, item_id=i, type=pb.EVENT_TYPE_PURCHASE) for i in bought]
                                  + [pb.Event(ts=ts, user_id=user, item_id="", type=pb.EVENT_TYPE_CLICK)])

    ack = await stub.LogEvents(events())
    print(f"\n-- LogEvents for {user}: bought {'; '.join(titles[i] for i in bought)} [{cat}]")
    print(f"   accepted {ack.accepted}, rejected {ack.rejected}: " + "; ".join(r.reason for r in ack.rejections))
    cands = [pb.RankCandidate(item_id=i) for i in list(rng.choice(others, size=12, replace=False)) + in_cat[2:6]]
    resp = await stub.Rank(pb.RankRequest(user_id=user, candidates=cands, top_k=5, explain=True))
    print(f"   the next Rank (top 5 of {len(cands)}, 4 of them from {cat}), with explanations by feature family:")
    for it in resp.items:
        parts = ", ".join(f"{c.family} {c.contribution:+.2f}" for c in it.contributions if abs(c.contribution) >= 0.01)
        print(f"   {it.rank:2d}. {it.score:+.3f}  [{cats.get(it.item_id)}] {titles[it.item_id]}\n       {parts}")


def run_demo(workdir: Path, seed: int = 0, users: int = 1500, items: int = 800, days: int = 28) -> int:
    from featurizer.contracts.schema import read_dataset
    from ranker.encoder import ProgressEncoder, TextEncoder, encoder_key
    from ranker.encoder_probes import compute_probes, save_probes
    from training.data.synth import SynthConfig, synthesize
    from training.lambdarank.booster import format_table
    from training.lambdarank.impression_lists import train_ranker
    from training.lambdarank.params import RankerTrainConfig

    t0 = time.monotonic()
    data_dir, bundle_dir = workdir / "data", workdir / "bundle"
    print(f"== 1/4 synthesising a shop ({users} users, {items} items, {days} days, seed {seed}) into {data_dir}")
    summary = synthesize(data_dir, seed=seed, config=SynthConfig(n_users=users, n_items=items, n_days=days), progress=True)
    print(f"   {summary.get('events', summary)}")

    print(f"== 2/4 training the ranker bundle into {bundle_dir} (frozen MiniLM interest score + behaviour)")
    cfg = RankerTrainConfig(seed=seed)
    ds = read_dataset(data_dir)
    encoder = TextEncoder(max_length=cfg.max_length)
    extra = train_ranker(ds, bundle_dir, cfg, ProgressEncoder(encoder), data_source=str(data_dir))
    save_probes(bundle_dir, compute_probes(encoder, encoder_key("base", cfg.max_length)))  # for an external Triton
    table = format_table(extra["metrics"]["test"])

    print("== 3/4 serving: Triton (encoder, dynamic batching) + gRPC RankingService, ranking through a real channel")
    asyncio.run(_rank_some_users(data_dir, bundle_dir, seed))

    left = _tritonservers_left()
    print("\n== 4/4 held-out evaluation (the last {:g} days, lists with at least one click):\n".format(cfg.test_days))
    print(table)
    print(
        "\n(logged-order is the order the shop showed. Clicks follow position, so on logged clicks it is "
        "flattered by position bias;\n the other rows rank the same lists, shuffled, from features alone.)"
    )
    pop = extra["metrics"]["test"]["popularity"]["ndcg@10"]
    lgbm = extra["metrics"]["test"]["lightgbm-bundle"]["ndcg@10"]
    print(f"\nLightGBM bundle nDCG@10 {lgbm:.4f} vs popularity {pop:.4f} ({(lgbm / pop - 1) * 100:+.1f}%)")
    print(f"demo finished in {time.monotonic() - t0:.0f}s; tritonserver processes left: {len(left)}")
    if left:
        print("ERROR: tritonserver still running:\n" + "\n".join(left))
        return 1
    return 0
