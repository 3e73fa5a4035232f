"""`semrank export triton`: write the encoder as a Triton model repository (see serving/triton/export.py)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from featurizer.errors import ConfigError

log = logging.getLogger(__name__)


def cmd_export_triton(args) -> int:
    from serving.triton.export import ExportConfig, export_bundle, export_triton_repo

    # The ONNX exporter's optimiser logs every folded initializer at INFO.
    logging.getLogger("onnx_ir").setLevel(logging.WARNING)
    if args.bundle is not None and args.max_length is not None:
        raise ConfigError("--max-length goes with --encoder; a bundle's encoder uses its own max_length")
    try:
        cfg = _config(ExportConfig, args)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if args.bundle is not None:
        result = export_bundle(args.bundle, args.out, cfg)
    else:
        result = export_triton_repo(args.encoder, args.out, cfg)
    summary = {
        "repo": str(result.repo),
        "models": [p.name for p in result.model_dirs],
        "exporter": result.exporter,
        "opset": result.opset,
        "embedding_dim": result.dim,
        "checks": result.checks,
    }
    if result.probes is not None:
        summary["bundle_probes"] = result.probes
    print(json.dumps(summary, indent=2))
    return 0


def _config(ExportConfig, args):
    return ExportConfig(
        name=args.name,
        max_batch_size=args.max_batch_size,
        fp16=args.fp16,
        opset=args.opset,
        exporter=args.exporter,
        preferred_batch_sizes=tuple(args.preferred_batch_size or ()),
        max_queue_delay_us=args.max_queue_delay_us,
        cpu_variant=not args.no_cpu_variant,
        verify=not args.no_verify,
        overwrite=args.overwrite,
        padding=args.padding,
        cpu_padding=args.cpu_padding,
        **({"max_length": args.max_length} if args.max_length is not None else {}),
    )


def register(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser("export", help="export models for other runtimes").add_subparsers(dest="export_cmd", required=True)
    s = export.add_parser(
        "triton",
        help="write the bundle's encoder as a Triton model repository (ONNX, onnxruntime backend)",
        description="Export the text encoder (mean pooling and L2 normalisation inside the graph) to "
        "REPO/<name>/1/model.onnx with a GPU config.pbtxt, a <name>_cpu variant, the tokenizer and a README.",
    )
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--bundle", type=Path, help="bundle directory (its manifest names the encoder)")
    src.add_argument("--encoder", help="encoder directory, or 'base' for the pretrained all-MiniLM-L6-v2")
    s.add_argument("--out", required=True, type=Path, help="Triton model repository to write into")
    s.add_argument("--name", default="encoder_onnx", help="model name (default encoder_onnx)")
    s.add_argument("--fp16", action="store_true", help="fp16 weights for the GPU model (inputs INT64, output FP32)")
    s.add_argument("--max-batch-size", type=int, default=64)
    s.add_argument("--preferred-batch-size", type=int, action="append", help="repeatable (default: max/2 and max)")
    s.add_argument("--max-queue-delay-us", type=int, default=1000, help="dynamic batching delay (default 1000)")
    s.add_argument("--max-length", type=int, default=None, help="tokenizer truncation with --encoder (default 128; a bundle uses its own)")
    s.add_argument("--padding", default="buckets:16,32,64,128",
                   help="how clients pad token rows for the GPU model, written into its config.pbtxt: max_length, "
                        "longest, or buckets:16,32,64,128 (default; docs/triton.md has the measurement)")
    s.add_argument("--cpu-padding", default="longest", help="the same for the <name>_cpu model (default longest)")
    s.add_argument("--opset", type=int, default=18)
    s.add_argument("--exporter", choices=["auto", "dynamo", "torchscript"], default="auto", help="default: dynamo, falling back to torchscript")
    s.add_argument("--no-cpu-variant", action="store_true", help="skip the <name>_cpu model")
    s.add_argument("--no-verify", action="store_true", help="skip the onnxruntime-vs-torch check")
    s.add_argument("--overwrite", action="store_true", help="replace existing model directories of the same names")
    s.set_defaults(func=cmd_export_triton)
