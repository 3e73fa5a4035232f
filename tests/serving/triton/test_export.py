"""`semrank export triton`: the ONNX graph equals the torch encoder, the repository is a valid Triton one.

The graph runs through onnxruntime's CPU provider here; pytriton's bundled tritonserver ships only
the Python backend, so loading the repository into a real Triton is checked on a GPU machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from ranker.encoder import EMBEDDING_DIM
from serving.triton.export import (
    CONFIG_FILE,
    META_FILE,
    MODEL_FILE,
    ExportConfig,
    ExportError,
    export_triton_repo,
)
from serving.triton.onnx_graph import _rename_output, onnx_embed

pytestmark = pytest.mark.timeout(300)

TEXTS = [
    "red running shoes for men",
    "a",
    "Stainless steel water bottle, 1 L - keeps drinks cold for 24 h!",
    "wireless noise cancelling headphones with 30 h battery",
    # Longer than max_length tokens: truncation must match.
    "children's winter jacket with hood, waterproof and warm, sizes 4 to 12 years, " * 10,
    "organic green tea, 100 bags",
    "USB-C charging cable 2 m, braided",
]


def cosines(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    return np.sum(got * want, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))


def parse_config(path: Path):
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("triton_repo")
    # verify=False: the tests below do the same comparison, with more texts.
    export_triton_repo("base", out, ExportConfig(verify=False, max_batch_size=32))
    return out


@pytest.fixture(scope="module")
def ort_session(repo) -> ort.InferenceSession:
    return session(repo / "encoder_onnx" / "1" / MODEL_FILE)


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> Path:
    import lightgbm

    from ranker.bundle import EncoderRef, save_bundle

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 2)), rng.normal(size=64)
    names = ["interest", "popularity_7d"]
    booster = lightgbm.train({"objective": "regression", "verbose": -1, "num_leaves": 4}, lightgbm.Dataset(x, y, feature_name=names), 2)
    return save_bundle(tmp_path_factory.mktemp("bundle"), booster, names, EncoderRef(model_dir="base", max_length=64), extra={})


@pytest.fixture(scope="module")
def fp16_repo(tmp_path_factory, tiny_bundle) -> tuple[Path, dict]:
    """The CLI on a bundle, fp16, GPU model only: one export covers the command and the fp16 graph.

    In-process (`semrank.cli.main`) to save a second torch import; `test_cli_help` runs the real binary.
    """
    import contextlib
    import io

    from semrank.cli import main

    out = tmp_path_factory.mktemp("triton_repo_fp16")
    argv = ["export", "triton", "--bundle", str(tiny_bundle), "--out", str(out),
            "--fp16", "--no-cpu-variant", "--no-verify", "--max-batch-size", "16"]  # fmt: skip
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(argv) == 0
    return out, json.loads(stdout.getvalue())


# --------------------------------------------------------------------------- graph


@pytest.mark.parametrize("texts", [TEXTS, TEXTS[:1], TEXTS[4:5], TEXTS[1:2] * 3], ids=["mixed", "batch1", "long", "short"])
def test_onnx_equals_torch_encoder(ort_session, encoder, texts):
    got = onnx_embed(ort_session, encoder.tokenizer, texts, max_length=128)
    want = encoder.encode(texts)
    assert got.dtype == np.float32 and got.shape == (len(texts), EMBEDDING_DIM)
    assert cosines(got, want).min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # normalised in the graph


def test_axes_are_dynamic(repo, ort_session, encoder):
    model = onnx.load(str(repo / "encoder_onnx" / "1" / MODEL_FILE), load_external_data=False)
    for inp in model.graph.input:
        assert inp.type.tensor_type.elem_type == onnx.TensorProto.INT64
        dims = inp.type.tensor_type.shape.dim
        assert len(dims) == 2 and all(d.dim_param for d in dims), f"{inp.name}: {dims}"
    (out,) = model.graph.output
    assert out.name == "embedding" and out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert out.type.tensor_type.shape.dim[1].dim_value == EMBEDDING_DIM
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    shapes = set()
    for texts in (TEXTS[:2], TEXTS * 3):  # batch 2 and 21; short and truncated-long sequences
        batch = encoder.tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="np")
        got = ort_session.run(["embedding"], {k: batch[k].astype(np.int64) for k in ("input_ids", "attention_mask")})[0]
        assert got.shape == (len(texts), EMBEDDING_DIM)
        shapes.add(batch["input_ids"].shape)
    assert len({s[0] for s in shapes}) == 2 and len({s[1] for s in shapes}) == 2


def test_padding_to_max_length_gives_the_same_embeddings(ort_session, encoder):
    """The contract lets a model ask for padding to max_length (one shape for the batcher); padding must not change results."""
    fixed = onnx_embed(ort_session, encoder.tokenizer, TEXTS[:3], max_length=128)
    batch = encoder.tokenizer(TEXTS[:3], padding="max_length", truncation=True, max_length=128, return_tensors="np")
    padded = ort_session.run(["embedding"], {k: batch[k].astype(np.int64) for k in ("input_ids", "attention_mask")})[0]
    assert batch["input_ids"].shape[1] == 128
    assert cosines(padded, fixed).min() >= 0.9999


def test_torchscript_exporter_also_matches(tmp_path, encoder):
    result = export_triton_repo(
        "base", tmp_path, ExportConfig(exporter="torchscript", opset=17, cpu_variant=False, verify=False)
    )
    assert result.exporter == "torchscript"
    sess = session(tmp_path / "encoder_onnx" / "1" / MODEL_FILE)
    assert cosines(onnx_embed(sess, encoder.tokenizer, TEXTS, 128), encoder.encode(TEXTS)).min() >= 0.9999
    assert sess.get_outputs()[0].shape[1] == EMBEDDING_DIM


def test_rename_output_moves_a_clashing_internal_name_aside():
    from onnx import helper

    # The dynamo exporter names the embedding lookup's output "embedding" (pytorch/pytorch#158094).
    nodes = [helper.make_node("Relu", ["x"], ["embedding"]), helper.make_node("Neg", ["embedding"], ["out"])]
    vi = lambda n: helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1])  # noqa: E731
    model = helper.make_model(helper.make_graph(nodes, "g", [vi("x")], [vi("out")]))
    _rename_output(model, "embedding")
    onnx.checker.check_model(model)
    assert model.graph.output[0].name == "embedding"
    assert model.graph.node[1].input[0] != "embedding" and model.graph.node[1].output[0] == "embedding"


# --------------------------------------------------------------------------- repository


def test_gpu_config(repo):
    conf = parse_config(repo / "encoder_onnx" / CONFIG_FILE)
    assert conf.name == "encoder_onnx"
    assert conf.platform == "onnxruntime_onnx"
    assert conf.max_batch_size == 32
    assert [(i.name, i.data_type, list(i.dims)) for i in conf.input] == [
        ("input_ids", mc.TYPE_INT64, [-1]),
        ("attention_mask", mc.TYPE_INT64, [-1]),
    ]
    assert [(o.name, o.data_type, list(o.dims)) for o in conf.output] == [("embedding", mc.TYPE_FP32, [EMBEDDING_DIM])]
    assert conf.HasField("dynamic_batching")
    assert list(conf.dynamic_batching.preferred_batch_size) == [16, 32]
    assert conf.dynamic_batching.max_queue_delay_microseconds == 1000
    assert [(g.kind, g.count) for g in conf.instance_group] == [(mc.ModelInstanceGroup.KIND_GPU, 1)]
    # The contract a client checks (serving/triton/contract.py), read back as Triton would report it.
    from google.protobuf.json_format import MessageToDict

    from ranker.encoder import encoder_fingerprint
    from serving.triton.contract import read_signature, tokenizer_sha256

    sig = read_signature(MessageToDict(conf, preserving_proto_field_name=True), "encoder_onnx")  # as tritonclient gives it
    assert sig.kind == "tokens" and sig.dim == EMBEDDING_DIM and sig.max_batch_size == 32
    assert sig.tokens.max_length == 128 and str(sig.tokens.padding) == "buckets:16,32,64,128"
    assert sig.tokens.encoder_fingerprint == encoder_fingerprint("base")
    assert sig.tokens.tokenizer_sha256 == tokenizer_sha256("base")


def test_cpu_variant(repo):
    conf = parse_config(repo / "encoder_onnx_cpu" / CONFIG_FILE)
    gpu = parse_config(repo / "encoder_onnx" / CONFIG_FILE)
    assert conf.name == "encoder_onnx_cpu"
    assert [g.kind for g in conf.instance_group] == [mc.ModelInstanceGroup.KIND_CPU]
    assert list(conf.input) == list(gpu.input) and list(conf.output) == list(gpu.output)
    # The same contract but the padding, which the CPU model asks to be the longest text's (measured best on CPU).
    cpu_params = {k: v.string_value for k, v in conf.parameters.items()}
    gpu_params = {k: v.string_value for k, v in gpu.parameters.items()}
    assert cpu_params.pop("semrank_padding") == "longest" and gpu_params.pop("semrank_padding") == "buckets:16,32,64,128"
    assert cpu_params == gpu_params and cpu_params
    assert conf.dynamic_batching == gpu.dynamic_batching
    cpu_model, gpu_model = (repo / n / "1" / MODEL_FILE for n in ("encoder_onnx_cpu", "encoder_onnx"))
    assert cpu_model.read_bytes() == gpu_model.read_bytes()


def test_tokenizer_metadata_and_readme(repo, encoder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(repo / "encoder_onnx" / "tokenizer")
    a = tok(TEXTS, truncation=True, max_length=128)["input_ids"]
    assert a == encoder.tokenizer(TEXTS, truncation=True, max_length=128)["input_ids"]

    meta_text = (repo / "encoder_onnx" / META_FILE).read_text()
    meta = json.loads(meta_text)
    assert meta["encoder"] == {"model_dir": "base"}
    assert meta["opset"] >= 17 and meta["fp16"] is False and meta["max_length"] == 128
    assert meta["exporter"] == "dynamo" and meta["embedding_dim"] == EMBEDDING_DIM
    assert str(repo) not in meta_text and str(Path.home()) not in meta_text  # no machine paths
    readme = (repo / "README.md").read_text()
    assert "max_length=128" in readme and "encoder_onnx_cpu" in readme and "semrank_padding" in readme
    assert not list(repo.parent.glob(f".{repo.name}-export-*")), "staging directory left behind"


def test_existing_model_is_not_overwritten_by_default(repo):
    with pytest.raises(ExportError, match="--overwrite"):
        export_triton_repo("base", repo, ExportConfig(verify=False))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_batch_size": 8, "preferred_batch_sizes": (16,)}, "preferred_batch_sizes"),
        ({"opset": 13}, "opset"),
        ({"name": "../x"}, "directory name"),
        ({"max_length": 1000}, "max_length"),
    ],
)
def test_config_errors_say_what_to_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ExportConfig(**kwargs)


# --------------------------------------------------------------------------- CLI, bundle, fp16


def test_cli_exports_a_bundle(fp16_repo, tiny_bundle):
    out, summary = fp16_repo
    assert summary["models"] == ["encoder_onnx"] and summary["embedding_dim"] == EMBEDDING_DIM
    assert not (out / "encoder_onnx_cpu").exists()
    meta = json.loads((out / "encoder_onnx" / META_FILE).read_text())
    bundle_manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    assert meta["bundle_version"] == bundle_manifest["bundle_version"]
    assert meta["encoder"]["model_dir"] == "base" and meta["max_length"] == 64  # the bundle's max_length
    assert meta["fp16"] is True
    assert parse_config(out / "encoder_onnx" / CONFIG_FILE).max_batch_size == 16
    # The export leaves the reference a service checks this model against in the bundle: the fp16
    # graph's answers agree with it within the service's bound.
    from ranker.encoder import encoder_key
    from ranker.encoder_probes import load_probes, min_cosine
    from serving.encoding.factories import MIN_PROBE_COSINE
    from serving.triton.contract import ClientTokenizer, read_signature

    assert summary["bundle_probes"] == "written"
    probes = load_probes(tiny_bundle)
    assert probes.encoder_key == encoder_key("base", 64)
    conf = parse_config(out / "encoder_onnx" / CONFIG_FILE)
    from google.protobuf.json_format import MessageToDict

    sig = read_signature(MessageToDict(conf, preserving_proto_field_name=True), "encoder_onnx")
    ids, mask = ClientTokenizer("base", sig.tokens)(list(probes.texts))
    got = session(out / "encoder_onnx" / "1" / MODEL_FILE).run(None, {"input_ids": ids, "attention_mask": mask})[0]
    assert min_cosine(probes.embeddings, got) >= MIN_PROBE_COSINE


def test_fp16_graph_keeps_int64_inputs_fp32_output_and_matches(fp16_repo, encoder):
    out, _ = fp16_repo
    path = out / "encoder_onnx" / "1" / MODEL_FILE
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer)
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [onnx.TensorProto.INT64] * 2
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    # onnxruntime's CPU provider runs the fp16 graph (casting around ops it has no fp16 kernel for).
    got = onnx_embed(session(path), encoder.tokenizer, TEXTS, max_length=64)
    want = encoder.encode(TEXTS)  # max_length 128; texts longer than 64 tokens differ on purpose
    short = [i for i, t in enumerate(TEXTS) if len(encoder.tokenizer(t)["input_ids"]) <= 64]
    assert cosines(got[short], want[short]).min() >= 0.999


def test_cli_rejects_max_length_with_bundle(tiny_bundle, tmp_path, capsys):
    from semrank.cli import main

    assert main(["export", "triton", "--bundle", str(tiny_bundle), "--out", str(tmp_path), "--max-length", "32"]) == 2
    assert "--max-length" in capsys.readouterr().err


def test_cli_reports_a_bad_bundle(tmp_path, capsys):
    from semrank.cli import main

    assert main(["export", "triton", "--bundle", str(tmp_path), "--out", str(tmp_path / "repo")]) == 2
    assert "manifest.json" in capsys.readouterr().err
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize("cmd", [["export"], ["export", "triton"]])
def test_cli_help(cmd):
    proc = subprocess.run([sys.executable, "-m", "semrank.cli", *cmd, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "usage: semrank export" in proc.stdout
    if cmd[-1] == "triton":
        assert "--fp16" in proc.stdout and "--max-batch-size" in proc.stdout and "--bundle" in proc.stdout
