"""The client's side of the exported model's contract: padding, tokenization equal to the encoder's,
the signature read from a model config, the parameters checked against a bundle's encoder, and the
bundle's probe embeddings (no Triton here; tests/integration/test_external_triton.py has one)."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from ranker.encoder import encoder_fingerprint, encoder_key
from ranker.encoder_probes import PROBE_FILE, Probes, compute_probes, load_probes, min_cosine, save_probes
from serving.triton.contract import (
    ClientTokenizer,
    ContractMismatch,
    ModelSignature,
    Padding,
    TokenContract,
    check_parameters,
    read_signature,
    tokenizer_sha256,
)

TEXTS = ["a", "Red Running Shoes — für Männer!", "café naïve 東京 🎉", "word " * 300, "", "USB-C cable 2m / 60W"]


def contract(padding: str = "buckets:16,32,64,128", max_length: int = 128) -> TokenContract:
    return TokenContract(max_length, tokenizer_sha256("base"), encoder_fingerprint("base"), Padding.parse(padding))


@pytest.mark.parametrize("spec,longest,width", [
    ("max_length", 7, 128), ("longest", 7, 7), ("buckets:16,32,64,128", 7, 16), ("buckets:16,32,64,128", 17, 32),
    ("buckets:16,32", 100, 128), ("buckets", 65, 128),
])
def test_padding_width(spec, longest, width):
    p = Padding.parse(spec)
    assert p.width(longest, 128) == width
    assert Padding.parse(str(p)) == p


@pytest.mark.parametrize("bad", ["", "pad", "buckets:", "buckets:0,16", "buckets:x", "longest:3"])
def test_padding_spec_errors_name_the_spec(bad):
    with pytest.raises(ValueError, match="padding"):
        Padding.parse(bad)


@pytest.mark.parametrize("padding", ["max_length", "longest", "buckets:16,32,64,128"])
def test_client_tokens_equal_the_encoders_under_every_padding(padding, encoder):
    ids, mask = ClientTokenizer("base", contract(padding))(TEXTS)
    want = encoder.tokenizer(TEXTS, padding=True, truncation=True, max_length=128, return_tensors="np")
    width = want["input_ids"].shape[1]
    assert ids.dtype == mask.dtype == np.int64 and ids.shape == mask.shape
    assert ids.shape[1] == Padding.parse(padding).width(width, 128)
    assert (ids[:, :width] == want["input_ids"]).all() and (mask[:, :width] == want["attention_mask"]).all()
    assert not ids[:, width:].any() and not mask[:, width:].any()


def test_truncation_follows_the_contracts_max_length():
    ids, mask = ClientTokenizer("base", contract("longest", max_length=16))(["word " * 50])
    assert ids.shape == (1, 16) and mask.sum() == 16 and ids[0, -1] == 102  # [SEP] kept at the end


def _config(inputs, params=None, out_dims=(384,)):
    return {"name": "m", "max_batch_size": 8, "input": inputs,
            "output": [{"name": "embedding", "data_type": "TYPE_FP32", "dims": [str(d) for d in out_dims]}],
            "parameters": {k: {"string_value": v} for k, v in (params or {}).items()}}


TOKEN_INPUTS = [{"name": "input_ids", "data_type": "TYPE_INT64", "dims": ["-1"]},
                {"name": "attention_mask", "data_type": "TYPE_INT64", "dims": ["-1"]}]


def test_signature_of_each_contract():
    strings = read_signature(_config([{"name": "texts", "data_type": "TYPE_STRING", "dims": ["1"]}]), "m")
    assert strings == ModelSignature("strings", 384, 8)
    tokens = read_signature(_config(TOKEN_INPUTS, contract().parameters()), "m")
    assert tokens.kind == "tokens" and tokens.tokens == contract()


@pytest.mark.parametrize("config,match", [
    (_config(TOKEN_INPUTS), "lacks the parameters"),
    (_config(TOKEN_INPUTS, {**contract().parameters(), "semrank_contract": "tokens-v9"}), "speaks 'tokens-v1'"),
    (_config(TOKEN_INPUTS, {**contract().parameters(), "semrank_padding": "sideways"}), "bad contract parameter"),
    (_config([{"name": "pixels", "data_type": "TYPE_FP32", "dims": ["3"]}]), "takes inputs"),
    (_config([{"name": "texts", "data_type": "TYPE_INT32", "dims": ["1"]}]), "expected TYPE_STRING"),
    (_config([{**TOKEN_INPUTS[0], "data_type": "TYPE_INT32"}, TOKEN_INPUTS[1]], contract().parameters()), "not TYPE_INT64"),
    ({**_config(TOKEN_INPUTS, contract().parameters()), "output": []}, "no 'embedding' output"),
])
def test_signature_errors_name_the_problem(config, match):
    with pytest.raises(ContractMismatch, match=match):
        read_signature(config, "m")


def test_parameters_checked_against_the_bundles_encoder():
    sig = read_signature(_config(TOKEN_INPUTS, contract().parameters()), "m")
    check_parameters(sig, "base", 128, "m")
    with pytest.raises(ContractMismatch, match=r"max_length 128 \(the bundle's: 64\)"):
        check_parameters(sig, "base", 64, "m")
    other = TokenContract(128, "f" * 64, "0123456789abcdef", Padding.parse("longest"))
    with pytest.raises(ContractMismatch, match="encoder 0123456789abcdef.*a tokenizer other than the bundle's"):
        check_parameters(read_signature(_config(TOKEN_INPUTS, other.parameters()), "m"), "base", 128, "m")
    named = read_signature(_config([{"name": "texts", "data_type": "TYPE_STRING", "dims": ["1"]}],
                                   {"semrank_encoder_fingerprint": "0123456789abcdef"}), "m")
    with pytest.raises(ContractMismatch, match="serves encoder 0123456789abcdef"):
        check_parameters(named, "base", 128, "m")


def test_probes_round_trip_and_refuse_a_bad_file(tmp_path, encoder):
    assert load_probes(tmp_path) is None
    probes = compute_probes(encoder, encoder_key("base", 128))
    save_probes(tmp_path, probes)
    back = load_probes(tmp_path)
    assert back.texts == probes.texts and back.encoder_key == probes.encoder_key
    assert np.array_equal(back.embeddings, probes.embeddings) and back.embeddings.dtype == np.float32
    assert min_cosine(back.embeddings, encoder.encode(list(back.texts))) > 0.9999
    assert min_cosine(back.embeddings, back.embeddings[:, :10]) == -1.0  # other shapes never pass
    (tmp_path / PROBE_FILE).write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a probe file"):
        load_probes(tmp_path)
    save_probes(tmp_path, Probes(("a", "b"), np.zeros((3, 4), np.float32), "k"))
    with pytest.raises(ValueError, match="embeddings for 2 texts"):
        load_probes(tmp_path)


def _args(**kw):
    from semrank.cli.common import add_triton_args

    p = argparse.ArgumentParser()
    add_triton_args(p)
    argv = []
    for k, v in kw.items():
        for one in v if isinstance(v, list) else [v]:
            argv += [f"--{k.replace('_', '-')}"] + ([] if one is True else [str(one)])
    return p.parse_args(argv)


def test_cli_builds_the_external_triton_and_refuses_what_does_not_fit(tmp_path, monkeypatch):
    from featurizer.errors import ConfigError
    from semrank.cli.common import external_triton

    assert external_triton(_args()) is None
    monkeypatch.setenv("GW_TOKEN", "s3cret")
    ext = external_triton(_args(triton_url="a:8001,b:8001", triton_header=["X-Team=rank"],
                                triton_header_env=["Authorization=GW_TOKEN"], triton_tls=True))
    assert ext.model == "encoder_onnx" and ext.tls is not None
    assert dict(ext.headers) == {"x-team": "rank", "authorization": "s3cret"}
    assert ext.client().urls == ["a:8001", "b:8001"]
    for kw, match in [({"triton_tls": True}, "go with --triton-url"),
                      ({"triton_url": "grpc://a:1"}, "no scheme"),
                      ({"triton_url": "a:1", "triton_header": "novalue"}, "NAME=VALUE"),
                      ({"triton_url": "a:1", "triton_header_env": "A=UNSET_VAR_X"}, "is not set"),
                      ({"triton_url": "a:1", "triton_cert": tmp_path / "c.pem"}, "go together"),
                      ({"triton_url": "a:1", "triton_ca": tmp_path / "none.pem"}, "no such file")]:
        with pytest.raises(ConfigError, match=match):
            external_triton(_args(**kw))
