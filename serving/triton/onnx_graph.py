"""The bundle's text encoder as one ONNX graph: (input_ids, attention_mask) INT64 [B, S] -> embedding FP32 [B, dim].

Mean pooling over the attention mask and the L2 normalisation are part of the graph, so the
output equals `TextEncoder.encode` given the same tokens. The graph comes from the dynamo
exporter (`torch.onnx.export(dynamo=True)` with dynamic batch and sequence dimensions); if that
fails, from the TorchScript exporter (`dynamo=False`). Each export is checked with
onnx.checker; `check_against_torch` runs it through onnxruntime on CPU against the torch model.
serving/triton/export.py writes the Triton model repository around it.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Literal

import numpy as np

from featurizer.errors import SemrankError

log = logging.getLogger(__name__)

INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "embedding"
# Texts for the onnxruntime-vs-torch check: one word, punctuation, long (truncated) text.
CHECK_TEXTS = (
    "a",
    "red running shoes for men",
    "Stainless steel water bottle, 1 L - keeps drinks cold for 24 h!",
    "children's winter jacket with hood, waterproof and warm, sizes 4 to 12 years " * 12,
)

Exporter = Literal["auto", "dynamo", "torchscript"]


class ExportError(SemrankError, RuntimeError):
    """The encoder could not be exported, or the exported graph does not match torch."""

    grpc_code = "FAILED_PRECONDITION"
    reason = "EXPORT_FAILED"


def _pooled_module(model_dir: Path, fp16: bool):
    """BertModel + mask-mean-pool + L2 normalise, taking (input_ids, attention_mask) only."""
    import torch
    from transformers import AutoModel

    from ranker.encoder import mean_pool

    base = AutoModel.from_pretrained(model_dir, local_files_only=True).eval()
    if fp16:
        base = base.half()

    class PooledEncoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = base

        def forward(self, input_ids, attention_mask):
            # Single-segment input: token_type_ids are zeros, as the tokenizer returns them.
            hidden = self.encoder(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=torch.zeros_like(input_ids)
            ).last_hidden_state
            # Pool in fp32 even for an fp16 graph: the output stays FP32 and the sum is exact enough.
            return mean_pool(hidden.float(), attention_mask)

    return PooledEncoder().eval(), int(base.config.hidden_size)


def _example_inputs(tokenizer):
    # Batch 2 and a sequence longer than 2: torch.export specialises dimensions of size 0/1.
    batch = tokenizer(["red shoes", "a stainless steel water bottle"], padding=True, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


def _export_dynamo(module, args, opset: int):
    import torch

    batch = torch.export.Dim("batch", min=1)
    seq = torch.export.Dim("sequence", min=1, max=512)
    shapes = {name: {0: batch, 1: seq} for name in INPUT_NAMES}
    # No output_names: given "embedding", the dynamo exporter keeps that name on the embedding
    # lookup's output as well and writes an invalid graph (pytorch/pytorch#158094). Renamed below.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*shares the same shape constraints.*")
        program = torch.onnx.export(
            module, args, None, input_names=list(INPUT_NAMES), dynamic_shapes=shapes,
            opset_version=opset, dynamo=True, verbose=False,
        )  # fmt: skip
    model = program.model_proto
    _rename_output(model, OUTPUT_NAME)
    return model


def _export_torchscript(module, args, opset: int, dim: int):
    import io

    import onnx
    import torch

    buf = io.BytesIO()
    axes = {name: {0: "batch", 1: "sequence"} for name in INPUT_NAMES}
    axes[OUTPUT_NAME] = {0: "batch"}
    torch.onnx.export(
        module, args, buf, input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
        dynamic_axes=axes, opset_version=opset, dynamo=False,
    )  # fmt: skip
    model = onnx.load_from_string(buf.getvalue())
    out_dims = model.graph.output[0].type.tensor_type.shape.dim
    out_dims[1].Clear()
    out_dims[1].dim_value = dim  # the tracer leaves it symbolic
    return model


def _rename_output(model, new: str) -> None:
    """Name the single graph output `new`, first renaming any other value that already has it.

    Top-level graph only: the encoder graph has no subgraphs (If/Loop bodies).
    """
    graph = model.graph
    old = graph.output[0].name
    if old == new:
        return
    taken = {v for n in graph.node for v in (*n.input, *n.output)} | {i.name for i in graph.initializer}
    if new in taken:
        spare = f"{new}__internal"
        while spare in taken:
            spare += "_"
        _rename_value(graph, new, spare)
    _rename_value(graph, old, new)


def _rename_value(graph, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if v == old else v for v in node.input]
        node.output[:] = [new if v == old else v for v in node.output]
    for seq in (graph.input, graph.output, graph.value_info, graph.initializer):
        for item in seq:
            if item.name == old:
                item.name = new


def export_onnx(model_dir: str | Path, out_file: Path, fp16: bool, opset: int, exporter: Exporter = "auto") -> tuple[str, int]:
    """Write the pooled encoder graph to out_file; returns (exporter used, embedding dim)."""
    import onnx
    import torch
    from transformers import AutoTokenizer

    from ranker.encoder import resolve_model_dir

    model_dir = resolve_model_dir(model_dir)
    module, dim = _pooled_module(model_dir, fp16)
    args = _example_inputs(AutoTokenizer.from_pretrained(model_dir, local_files_only=True))
    errors = []
    model = None
    with torch.inference_mode(False), torch.no_grad():
        for kind in ("dynamo", "torchscript") if exporter == "auto" else (exporter,):
            try:
                model = _export_dynamo(module, args, opset) if kind == "dynamo" else _export_torchscript(module, args, opset, dim)
                break
            except Exception as e:  # the exporters raise many types; we report and fall back
                log.warning("%s ONNX export failed: %s: %s", kind, type(e).__name__, e)
                errors.append(f"{kind}: {type(e).__name__}: {e}")
    if model is None:
        hint = "report the torch/transformers versions" if exporter == "auto" else "try --exporter auto"
        raise ExportError(f"could not export {model_dir} to ONNX ({'; '.join(errors)}); {hint}")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, out_file, save_as_external_data=False)  # < 2 GB: one self-contained file
    try:
        onnx.checker.check_model(str(out_file), full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"the {kind} exporter wrote an invalid ONNX graph ({e}); try the other --exporter") from e
    log.info("exported %s (%s exporter, opset %d, fp16=%s) to %s", model_dir, kind, opset, fp16, out_file)
    return kind, dim


def onnx_embed(session, tokenizer, texts: list[str], max_length: int) -> np.ndarray:
    """Embeddings from an onnxruntime session of the exported graph (the client's side of the contract)."""
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="np")
    feeds = {name: batch[name].astype(np.int64) for name in INPUT_NAMES}
    return session.run([OUTPUT_NAME], feeds)[0]


def check_against_torch(onnx_file: Path, model_dir: str | Path, max_length: int, texts=CHECK_TEXTS, encoder=None) -> float:
    """Minimum cosine between onnxruntime (CPU) and TextEncoder.encode over `texts`."""
    import onnxruntime as ort

    from ranker.encoder import TextEncoder

    enc = encoder if encoder is not None else TextEncoder(model_dir, max_length=max_length)
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    got = onnx_embed(session, enc.tokenizer, list(texts), max_length)
    want = enc.encode(list(texts))
    cos = np.sum(got * want, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    return float(cos.min())
