"""An EMULATION of the exported ONNX model on Triton, for tests and benches on machines without the
onnxruntime backend.

pytriton's bundled `tritonserver` has only the Python backend, so the production model
(`semrank export triton`: platform onnxruntime_onnx) cannot be loaded here. This serves the same
model as a Python-backend model through pytriton: the exported `config.pbtxt`'s name, inputs,
outputs, max_batch_size, dynamic batching and `parameters` (the client's contract), and the
exported `model.onnx` run by onnxruntime inside. A client cannot tell it from the real thing by
its config; it is slower (pytriton's proxy), and it is never what production runs.

`python -m serving.triton.worker --emulate-onnx REPO/encoder_onnx ...` serves it (`TritonProcess`
with `TritonWorkerConfig(onnx_model=...)`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def read_config(model_root: str | Path):
    """The exported model's `config.pbtxt` as Triton's ModelConfig protobuf."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    return text_format.Parse((Path(model_root) / "config.pbtxt").read_text(), mc.ModelConfig())


def _with_parameters(name: str, params: dict[str, str]) -> None:
    """Make pytriton write `params` into model `name`'s generated config, as the export wrote them
    into config.pbtxt (pytriton has no setting for a model's parameters)."""
    from pytriton.models import model as pt_model

    original = pt_model.Model._get_triton_model_config

    def patched(self):
        conf = original(self)
        if self.model_name == name:
            conf.backend_parameters.update(params)
        return conf

    pt_model.Model._get_triton_model_config = patched


def bind(triton, model_root: str | Path, threads: int | None = None) -> str:
    """Bind the emulation of the exported model at `model_root` (REPO/<name>) to a pytriton `Triton`;
    returns the model's name."""
    import onnxruntime as ort
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor

    model_root = Path(model_root)
    conf = read_config(model_root)
    if conf.platform != "onnxruntime_onnx":
        raise ValueError(f"{model_root}: platform {conf.platform!r}, not an exported onnxruntime model")
    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model_root / "1" / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    out_name = conf.output[0].name
    dim = int(conf.output[0].dims[-1])

    @batch
    def infer(input_ids: np.ndarray, attention_mask: np.ndarray) -> dict[str, np.ndarray]:
        emb = session.run([out_name], {"input_ids": input_ids.astype(np.int64, copy=False),
                                       "attention_mask": attention_mask.astype(np.int64, copy=False)})[0]
        return {out_name: emb.astype(np.float32, copy=False)}

    session.run([out_name], {"input_ids": np.ones((1, 4), np.int64), "attention_mask": np.ones((1, 4), np.int64)})
    _with_parameters(conf.name, {k: v.string_value for k, v in conf.parameters.items()})
    batching = conf.dynamic_batching
    triton.bind(
        model_name=conf.name,
        infer_func=infer,
        inputs=[Tensor(name=i.name, dtype=np.int64, shape=(-1,)) for i in conf.input],
        outputs=[Tensor(name=out_name, dtype=np.float32, shape=(dim,))],
        config=ModelConfig(
            max_batch_size=conf.max_batch_size,
            batcher=DynamicBatcher(max_queue_delay_microseconds=batching.max_queue_delay_microseconds,
                                   preferred_batch_size=list(batching.preferred_batch_size) or None),
        ),
        strict=True,
    )
    log.info("EMULATION of %s (onnxruntime in a Python-backend model) bound as %r", model_root.name, conf.name)
    return conf.name
