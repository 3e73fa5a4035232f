"""Export the bundle's text encoder as a Triton model repository (onnxruntime backend).

    REPO/
      README.md                 how a client tokenizes and calls the model
      <name>/config.pbtxt       GPU instance, dynamic batching
      <name>/1/model.onnx       input_ids, attention_mask (INT64 [B, S]) -> embedding (FP32 [B, dim])
      <name>/tokenizer/         the encoder's tokenizer files, byte for byte
      <name>/semrank_export.json  bundle version, encoder source, opset, fp16, max_length, checks
      <name>_cpu/config.pbtxt   the same model on KIND_CPU (Triton wants the file in each model dir)
      <name>_cpu/1/model.onnx   hard link to the GPU file, or an fp32 export when the GPU one is fp16

The graph (pooling and normalisation included, so its output equals `TextEncoder.encode` given
the same tokens) comes from serving/triton/onnx_graph.py and is run through onnxruntime against
the torch model before the repository is written. Tokenization stays with the client (the stock
onnxruntime backend cannot run a Python tokenizer).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


from ranker.encoder_probes import PROBE_FILE, write_probes
from serving.triton.contract import TOKENIZER_FILES, Padding, TokenContract, tokenizer_sha256
from serving.triton.onnx_graph import INPUT_NAMES, OUTPUT_NAME, Exporter, ExportError, check_against_torch, export_onnx

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
VERSION_DIR = "1"
CONFIG_FILE = "config.pbtxt"
META_FILE = "semrank_export.json"
TOKENIZER_DIR = "tokenizer"  # TOKENIZER_FILES are copied when present; tokenizer.json or vocab.txt must exist
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

@dataclass(frozen=True)
class ExportConfig:
    """How to export; everything the repository's config.pbtxt says comes from here."""

    name: str = "encoder_onnx"
    max_batch_size: int = 64
    fp16: bool = False
    opset: int = 18
    max_length: int = 128  # the tokenizer truncation the client must use (EncoderRef.max_length)
    # How clients pad (serving.triton.contract.Padding), per model: on a GPU, few shapes let Triton's
    # dynamic batcher merge requests; on CPU the cost follows the tokens, and "longest" measured best
    # (docs/triton.md, "Padding").
    padding: str = "buckets:16,32,64,128"
    cpu_padding: str = "longest"
    exporter: Exporter = "auto"
    preferred_batch_sizes: tuple[int, ...] = ()  # () -> (max_batch_size // 2, max_batch_size)
    max_queue_delay_us: int = 1000
    gpu_instances: int = 1
    cpu_instances: int = 1
    cpu_variant: bool = True
    verify: bool = True
    overwrite: bool = False

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ValueError(f"name={self.name!r} must be a plain directory name (letters, digits, _ . -)")
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size={self.max_batch_size} must be >= 1")
        if self.opset < 17:
            raise ValueError(f"opset={self.opset} is too old; use 17 or newer")
        if not 1 <= self.max_length <= 512:
            raise ValueError(f"max_length={self.max_length} must be in 1..512 (BERT position embeddings)")
        Padding.parse(self.padding), Padding.parse(self.cpu_padding)  # raise ValueError naming the spec
        if self.exporter not in ("auto", "dynamo", "torchscript"):
            raise ValueError(f"exporter={self.exporter!r}; use 'auto', 'dynamo' or 'torchscript'")
        bad = [b for b in self.preferred_batch_sizes if not 1 <= b <= self.max_batch_size]
        if bad:
            raise ValueError(f"preferred_batch_sizes {bad} must lie in 1..max_batch_size={self.max_batch_size}")
        if self.max_queue_delay_us < 0:
            raise ValueError(f"max_queue_delay_us={self.max_queue_delay_us} must be >= 0")
        if self.gpu_instances < 1 or self.cpu_instances < 1:
            raise ValueError("gpu_instances and cpu_instances must be >= 1")

    @property
    def cpu_name(self) -> str:
        return f"{self.name}_cpu"

    def preferred(self) -> list[int]:
        sizes = self.preferred_batch_sizes or (max(1, self.max_batch_size // 2), self.max_batch_size)
        return sorted(set(sizes))


@dataclass
class ExportResult:
    repo: Path
    model_dirs: list[Path]
    exporter: str
    opset: int
    dim: int
    checks: dict[str, float] = field(default_factory=dict)
    probes: str | None = None  # export_bundle: "written" or "present" (the bundle's encoder_probes.safetensors)


# --------------------------------------------------------------------------- graph


def model_config(cfg: ExportConfig, name: str, kind: str, dim: int, contract: TokenContract | None = None):
    """Triton ModelConfig protobuf for the exported graph on KIND_GPU or KIND_CPU; `contract`'s
    parameters (serving/triton/contract.py) go into its `parameters`, where clients read them."""
    from tritonclient.grpc import model_config_pb2 as mc

    conf = mc.ModelConfig(name=name, platform="onnxruntime_onnx", max_batch_size=cfg.max_batch_size)
    for key, value in (contract.parameters() if contract else {}).items():
        conf.parameters[key].string_value = value
    for inp in INPUT_NAMES:
        conf.input.add(name=inp, data_type=mc.TYPE_INT64, dims=[-1])
    conf.output.add(name=OUTPUT_NAME, data_type=mc.TYPE_FP32, dims=[dim])
    conf.dynamic_batching.preferred_batch_size.extend(cfg.preferred())
    conf.dynamic_batching.max_queue_delay_microseconds = cfg.max_queue_delay_us
    if kind == "gpu":
        conf.instance_group.add(kind=mc.ModelInstanceGroup.KIND_GPU, count=cfg.gpu_instances)
    else:
        conf.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=cfg.cpu_instances)
    return conf


def export_contract(model_dir: str | Path, cfg: ExportConfig) -> TokenContract:
    """The contract the exported model's config promises its clients."""
    from ranker.encoder import encoder_fingerprint

    return TokenContract(cfg.max_length, tokenizer_sha256(model_dir), encoder_fingerprint(model_dir),
                         Padding.parse(cfg.padding))


def _write_config(model_root: Path, conf) -> None:
    from google.protobuf import text_format

    (model_root / CONFIG_FILE).write_text(text_format.MessageToString(conf))


def _copy_tokenizer(model_dir: Path, dest: Path) -> list[str]:
    names = [n for n in TOKENIZER_FILES if (model_dir / n).is_file()]
    if not {"tokenizer.json", "vocab.txt"} & set(names):
        raise ExportError(f"{model_dir} has no tokenizer.json or vocab.txt; the client could not tokenize")
    dest.mkdir(parents=True)
    for n in names:
        shutil.copy2(model_dir / n, dest / n)
    return names


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export_triton_repo(
    model_dir: str | Path, repo: str | Path, cfg: ExportConfig, source: dict[str, Any] | None = None
) -> ExportResult:
    """Export encoder `model_dir` ("base" or a transformers directory) into Triton repository `repo`.

    `source` (bundle version, encoder reference) is recorded in semrank_export.json as given;
    keep machine paths out of it.
    """
    from ranker.encoder import resolve_model_dir

    repo = Path(repo)
    resolved = resolve_model_dir(model_dir)
    targets = [repo / cfg.name] + ([repo / cfg.cpu_name] if cfg.cpu_variant else [])
    existing = [t for t in targets if t.exists()]
    if existing and not cfg.overwrite:
        raise ExportError(f"{', '.join(map(str, existing))} already exist; remove them or pass --overwrite")
    repo.mkdir(parents=True, exist_ok=True)

    # Build beside the repository and move into place: a failed export leaves no half model, and a
    # Triton polling the repository never sees the staging directory.
    with tempfile.TemporaryDirectory(prefix=f".{repo.name}-export-", dir=repo.resolve().parent) as tmp:
        stage = Path(tmp)
        gpu_root = stage / cfg.name
        gpu_file = gpu_root / VERSION_DIR / MODEL_FILE
        kind, dim = export_onnx(resolved, gpu_file, cfg.fp16, cfg.opset, cfg.exporter)
        checks: dict[str, float] = {}
        if cfg.verify:
            checks["min_cosine_vs_torch"] = check_against_torch(gpu_file, resolved, cfg.max_length)
            floor = 0.999 if cfg.fp16 else 0.9999
            if checks["min_cosine_vs_torch"] < floor:
                raise ExportError(
                    f"exported graph disagrees with torch: min cosine {checks['min_cosine_vs_torch']:.6f} < {floor}; "
                    f"try --exporter torchscript or report the torch/transformers versions"
                )
        contract = export_contract(resolved, cfg)
        _write_config(gpu_root, model_config(cfg, cfg.name, "gpu", dim, contract))
        tok_files = _copy_tokenizer(resolved, gpu_root / TOKENIZER_DIR)

        cpu_fp16 = None
        if cfg.cpu_variant:
            cpu_root = stage / cfg.cpu_name
            cpu_file = cpu_root / VERSION_DIR / MODEL_FILE
            if cfg.fp16:
                # onnxruntime's CPU provider has few fp16 kernels (it casts around them): export fp32.
                export_onnx(resolved, cpu_file, False, cfg.opset, kind)
                cpu_fp16 = False
            else:
                _link_or_copy(gpu_file, cpu_file)
                cpu_fp16 = False
            cpu_contract = replace(contract, padding=Padding.parse(cfg.cpu_padding))
            _write_config(cpu_root, model_config(cfg, cfg.cpu_name, "cpu", dim, cpu_contract))

        meta = {
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **(source or {"encoder": {"model_dir": _describe(model_dir)}}),
            "model_name": cfg.name,
            "cpu_model_name": cfg.cpu_name if cfg.cpu_variant else None,
            "exporter": kind,
            "opset": cfg.opset,
            "fp16": cfg.fp16,
            "cpu_variant_fp16": cpu_fp16,
            "max_length": cfg.max_length,
            "contract": contract.parameters(),
            "embedding_dim": dim,
            "inputs": {n: "INT64 [batch, sequence]" for n in INPUT_NAMES},
            "output": {OUTPUT_NAME: f"FP32 [batch, {dim}], unit norm"},
            "pooling": "attention-mask mean, then L2 normalise (inside the graph)",
            "tokenizer_files": tok_files,
            "model_sha256": _sha256(gpu_file),
            "checks": checks,
            "config": {k: v for k, v in asdict(cfg).items() if k not in ("overwrite", "verify")},
            "versions": _versions(),
        }
        (gpu_root / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")

        for t in targets:
            if t.exists():
                shutil.rmtree(t)
            os.replace(stage / t.name, t)
    (repo / "README.md").write_text(render_readme(cfg, dim, meta))
    log.info("Triton repository written to %s (models %s)", repo, [t.name for t in targets])
    return ExportResult(repo=repo, model_dirs=targets, exporter=kind, opset=cfg.opset, dim=dim, checks=checks)


def export_bundle(bundle_dir: str | Path, repo: str | Path, cfg: ExportConfig) -> ExportResult:
    """Export the encoder a bundle references ("base" or a path relative to the bundle)."""
    from ranker.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    ref = bundle.encoder
    if cfg.max_length != ref.max_length:
        log.info("using the bundle's max_length=%d (not %d)", ref.max_length, cfg.max_length)
        cfg = ExportConfig(**{**asdict(cfg), "max_length": ref.max_length})
    source = {"bundle_version": bundle.version, "encoder": {"model_dir": ref.model_dir, "base_model": ref.base_model}}
    result = export_triton_repo(ref.resolve(bundle.path), repo, cfg, source=source)
    # The reference a service checks this model against (ranker.encoder_probes): made here, where
    # torch is loaded, so that the service never needs it.
    written = write_probes(bundle.path)
    result.probes = "written" if written else "present"
    log.info("probe embeddings %s in the bundle (%s)", result.probes, PROBE_FILE)
    return result


def _describe(model_dir: str | Path) -> str:
    """"base", or only the directory's name: no machine paths in the repository."""
    return "base" if str(model_dir) == "base" else Path(model_dir).name


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "transformers", "onnx", "onnxruntime"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def render_readme(cfg: ExportConfig, dim: int, meta: dict[str, Any]) -> str:
    cpu = (
        f"- `{cfg.cpu_name}/`: the same graph (fp32) on `KIND_CPU`, for hosts without a GPU. Load one of the two.\n"
        if cfg.cpu_variant
        else ""
    )
    return f"""# semrank text encoder for Triton (onnxruntime backend)

Exported by `semrank export triton` ({meta['exporter']} exporter, opset {cfg.opset}, fp16={cfg.fp16});
details in `{cfg.name}/{META_FILE}`.

- `{cfg.name}/`: `{MODEL_FILE}` on `KIND_GPU`, dynamic batching (preferred {cfg.preferred()},
  max queue delay {cfg.max_queue_delay_us} us, max_batch_size {cfg.max_batch_size}).
{cpu}- `{cfg.name}/{TOKENIZER_DIR}/`: the tokenizer (Triton logs "ignore version directory 'tokenizer'" and
  skips it: only numeric directories are model versions).

Serve: `tritonserver --model-repository=<this dir> --model-control-mode=explicit --load-model={cfg.name}`.

## Calling it

The graph takes token ids, not strings. Tokenize exactly as the ranker did in training:
lower-casing WordPiece from `{cfg.name}/{TOKENIZER_DIR}/`, `[CLS] ... [SEP]`, truncation at
**max_length={cfg.max_length}** tokens, padding with 0 and `attention_mask` 0 on padding.

| tensor | type | shape |
|---|---|---|
| `input_ids` | INT64 | [batch, sequence], batch <= {cfg.max_batch_size} |
| `attention_mask` | INT64 | [batch, sequence] |
| `{OUTPUT_NAME}` | FP32 | [batch, {dim}], unit L2 norm (mean pooling is in the graph) |

```python
import numpy as np, tritonclient.grpc as grpcclient
from transformers import AutoTokenizer

tok = AutoTokenizer.from_pretrained("{cfg.name}/{TOKENIZER_DIR}")
batch = tok(texts, padding="longest", truncation=True, max_length={cfg.max_length}, return_tensors="np")
# ...then pad the rows as the model's semrank_padding says (below)
inputs = []
for name in ("input_ids", "attention_mask"):
    arr = batch[name].astype(np.int64)
    inputs.append(grpcclient.InferInput(name, list(arr.shape), "INT64"))
    inputs[-1].set_data_from_numpy(arr)
emb = grpcclient.InferenceServerClient("localhost:8001").infer("{cfg.name}", inputs).as_numpy("{OUTPUT_NAME}")
```

## The contract in `config.pbtxt`

Each model's `parameters` say what a client must agree with: `semrank_contract` (tokens-v1),
`semrank_max_length`, `semrank_tokenizer_sha256`, `semrank_encoder_fingerprint` and
`semrank_padding` ({cfg.padding} for `{cfg.name}`, {cfg.cpu_padding} for the CPU model).
Triton's dynamic batcher only merges requests whose shapes match: `max_length` makes one shape,
`longest` computes least, `buckets:...` rounds the longest row up to the next size. Embeddings
are the same either way. `semrank serve --triton-url` reads these parameters and checks them,
and the bundle's probe embeddings, before it serves (docs/triton.md in the semrank repository).
"""
