"""The encoder on a GPU: texts/s by batch and precision, parity with the fp32 reference, and the
exported ONNX graph under onnxruntime. Standalone, for a GPU machine with no network.

    python bench/gpu_check.py --kit runs/gpu_kit [--out gpu_check.json] [--device auto|cuda|cpu]
                              [--dtypes fp16 bf16 fp32] [--batches 1 8 32 128] [--seconds 3] [--budget-s 200]

It imports only torch, transformers, safetensors, numpy and onnxruntime, never semrank: the kit
(`bench/gpu_kit.py`, about 45 MB) carries the fp16 weights, the tokenizer, the fp16 ONNX graph
(sharing the weights' bytes) and fp32 reference embeddings computed on the CPU that built it.

- Throughput: for each precision and batch, requests of `batch` texts back to back for `--seconds`
  (after a warm-up), synchronised; texts/s = batch x requests / wall, with p50 / p99 per request.
- Parity: the reference texts embedded at each precision against the fp32 reference (min cosine;
  bounds 0.999 for fp32 and fp16, 0.99 for bf16, whose mantissa is 8 bits).
- ONNX: the kit's graph on onnxruntime's CPU provider (the GPU machine's onnxruntime is CPU-only),
  against the same reference.
Cells left when `--budget-s` is spent are reported as skipped, so a run always ends with its JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

BOUNDS = {"fp32": 0.999, "fp16": 0.999, "bf16": 0.99}


def load_reference(kit: Path) -> tuple[list[str], np.ndarray, int]:
    from safetensors import safe_open

    with safe_open(str(kit / "reference.safetensors"), framework="np") as f:
        meta = f.metadata()
        emb = f.get_tensor("embeddings")
    return json.loads(meta["texts"]), emb.astype(np.float32), int(meta["max_length"])


def load_model(kit: Path, device: str, dtype):
    """BertModel from the kit's config, its weights read from the kit (transposed back where the graph
    holds them transposed)."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(str(kit))
    model = AutoModel.from_config(config)
    mapping = json.loads((kit / "torch_params.json").read_text())
    state = {}
    with safe_open(str(kit / "weights.fp16.safetensors"), framework="pt") as f:
        for name, where in mapping.items():
            t = f.get_tensor(where["tensor"])
            state[name] = t.T.contiguous() if where["transposed"] else t
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith(("position_ids", "token_type_ids"))]  # buffers, not weights
    if missing or unexpected:
        raise SystemExit(f"the kit's weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(device=device, dtype=dtype).eval()


def embed(model, tokenizer, texts: list[str], max_length: int, device: str):
    import torch

    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt").to(device)
    with torch.inference_mode():
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       token_type_ids=torch.zeros_like(batch["input_ids"])).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden.float() * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=1)


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.min(np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def throughput(model, tokenizer, texts: list[str], batch: int, max_length: int, device: str, seconds: float) -> dict:
    import torch

    reqs = [[texts[(i * batch + j) % len(texts)] for j in range(batch)] for i in range(8)]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for r in reqs[:3]:
        embed(model, tokenizer, r, max_length, device)
    sync()
    lat = []
    t_start = time.perf_counter()
    while time.perf_counter() - t_start < seconds or len(lat) < 3:
        t0 = time.perf_counter()
        embed(model, tokenizer, reqs[len(lat) % len(reqs)], max_length, device)
        sync()
        lat.append(time.perf_counter() - t0)
    wall = time.perf_counter() - t_start
    ms = np.asarray(lat) * 1000
    return {"requests": len(lat), "texts_per_s": round(batch * len(lat) / wall, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3)}


def check_onnx(kit: Path, tokenizer, texts: list[str], reference: np.ndarray, max_length: int) -> dict:
    import onnxruntime as ort

    t0 = time.perf_counter()
    sess = ort.InferenceSession(str(kit / "model.onnx"), providers=["CPUExecutionProvider"])
    n = min(16, len(texts))
    batch = tokenizer(texts[:n], padding=True, truncation=True, max_length=max_length, return_tensors="np")
    got = sess.run(None, {"input_ids": batch["input_ids"].astype(np.int64),
                          "attention_mask": batch["attention_mask"].astype(np.int64)})[0]
    cos = min_cosine(got, reference[:n])
    return {"onnxruntime": ort.__version__, "providers_available": ort.get_available_providers(), "texts": n,
            "min_cosine": round(cos, 6), "bound": 0.999, "ok": cos >= 0.999, "seconds": round(time.perf_counter() - t0, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kit", type=Path, required=True)
    p.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    p.add_argument("--device", default="auto", help="auto (cuda when there is one), cuda or cpu")
    p.add_argument("--dtypes", nargs="+", default=["fp16", "bf16", "fp32"], choices=sorted(BOUNDS))
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128])
    p.add_argument("--seconds", type=float, default=3.0, help="timed seconds per (precision, batch)")
    p.add_argument("--budget-s", type=float, default=200.0, help="skip the cells left after this many seconds")
    args = p.parse_args(argv)
    t_begin = time.perf_counter()

    import torch
    import transformers
    from transformers import AutoTokenizer

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    texts, reference, max_length = load_reference(args.kit)
    tokenizer = AutoTokenizer.from_pretrained(str(args.kit))
    report = {
        "bench": "gpu_check", "device": device,
        "device_name": torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
        "python": platform.python_version(), "max_length": max_length, "kit": json.loads((args.kit / "kit.json").read_text()),
        "precisions": {}, "skipped": [],
    }
    for name in args.dtypes:
        model = load_model(args.kit, device, dtypes[name])
        got = embed(model, tokenizer, texts, max_length, device).float().cpu().numpy()
        cos = min_cosine(got, reference)
        entry = {"parity": {"min_cosine": round(cos, 6), "bound": BOUNDS[name], "ok": cos >= BOUNDS[name]}, "batches": {}}
        for b in args.batches:
            if time.perf_counter() - t_begin > args.budget_s:
                report["skipped"].append(f"{name} batch {b}")
                continue
            entry["batches"][str(b)] = throughput(model, tokenizer, texts, b, max_length, device, args.seconds)
            print(name, b, entry["batches"][str(b)], file=sys.stderr, flush=True)
        report["precisions"][name] = entry
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    report["onnx_cpu"] = check_onnx(args.kit, tokenizer, texts, reference, max_length)
    report["ok"] = report["onnx_cpu"]["ok"] and all(e["parity"]["ok"] for e in report["precisions"].values())
    report["seconds"] = round(time.perf_counter() - t_begin, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
