"""Build what `bench/gpu_check.py` takes to a GPU machine, within its 64 MB: the encoder once, in fp16.

    .venv/bin/python bench/gpu_kit.py [--bundle B | --encoder base] [--out runs/gpu_kit] [--texts 64]

KIT/
  weights.fp16.safetensors  the tensors of the exported fp16 ONNX graph (`semrank export triton --fp16`),
                            each stored once, in the graph's layout (about 46 MB)
  model.onnx                that graph, its initializers pointing into weights.fp16.safetensors
                            (ONNX external data: offset and length in that file), so the graph and
                            torch share the same bytes
  torch_params.json         torch parameter name -> (tensor in the file, transposed or not)
  config.json, tokenizer files   to build the transformer and tokenize with transformers
  reference.safetensors     fp32 embeddings of `--texts` product texts, computed here with
                            `TextEncoder` in fp32 (texts and max_length in its metadata)
  kit.json                  what was built from what, and sizes

The full fp32 weights (91 MB) would not fit beside anything; the fp16 graph (46 MB) and fp16
torch weights (46 MB) would not fit together either. The linear layers' weights sit in the graph
transposed, so torch reads them transposed back (torch_params.json says which).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import struct
import sys
import tempfile
from pathlib import Path

import numpy as np

log = logging.getLogger("gpu_kit")

WEIGHTS = "weights.fp16.safetensors"
GRAPH = "model.onnx"
PARAMS = "torch_params.json"
REFERENCE = "reference.safetensors"
LIMIT_MB = 64


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest() + str(a.dtype) + str(a.shape)


def _safetensors_offsets(path: Path) -> dict[str, tuple[int, int]]:
    """Each tensor's (offset, length) in the file: 8 bytes of header length, the JSON header, the data."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    base = 8 + n
    return {k: (base + v["data_offsets"][0], v["data_offsets"][1] - v["data_offsets"][0])
            for k, v in header.items() if k != "__metadata__"}


def build_kit(model_dir: str, out: Path, max_length: int, n_texts: int, seed: int = 0) -> dict:
    import onnx
    import onnxruntime as ort
    from onnx import external_data_helper, numpy_helper
    from safetensors.numpy import save_file

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from encoder import product_texts

    from ranker.encoder import TextEncoder, encoder_fingerprint, resolve_model_dir
    from serving.triton.onnx_graph import _pooled_module, export_onnx

    src = resolve_model_dir(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        exported = Path(tmp) / "model.onnx"
        kind, dim = export_onnx(src, exported, fp16=True, opset=18, exporter="auto")
        model = onnx.load(str(exported))
    graph = model.graph
    module, _ = _pooled_module(src, fp16=True)
    params = {k.removeprefix("encoder."): v.detach().numpy() for k, v in module.state_dict().items()}

    # Every initializer once, by content; torch parameters found among them as they are or transposed.
    tensors: dict[str, np.ndarray] = {}
    by_digest: dict[str, str] = {}
    init_key: dict[str, str] = {}
    for i, init in enumerate(graph.initializer):
        arr = numpy_helper.to_array(init)
        if arr.nbytes < 1024:  # scalars and small constants stay inside the graph
            continue
        d = _digest(arr)
        key = by_digest.setdefault(d, f"t{i}")
        tensors.setdefault(key, np.ascontiguousarray(arr))
        init_key[init.name] = key
    mapping = {}
    for name, p in params.items():
        for transposed, cand in ((False, p), (True, p.T)):
            key = by_digest.get(_digest(cand)) if cand.ndim <= 2 else None
            if key is not None:
                mapping[name] = {"tensor": key, "transposed": transposed}
                break
        else:  # not in the graph as it is (e.g. folded): store it for torch alone
            key = f"torch.{name}"
            tensors[key] = np.ascontiguousarray(p)
            mapping[name] = {"tensor": key, "transposed": False}
    save_file(tensors, str(out / WEIGHTS), metadata={"source": "semrank gpu_kit", "dtype": "float16"})
    offsets = _safetensors_offsets(out / WEIGHTS)
    for init in graph.initializer:
        key = init_key.get(init.name)
        if key is None:
            continue
        offset, length = offsets[key]
        raw = numpy_helper.to_array(init).tobytes()
        for field in ("float_data", "int32_data", "int64_data", "double_data"):
            init.ClearField(field)
        init.raw_data = raw  # set_external_data wants it there, then it is dropped: the bytes live in WEIGHTS
        external_data_helper.set_external_data(init, WEIGHTS, offset=offset, length=length)
        init.ClearField("raw_data")
        init.data_location = onnx.TensorProto.EXTERNAL
    onnx.save_model(model, str(out / GRAPH))
    (out / PARAMS).write_text(json.dumps(mapping, indent=1) + "\n")
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (src / f).is_file():
            shutil.copy2(src / f, out / f)

    texts = product_texts(n_texts, seed)
    ref = TextEncoder(src, max_length).encode(texts)
    save_file({"embeddings": ref.astype(np.float32)}, str(out / REFERENCE),
              metadata={"texts": json.dumps(texts), "max_length": str(max_length)})
    # The kit's graph must run here before it travels.
    sess = ort.InferenceSession(str(out / GRAPH), providers=["CPUExecutionProvider"])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    batch = tok(texts[:8], padding=True, truncation=True, max_length=max_length, return_tensors="np")
    got = sess.run(None, {"input_ids": batch["input_ids"].astype(np.int64),
                          "attention_mask": batch["attention_mask"].astype(np.int64)})[0]
    cos = float(np.min(np.sum(got * ref[:8], axis=1)))
    sizes = {p.name: round(p.stat().st_size / 2**20, 2) for p in sorted(out.iterdir())}
    info = {"encoder": "base" if str(model_dir) == "base" else Path(model_dir).name,
            "encoder_fingerprint": encoder_fingerprint(src), "exporter": kind, "dim": dim, "max_length": max_length,
            "texts": n_texts, "onnx_min_cosine_here": round(cos, 6), "transposed_params":
            sum(m["transposed"] for m in mapping.values()), "params": len(mapping), "sizes_mb": sizes,
            "total_mb": round(sum(sizes.values()), 2)}
    (out / "kit.json").write_text(json.dumps(info, indent=2) + "\n")
    if info["total_mb"] > LIMIT_MB:
        raise SystemExit(f"the kit is {info['total_mb']} MB, over the {LIMIT_MB} MB that travel with a device run")
    if cos < 0.999:
        raise SystemExit(f"the kit's graph disagrees with the fp32 reference here (min cosine {cos:.6f})")
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--bundle", type=Path, default=None, help="take the bundle's encoder and max_length")
    src.add_argument("--encoder", default="base", help="an encoder directory, or base (default)")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--texts", type=int, default=64, help="reference texts")
    p.add_argument("--out", type=Path, default=Path("runs/gpu_kit"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("onnx_ir").setLevel(logging.WARNING)
    model_dir, max_length = args.encoder, args.max_length
    if args.bundle is not None:
        from ranker.bundle import load_bundle

        b = load_bundle(args.bundle, compile_trees=False)
        model_dir, max_length = b.encoder.resolve(b.path), b.encoder.max_length
    print(json.dumps(build_kit(model_dir, args.out, max_length, args.texts), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
