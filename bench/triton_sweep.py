"""A Triton load sweep, as perf_analyzer reports one: concurrency 1, 4 and 16 against both encoder models.

    .venv/bin/python bench/triton_sweep.py [--seconds 4] [--concurrency 1 4 16] [--batches 1 8]
                                           [--paddings max_length longest buckets] [--threads 2] [--out DIR]

Models, both on a real `tritonserver` on this machine's CPU:
- `encoder`: the development worker (serving/triton/worker.py): strings in, torch inside;
- `encoder_onnx`: the exported model (`semrank export triton`) under the EMULATION of the
  onnxruntime backend (serving/triton/onnx_emulation.py), called through semrank's client with
  the token-id contract, once per padding policy (the client pads; Triton batches only equal shapes).
The baseline, in the same run: onnxruntime in this process on the same model.onnx and the same
requests (padded to the longest text), at the same concurrency (one thread per stream; onnxruntime
releases the GIL).

Each cell is closed-loop: `concurrency` streams each send a request of `batch` product texts and
wait for it, for `--seconds`. Reported per cell, as perf_analyzer does: requests/s and texts/s,
p50 / p90 / p99 latency. The PyPI package `perf-analyzer` is a placeholder here, hence this
driver; docs/triton.md gives the perf_analyzer command for a GPU host. Prints one JSON object and
writes triton_sweep.json and triton_sweep.png to --out (default runs/triton_sweep).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from encoder import product_texts  # bench/ is sys.path[0]
from machine import machine

log = logging.getLogger("triton_sweep")


def stats(latencies: list[float], wall_s: float, batch: int) -> dict:
    ms = np.asarray(latencies) * 1000.0
    n = len(latencies)
    return {"requests": n, "requests_per_s": round(n / wall_s, 1), "texts_per_s": round(n * batch / wall_s, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 2), "p90_ms": round(float(np.percentile(ms, 90)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2)}


def request_texts(pool: list[str], batch: int, n: int, seed: int) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    return [list(rng.choice(pool, size=batch, replace=False)) for _ in range(n)]


async def closed_loop(call, requests: list[list[str]], concurrency: int, seconds: float) -> tuple[list[float], float]:
    """`concurrency` streams calling `await call(texts)` back to back for `seconds`."""
    latencies: list[float] = []
    stop = time.perf_counter() + seconds

    async def stream(k: int) -> None:
        i = k
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            await call(requests[i % len(requests)])
            latencies.append(time.perf_counter() - t0)
            i += concurrency

    t0 = time.perf_counter()
    await asyncio.gather(*(stream(k) for k in range(concurrency)))
    return latencies, time.perf_counter() - t0


def threaded_loop(call, requests: list[list[str]], concurrency: int, seconds: float) -> tuple[list[float], float]:
    latencies: list[float] = []
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def stream(k: int) -> None:
        i = k
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            call(requests[i % len(requests)])
            dt = time.perf_counter() - t0
            with lock:
                latencies.append(dt)
            i += concurrency

    t0 = time.perf_counter()
    threads = [threading.Thread(target=stream, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, time.perf_counter() - t0


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(2, len(batches), figsize=(6 * len(batches), 8), squeeze=False)
    for col, b in enumerate(batches):
        series: dict[str, list[dict]] = {}
        for r in rows:
            if r["batch"] == b:
                series.setdefault(r["label"], []).append(r)
        for label, rs in series.items():
            rs = sorted(rs, key=lambda r: r["concurrency"])
            xs = [r["concurrency"] for r in rs]
            axes[0][col].plot(xs, [r["texts_per_s"] for r in rs], marker="o", label=label)
            axes[1][col].plot(xs, [r["p99_ms"] for r in rs], marker="o", label=label)
        for row, what in enumerate(("texts/s", "p99 ms")):
            ax = axes[row][col]
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrency")
            ax.set_ylabel(what)
            ax.set_title(f"batch {b}: {what}")
            ax.grid(alpha=0.3)
        axes[0][col].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=4.0, help="per cell")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="texts per request")
    p.add_argument("--paddings", nargs="+", default=["max_length", "longest", "buckets:16,32,64,128"])
    p.add_argument("--threads", type=int, default=2, help="onnxruntime/torch intra-op threads, Triton and in-process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/triton_sweep"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see docs/triton.md: spinning OpenMP threads on shared cores

    import onnxruntime as ort

    from serving.triton.client import EncoderClient
    from serving.triton.contract import ClientTokenizer, Padding, read_signature
    from serving.triton.export import ExportConfig, export_triton_repo
    from serving.triton.onnx_emulation import read_config
    from serving.triton.process import TritonProcess, free_port
    from serving.triton.worker import TritonWorkerConfig

    def ports() -> dict:
        return {"grpc_port": free_port(), "http_port": free_port(), "metrics_port": free_port()}

    pool = product_texts(4000, args.seed)
    requests = {b: request_texts(pool, b, 256, args.seed + b) for b in args.batches}
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="triton-sweep-") as tmp:
        repo = Path(tmp) / "repo"
        export_triton_repo("base", repo, ExportConfig(cpu_variant=False, max_batch_size=64))
        model_root = repo / "encoder_onnx"
        from google.protobuf.json_format import MessageToDict

        sig = read_signature(MessageToDict(read_config(model_root), preserving_proto_field_name=True), "encoder_onnx")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        session = ort.InferenceSession(str(model_root / "1" / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        longest = ClientTokenizer("base", replace(sig.tokens, padding=Padding.parse("longest")))

        def inprocess(texts: list[str]) -> None:
            ids, mask = longest(texts)
            session.run(None, {"input_ids": ids, "attention_mask": mask})

        with TritonProcess(TritonWorkerConfig(**ports(), threads=args.threads)) as dev, \
                TritonProcess(TritonWorkerConfig(**ports(), model_name="encoder_onnx", onnx_model=str(model_root),
                                                 threads=args.threads)) as emu:
            async def sweep() -> None:
                clients = {"encoder (dev worker, strings)": EncoderClient(dev.grpc_url, "encoder", timeout_s=120)}
                for spec in args.paddings:
                    tok = ClientTokenizer("base", replace(sig.tokens, padding=Padding.parse(spec)))
                    clients[f"encoder_onnx EMULATION, pad {spec}"] = EncoderClient(emu.grpc_url, "encoder_onnx",
                                                                                  timeout_s=120, tokenizer=tok)
                for b in args.batches:
                    for c in args.concurrency:
                        for label, client in clients.items():
                            await client.encode(requests[b][0])  # warm
                            lat, wall = await closed_loop(client.encode, requests[b], c, args.seconds)
                            rows.append({"label": label, "batch": b, "concurrency": c, **stats(lat, wall, b)})
                            log.info("%s", rows[-1])
                        inprocess(requests[b][0])
                        lat, wall = threaded_loop(inprocess, requests[b], c, args.seconds)
                        rows.append({"label": "in-process onnxruntime (baseline)", "batch": b, "concurrency": c,
                                     **stats(lat, wall, b)})
                        log.info("%s", rows[-1])
                for client in clients.values():
                    await client.close()

            asyncio.run(sweep())
    base = {(r["batch"], r["concurrency"]): r["texts_per_s"] for r in rows if r["label"].startswith("in-process")}
    for r in rows:
        r["vs_in_process"] = round(r["texts_per_s"] / base[r["batch"], r["concurrency"]], 3)
    import onnxruntime

    report = {"bench": "triton_sweep", "machine": {**machine(), "onnxruntime": onnxruntime.__version__,
                                                   "loadavg_1m_end": round(os.getloadavg()[0], 2)},
              "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "note": "encoder_onnx is an EMULATION (onnxruntime inside a Python-backend model), never production",
              "rows": rows}
    (args.out / "triton_sweep.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(rows, args.out / "triton_sweep.png")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
