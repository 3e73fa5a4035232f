"""What bench/serve.py runs against, made once under its work directory and shared with the other
benches of the request and write paths (engine_profile, fold_profile, gc_pause, delta_stall, ...):
the bench's configuration, the synthetic shop and its bundle, the feature snapshot every run's
server starts from, the seeded request pools, and the in-process engine (the same data, bundle and
item embeddings as the server: the baseline a service overhead is measured against)."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

log = logging.getLogger("bench.serve")

SEQUENCE_ITEMS = 50  # `semrank serve --sequence-items` of the --sequence runs (the sequence model reads 50)
DATA_VERSION = 2  # bump when the synthetic shop or the bundle recipe changes (2: the pooled user tower)


@dataclass(frozen=True)
class BenchConfig:
    work_dir: Path = Path("runs/bench-serve")
    n_users: int = 3000
    n_items: int = 2000
    n_days: int = 28
    seed: int = 11
    candidates: tuple[int, ...] = (100, 300, 1000)
    offered_rps: float = 200.0
    seconds: float = 20.0  # per measured phase
    warmup_s: float = 3.0  # untimed load before each phase
    bench_users: int = 500
    requests_per_size: int = 400  # distinct pre-serialised requests per candidate count
    top_k: int = 10
    processes: int = 1  # load-generator processes
    channels: int = 4  # gRPC channels per generator process
    saturation_concurrency: tuple[int, ...] = (4, 16)  # requests in flight (all processes together), one row each
    inprocess_reps: int = 300
    timeout_s: float = 5.0  # per-request deadline
    # Triton deadline on the server's request path. Only the warm-up needs the encoder (one history
    # text per bench user); on 2 busy cores a cold encode can take longer than the 250 ms default,
    # and a degraded warm-up answer caches nothing. The measured phases must not call it at all
    # (each row counts degraded answers).
    encoder_timeout_ms: float = 5000.0
    workers: int = 1  # semrank serve --workers
    events: str = "local"  # semrank serve --events (jetstream: a stream of the run's own, deleted after it)
    nats_url: str = "nats://127.0.0.1:4222"
    tokens: bool = False  # bearer tokens on (the generator sends a client token on every call)
    mixed_candidates: tuple[int, ...] = (100,)  # the mixed phase's sizes (empty: no mixed phase)
    mixed_events_rate: float = 50.0  # LogEvents events/s beside the offered Ranks/s in the mixed phase
    # Heavier mixes, measured rows with no target: (events/s, distinct users), each over its own users.
    heavy_mixes: tuple[tuple[float, int], ...] = ((1000.0, 2000),)
    heavy_events_per_call: int = 20  # a heavy mix's LogEvents carry this many events each (a writer batching)
    tower: str = "pooled"  # the bench bundle's user tower (ranker.user_tower): pooled, or text (before issue 28)
    sequence: bool = False  # the bench bundle has a sequence model (issue 31: `sequence_score`, pooled tower)
    null_service: bool = True  # after the real phases, the same ones against `semrank serve --null-service`
    serve_args: tuple[str, ...] = ()  # more `semrank serve` arguments (an experiment: --snapshot-interval-s 0)

# ---------------------------------------------------------------- data


def prepare(cfg: BenchConfig) -> tuple[Path, Path]:
    """The shop and the bundle of `cfg.tower` under work_dir, made once and reused while the recipe is
    the same (`bundle/` for the pooled tower, `bundle-text/` for the text tower, both trained on the
    same shop)."""
    from featurizer.contracts.schema import read_dataset
    from ranker.encoder import TextEncoder
    from training.data.synth import SynthConfig, synthesize
    from training.lambdarank.impression_lists import train_ranker
    from training.lambdarank.params import RankerTrainConfig

    wd = cfg.work_dir
    shop, stamp = wd / "shop", wd / "recipe.json"
    bundle = wd / ("bundle-sequence" if cfg.sequence else "bundle" if cfg.tower == "pooled" else f"bundle-{cfg.tower}")
    recipe = {"version": DATA_VERSION, "n_users": cfg.n_users, "n_items": cfg.n_items, "n_days": cfg.n_days, "seed": cfg.seed}
    if not (stamp.exists() and json.loads(stamp.read_text()).get("recipe") == recipe):
        log.info("making the shop under %s (once; later runs reuse it)", wd)
        for p in (shop, wd / "state", wd / "features", *wd.glob("bundle*")):
            shutil.rmtree(p, ignore_errors=True)
        wd.mkdir(parents=True, exist_ok=True)
        # Events end today, so the windowed features at serving time see recent activity.
        today = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
        synthesize(shop, seed=cfg.seed, config=SynthConfig(n_users=cfg.n_users, n_items=cfg.n_items, n_days=cfg.n_days,
                                                           start=today - timedelta(days=cfg.n_days)))
        stamp.write_text(json.dumps({"recipe": recipe, "made_at": datetime.now(timezone.utc).isoformat()}) + "\n")
    if cfg.sequence and not (bundle / "manifest.json").exists():
        train_sequence_bundle(shop, bundle, wd / "sequence")
    if not (bundle / "manifest.json").exists():
        log.info("training the bundle (%s user tower) under %s (once)", cfg.tower, bundle)
        train_ranker(read_dataset(shop), bundle, RankerTrainConfig(seed=0, tower=cfg.tower), TextEncoder(max_length=128),
                     data_source=str(shop.resolve()))
    return shop, bundle


def train_sequence_bundle(shop: Path, bundle: Path, seq_dir: Path) -> None:
    """A bundle with a sequence model, by the CLI's recipe (docs/evaluation.md): SASRec-CE on the
    shop's sequences with one item held out (10 epochs: the bench measures its cost, not its
    quality), then the leave-one-out ranker over it with `sequence_score`."""
    cli = [sys.executable, "-m", "semrank.cli"]
    log.info("training the sequence model and its bundle under %s (once)", bundle)
    subprocess.run([*cli, "train", "sequence", "--data", str(shop), "--out", str(seq_dir), "--hold-out", "1",
                    "--epochs", "10", "--eval-every", "5"], check=True)
    subprocess.run([*cli, "train", "ranker", "--data", str(shop), "--out", str(bundle), "--sequence", str(seq_dir)],
                   check=True)


def online_snapshot(state_dir: Path, shop: Path, sequence_items: int = 0) -> Path:
    """The feature snapshot of the shop's events, built here once (what the server would do at its
    first start) beside the server's state directory: every run's server starts from a copy of it
    (`reset_server_state`), and this process loads the same state. `sequence_items`: the users'
    sequences it keeps (`semrank serve --sequence-items`; a file per value)."""
    from featurizer.contracts.schema import read_dataset
    from featurizer.definitions import FeatureParams
    from featurizer.online.features import OnlineFeatures
    from featurizer.store.config import InProcessConfig
    from featurizer.store.in_process import InProcessStore

    path = state_dir.parent / ("features" if not sequence_items else f"features-seq{sequence_items}") / "online-store.bin"
    if not path.exists():
        t0 = time.monotonic()
        ds = read_dataset(shop)
        store = InProcessStore(InProcessConfig(path=str(path)))
        OnlineFeatures(store, ds.items, FeatureParams(sequence_items=sequence_items)).apply(ds.events)
        store.close()
        log.info("online feature snapshot built from %d events in %.1f s", ds.events.height, time.monotonic() - t0)
    return path


def reset_server_state(state_dir: Path, snapshot: Path) -> None:
    """Every run's server starts from the same state: the shop's feature snapshot and no event log
    (earlier runs' events would otherwise pile up in the state it folds and ranks with). The item
    embeddings stay: they depend on the shop and the bundle only."""
    from featurizer.store.snapshot_files import delta_path

    for d in (state_dir, *sorted((state_dir / "workers").glob("*"))):
        if not d.is_dir():
            continue
        shutil.rmtree(d / "events", ignore_errors=True)
        delta_path(d / "online-store.bin").unlink(missing_ok=True)
        shutil.copyfile(snapshot, d / "online-store.bin")


def bench_requests(cfg: BenchConfig, shop: Path) -> tuple[list[str], list[str], dict]:
    """Seeded: the bench users, the catalog, and per candidate count a pool of (user, candidate ids);
    the heavy mixes' pools under `heavy_key`."""
    from featurizer.contracts.schema import read_dataset

    ds = read_dataset(shop)
    rng = random.Random(cfg.seed)
    users = sorted(set(ds.events["user_id"].unique().to_list()))
    users = rng.sample(users, min(cfg.bench_users, len(users)))
    items = ds.items["item_id"].to_list()
    pools: dict = {n: [(rng.choice(users), rng.sample(items, n)) for _ in range(cfg.requests_per_size)]
                   for n in cfg.candidates}
    everyone = sorted(set(ds.events["user_id"].unique().to_list()))
    for n in cfg.mixed_candidates:  # a heavy mix's pool: one request per user of its own, uniformly drawn
        for rate, n_users in cfg.heavy_mixes:
            mix_users = rng.sample(everyone, min(n_users, len(everyone)))
            pools[heavy_key(n, n_users)] = [(u, rng.sample(items, n)) for u in mix_users]
    return users, items, pools


def heavy_key(n: int, users: int) -> str:
    """The request pool of a heavy mix at n candidates over `users` users."""
    return f"{n}c-{users}u"

# ---------------------------------------------------------------- in-process baseline


class LocalEncoder:
    """The bundle's text encoder in this process (for the baseline engine's user embeddings)."""

    def __init__(self, model_dir: str, max_length: int):
        import torch

        from ranker.encoder import TextEncoder

        torch.set_num_threads(1)
        self.enc = TextEncoder(model_dir, max_length=max_length)

    async def encode(self, texts: list[str], timeout_s: float | None = None) -> np.ndarray:
        return self.enc.encode(texts)

    async def encode_bulk(self, texts: list[str]) -> np.ndarray:
        return self.enc.encode(texts)


def inprocess_engine(bundle_dir: Path, shop: Path, state_dir: Path, snapshot: Path):
    """A RankingEngine like the server's: same items, feature state, bundle and item embeddings."""
    from featurizer.contracts.schema import read_dataset
    from featurizer.online.features import OnlineFeatures
    from featurizer.store.config import InProcessConfig
    from featurizer.store.in_process import InProcessStore
    from ranker.bundle import load_bundle
    from ranker.encoder import encoder_key
    from serving.ranking.engine import BundleRuntime, RankingEngine
    from serving.ranking.item_store import ItemStore

    ds = read_dataset(shop)
    items = ItemStore(ds.items, state_dir)  # the server's persisted embeddings
    copy = state_dir.parent / "inprocess-store.bin"  # a copy: this store must never write the snapshot
    shutil.copyfile(snapshot, copy)
    online = OnlineFeatures(InProcessStore(InProcessConfig(path=str(copy))), items.items)  # (loaded at init)
    copy.unlink()
    bundle = load_bundle(bundle_dir)
    ref = bundle.encoder
    key = encoder_key(ref.resolve(bundle.path), ref.max_length)
    enc = LocalEncoder(ref.resolve(bundle.path), ref.max_length)
    embedded = asyncio.run(items.ensure_embeddings(key, enc.encode_bulk, enc.enc.dim))
    if embedded:
        log.warning("in-process engine: %d item embeddings were not on disk and were computed here", embedded)
    return RankingEngine(items=items, online=online), BundleRuntime(bundle, key, enc)


def measure_inprocess(engine, rt, pools: dict[int, list[tuple[str, list[str]]]], users: list[str], reps: int) -> dict[int, dict]:
    """engine.rank per request, sizes interleaved; after one untimed rank per bench user."""
    from serving.ranking.outcome import Candidate

    cands = {n: [(u, [Candidate(item_id=i) for i in ids]) for u, ids in pool] for n, pool in pools.items()}
    times: dict[int, list[float]] = {n: [] for n in pools}
    cpu: dict[int, list[float]] = {n: [] for n in pools}

    async def run() -> None:
        any_ids = next(iter(cands.values()))[0][1]
        for u in users:
            await engine.rank(rt, u, any_ids)
        for r in range(reps):
            for n, pool in cands.items():
                u, cs = pool[r % len(pool)]
                t, c = time.perf_counter(), time.process_time()
                await engine.rank(rt, u, cs)
                times[n].append(time.perf_counter() - t)
                cpu[n].append(time.process_time() - c)

    asyncio.run(run())
    return {n: {"p50_ms": round(float(np.median(ts)) * 1e3, 3), "p99_ms": round(float(np.percentile(ts, 99)) * 1e3, 3),
                "cpu_ms": round(float(np.mean(cpu[n])) * 1e3, 3)}  # (process time ticks coarsely: the mean)
            for n, ts in times.items()}
