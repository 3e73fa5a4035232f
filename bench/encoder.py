"""Encoder throughput and latency: the real Triton worker against in-process encoding, same run.

    .venv/bin/python bench/encoder.py [--reps 60] [--batches 1 8 32] [--threads N] [--worker-threads N]

Triton mode: strings go to `TritonProcess` (pytriton's tritonserver on CPU) through
`EncoderClient`; tokenization happens inside the Triton model. In-process mode:
`TextEncoder.encode` in this process. Both see the same seeded product texts, one request in
flight at a time, and never run at the same time (the worker is idle while this process
encodes and vice versa), so on a small machine neither fights the other for cores. The modes
alternate request by request, so drift in machine load hits both alike.

Also times tokenization alone against the full in-process encode (is it worth moving it out of
the Triton model?), and checks that Triton's embeddings equal the in-process ones.

Prints one JSON object: hardware, per (mode, batch) texts/s and p50/p99 latency, ratios.
texts_per_s is batch / median latency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
from machine import machine  # bench/ is sys.path[0]

log = logging.getLogger(__name__)

BRANDS = ["Acme", "Nordlys", "Kestrel", "Umbra", "Vito", "Brightline", "Oakridge", "Sora", "Helix", "Marlow"]
COLORS = ["black", "white", "navy", "red", "olive", "grey", "beige", "teal", "burgundy", "silver"]
MATERIALS = ["cotton", "merino wool", "stainless steel", "bamboo", "recycled polyester", "leather", "ceramic", "oak"]
PRODUCTS = [
    "running shoes", "water bottle", "hoodie", "backpack", "desk lamp", "coffee grinder", "yoga mat",
    "wireless earbuds", "cast iron skillet", "rain jacket", "phone case", "throw blanket", "chef's knife",
    "office chair", "electric kettle", "hiking socks", "face moisturiser", "board game", "LED strip", "sunglasses",
]  # fmt: skip
FEATURES = [
    "waterproof", "lightweight", "machine washable", "BPA-free", "USB-C rechargeable", "non-slip",
    "dishwasher safe", "adjustable", "noise cancelling", "breathable", "vegan", "2-year warranty",
]  # fmt: skip
SIZES = ["S", "M", "L", "XL", "500 ml", "1 L", "28 cm", "2 m", "pack of 3", "one size"]
DESCRIPTIONS = [
    "Designed for everyday use, it combines durable materials with a clean, minimal look.",
    "Our best seller this season, now with an improved fit and reinforced seams.",
    "Perfect for travel, commuting and weekend adventures; folds flat when not in use.",
    "Tested by our team for six months of daily use. Easy to clean and built to last.",
    "Keeps drinks cold for 24 hours and hot for 12, with a leak-proof lid.",
    "A thoughtful gift for friends and family who love the outdoors.",
]


def product_texts(n: int, seed: int) -> list[str]:
    """Realistic catalogue texts: titles (most), some with a description (longer sequences)."""
    rng = np.random.default_rng(seed)
    pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
    out = []
    for _ in range(n):
        title = f"{pick(BRANDS)} {pick(COLORS)} {pick(MATERIALS)} {pick(PRODUCTS)}, {pick(FEATURES)}, {pick(SIZES)}"
        if rng.random() < 0.3:
            k = int(rng.integers(1, 4))
            title += " - " + " ".join(rng.choice(DESCRIPTIONS, size=k, replace=False))
        out.append(title)
    return out


@dataclass(frozen=True)
class BenchConfig:
    batches: tuple[int, ...] = (1, 8, 32)
    reps: int = 60  # timed requests per (mode, batch)
    warmup: int = 3  # untimed requests per mode before each batch size
    seed: int = 0
    max_length: int = 128
    threads: int | None = None  # torch threads for in-process encoding; None keeps torch's default
    worker_threads: int | None = None  # TritonWorkerConfig.threads; None: same as `threads`
    max_queue_delay_us: int = 2000  # TritonWorkerConfig default

    def __post_init__(self) -> None:
        if self.reps < 2 or self.warmup < 0:
            raise ValueError(f"reps={self.reps} must be >= 2 and warmup={self.warmup} >= 0")
        for name in ("threads", "worker_threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1 (or None for torch's default)")
        if not self.batches or min(self.batches) < 1:
            raise ValueError(f"batches={self.batches} must be positive sizes")


def percentiles_ms(seconds: list[float]) -> tuple[float, float]:
    ms = np.asarray(seconds) * 1000.0
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def hardware() -> dict:
    import torch

    return {
        **machine(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "loadavg_1m_start": round(os.getloadavg()[0], 2),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
    }


class Bench:
    def __init__(self, cfg: BenchConfig):
        self.cfg = cfg
        pool = product_texts(max(cfg.batches) * 16, cfg.seed)
        rng = np.random.default_rng(cfg.seed + 1)
        # The same request texts for both modes; cycled through by request index.
        self.requests = {b: [list(rng.choice(pool, size=b, replace=False)) for _ in range(16)] for b in cfg.batches}
        self.times: dict[tuple[str, int], list[float]] = {(m, b): [] for m in ("triton", "inprocess") for b in cfg.batches}
        self.tokenize: dict[int, list[float]] = {b: [] for b in cfg.batches}

    async def run_batch(self, encoder, client, batch: int) -> None:
        """Alternate one in-process and one Triton request (ABBA order), then one tokenization.

        Requests never overlap, so the idle side never competes for cores; alternating request
        by request (rather than block by block) makes both modes see the same machine load.
        """
        reqs = self.requests[batch]
        tok = encoder.tokenizer
        for i in range(self.cfg.warmup):
            encoder.encode(reqs[i % len(reqs)])
            await client.encode(reqs[i % len(reqs)])
        for i in range(self.cfg.reps):
            texts = reqs[i % len(reqs)]
            for mode in ("inprocess", "triton") if i % 4 in (0, 3) else ("triton", "inprocess"):
                t0 = time.perf_counter()
                if mode == "triton":
                    await client.encode(texts)
                else:
                    encoder.encode(texts)
                self.times[mode, batch].append(time.perf_counter() - t0)
            # Tokenization alone, as TextEncoder.encode does it (pad to the longest, truncate).
            t0 = time.perf_counter()
            tok(texts, padding=True, truncation=True, max_length=self.cfg.max_length, return_tensors="pt")
            self.tokenize[batch].append(time.perf_counter() - t0)

    def results(self) -> list[dict]:
        rows = []
        for b in self.cfg.batches:
            for mode in ("triton", "inprocess"):
                ts = self.times[mode, b]
                p50, p99 = percentiles_ms(ts)
                rows.append(
                    {"batch": b, "mode": mode, "texts_per_s": round(b / (p50 / 1000.0), 1), "p50_ms": round(p50, 2),
                     "p99_ms": round(p99, 2), "n": len(ts)}  # fmt: skip
                )
        return rows


def run(cfg: BenchConfig) -> dict:
    import torch

    from ranker.encoder import TextEncoder
    from serving.triton.client import EncoderClient
    from serving.triton.process import TritonProcess, TritonWorkerConfig, free_port

    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    worker_threads = cfg.worker_threads if cfg.worker_threads is not None else cfg.threads
    hw = hardware()
    bench = Bench(cfg)
    encoder = TextEncoder("base", max_length=cfg.max_length)
    wcfg = TritonWorkerConfig(
        grpc_port=free_port(), http_port=free_port(), metrics_port=free_port(), model_dir="base",
        max_length=cfg.max_length, threads=worker_threads, max_queue_delay_us=cfg.max_queue_delay_us,
    )  # fmt: skip
    t_start = time.monotonic()
    with TritonProcess(wcfg) as tp:
        log.info("Triton ready after %.1fs", tp.startup_s)

        async def main() -> float:
            async with EncoderClient(tp.grpc_url, max_batch_size=max(cfg.batches)) as client:
                # Quality alongside speed: Triton must return what the in-process encoder does.
                texts = [t for reqs in bench.requests.values() for t in reqs[0]]
                got, want = await client.encode(texts), encoder.encode(texts)
                min_cos = float(np.min(np.sum(got * want, axis=1)))
                for b in cfg.batches:
                    await bench.run_batch(encoder, client, b)
                    log.info("batch %d done (%.0fs)", b, time.monotonic() - t_start)
                return min_cos

        min_cos = asyncio.run(main())
        startup_s = tp.startup_s

    rows = bench.results()
    by = {(r["mode"], r["batch"]): r for r in rows}
    ratios, tokenization = {}, {}
    for b in cfg.batches:
        ratios[f"batch_{b}_triton_over_inprocess_throughput"] = round(
            by["triton", b]["texts_per_s"] / by["inprocess", b]["texts_per_s"], 3
        )
        tok_p50, _ = percentiles_ms(bench.tokenize[b])
        tokenization[f"tokenize_ms_p50_batch{b}"] = round(tok_p50, 3)
        tokenization[f"encode_ms_p50_batch{b}"] = by["inprocess", b]["p50_ms"]
        tokenization[f"tokenize_share_of_encode_batch{b}"] = round(tok_p50 / by["inprocess", b]["p50_ms"], 4)
    hw["loadavg_1m_end"] = round(os.getloadavg()[0], 2)
    hw["triton_worker_torch_threads"] = worker_threads or f"torch default ({torch.get_num_threads()} here)"
    return {
        "bench": "encoder",
        "config": asdict(cfg),
        "hardware": hw,
        "triton_startup_s": round(startup_s or 0.0, 1),
        "min_cosine_triton_vs_inprocess": round(min_cos, 6),
        "results": rows,
        "ratios": ratios,
        "tokenization": tokenization,
        "wall_s": round(time.monotonic() - t_start, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--reps", type=int, default=BenchConfig.reps, help="timed requests per mode and batch")
    p.add_argument("--warmup", type=int, default=BenchConfig.warmup)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads for in-process encoding (default: torch's)")
    p.add_argument("--worker-threads", type=int, default=None, help="torch threads in the Triton worker (default: --threads)")
    p.add_argument("--max-queue-delay-us", type=int, default=BenchConfig.max_queue_delay_us)
    p.add_argument(
        "--omp-wait-policy", choices=["PASSIVE", "ACTIVE", "inherit"], default="PASSIVE",
        help="OMP_WAIT_POLICY for this process and the worker (default PASSIVE; 'inherit' leaves the environment alone)",
    )  # fmt: skip
    a = p.parse_args(argv)
    if a.omp_wait_policy != "inherit":
        # Must precede `import torch` (libgomp reads it once); the Triton worker inherits it.
        # With the default (spinning) policy, 2 threads on 2 busy cores run up to 10x slower than
        # 1 thread, and how much depends on how many OpenMP teams a process has: the worker's
        # (two threads call into torch) throttles its spinning, the bench's single team does not.
        os.environ["OMP_WAIT_POLICY"] = a.omp_wait_policy
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = BenchConfig(
        batches=tuple(a.batches), reps=a.reps, warmup=a.warmup, seed=a.seed,
        threads=a.threads, worker_threads=a.worker_threads, max_queue_delay_us=a.max_queue_delay_us,
    )  # fmt: skip
    print(json.dumps(run(cfg), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
