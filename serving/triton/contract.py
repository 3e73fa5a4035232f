"""What a Triton encoder model promises, and how a client checks it before it trusts the model.

Two input contracts, told apart by the model's config as Triton reports it (never by a flag):

- **strings**: `texts` BYTES [B, 1] -> `embedding` FP32 [B, dim]; tokenization inside the model
  (the development worker, serving/triton/worker.py).
- **tokens**: `input_ids`, `attention_mask` INT64 [B, S] -> `embedding`; the exported ONNX model
  (serving/triton/export.py). The client tokenizes with the bundle's tokenizer and pads as the
  model's config says.

A tokens model carries its contract in its config's `parameters` (written by the export):

    semrank_contract            "tokens-v1"
    semrank_max_length          the truncation the embeddings were made with
    semrank_tokenizer_sha256    sha256 over the tokenizer files (`tokenizer_sha256`)
    semrank_encoder_fingerprint the encoder's weights (`ranker.encoder.encoder_fingerprint`)
    semrank_padding             "max_length", "longest" or "buckets:16,32,64,128"

`check_parameters` compares them with the bundle's encoder; `ranker.encoder_probes` then compares
embeddings of fixed probe texts. No torch is loaded here: the tokenizer is the `tokenizers`
library reading `tokenizer.json`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from featurizer.errors import SemrankError

CONTRACT = "tokens-v1"
STRING_INPUT = "texts"
TOKEN_INPUTS = ("input_ids", "attention_mask")
OUTPUT = "embedding"
P_CONTRACT = "semrank_contract"
P_MAX_LENGTH = "semrank_max_length"
P_TOKENIZER = "semrank_tokenizer_sha256"
P_FINGERPRINT = "semrank_encoder_fingerprint"
P_PADDING = "semrank_padding"
# Files a tokenization depends on; hashed by name and content in this order, when present.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
)
DEFAULT_BUCKETS = (16, 32, 64, 128)


class ContractMismatch(SemrankError, RuntimeError):
    """The Triton model does not serve the bundle's encoder (its config, parameters or probe
    embeddings disagree); the bundle is refused and the one serving stays."""

    grpc_code = "FAILED_PRECONDITION"
    reason = "ENCODER_CONTRACT_MISMATCH"


def tokenizer_sha256(model_dir: str | Path) -> str:
    """sha256 over the tokenizer files present in `model_dir` (names and bytes)."""
    from ranker.encoder import resolve_model_dir

    root = resolve_model_dir(model_dir)
    h = hashlib.sha256()
    found = 0
    for name in TOKENIZER_FILES:
        f = root / name
        if f.is_file():
            found += 1
            h.update(name.encode() + b"\0")
            h.update(f.read_bytes())
            h.update(b"\0")
    if not found:
        raise ContractMismatch(f"encoder {root.name!r} has no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...)")
    return h.hexdigest()


@dataclass(frozen=True)
class Padding:
    """How a request's token rows are padded. Triton's dynamic batcher merges only requests of
    one shape: `max_length` merges all of them, `longest` computes least, `buckets` rounds the
    longest row up to the next bucket (few shapes, little padding)."""

    kind: str = "buckets"
    buckets: tuple[int, ...] = DEFAULT_BUCKETS

    @classmethod
    def parse(cls, spec: str) -> Padding:
        spec = spec.strip()
        if spec in ("max_length", "longest"):
            return cls(spec, ())
        name, sep, rest = spec.partition(":")
        if name == "buckets":
            try:
                sizes = tuple(sorted({int(x) for x in rest.split(",")})) if sep else DEFAULT_BUCKETS
            except ValueError:
                sizes = ()
            if sizes and all(s >= 1 for s in sizes):
                return cls("buckets", sizes)
        raise ValueError(f"padding {spec!r}: expected 'max_length', 'longest' or 'buckets:16,32,64,128'")

    def __str__(self) -> str:
        return f"buckets:{','.join(map(str, self.buckets))}" if self.kind == "buckets" else self.kind

    def width(self, longest: int, max_length: int) -> int:
        if self.kind == "max_length":
            return max_length
        if self.kind == "longest":
            return longest
        return min(next((b for b in self.buckets if b >= longest), max_length), max_length)


@dataclass(frozen=True)
class TokenContract:
    max_length: int
    tokenizer_sha256: str
    encoder_fingerprint: str
    padding: Padding

    def parameters(self) -> dict[str, str]:
        return {
            P_CONTRACT: CONTRACT,
            P_MAX_LENGTH: str(self.max_length),
            P_TOKENIZER: self.tokenizer_sha256,
            P_FINGERPRINT: self.encoder_fingerprint,
            P_PADDING: str(self.padding),
        }

    @classmethod
    def from_parameters(cls, params: dict[str, str], model: str) -> TokenContract:
        missing = [k for k in (P_CONTRACT, P_MAX_LENGTH, P_TOKENIZER, P_FINGERPRINT, P_PADDING) if not params.get(k)]
        if missing:
            raise ContractMismatch(
                f"Triton model {model!r} takes token ids but its config lacks the parameters {missing}: "
                f"export it with `semrank export triton`, which writes them")
        if params[P_CONTRACT] != CONTRACT:
            raise ContractMismatch(f"Triton model {model!r} has {P_CONTRACT}={params[P_CONTRACT]!r}; "
                                   f"this client speaks {CONTRACT!r}")
        try:
            return cls(int(params[P_MAX_LENGTH]), params[P_TOKENIZER], params[P_FINGERPRINT],
                       Padding.parse(params[P_PADDING]))
        except ValueError as e:
            raise ContractMismatch(f"Triton model {model!r}: bad contract parameter ({e})") from e


@dataclass(frozen=True)
class ModelSignature:
    """The contract a model's config describes: "strings" or "tokens" (with its `TokenContract`)."""

    kind: str
    dim: int | None
    max_batch_size: int
    tokens: TokenContract | None = None
    fingerprint: str | None = None  # a strings model may name its encoder too


def read_signature(config: dict[str, Any], model: str) -> ModelSignature:
    """The contract of a model from its config (tritonclient's `get_model_config(as_json=True)["config"]`)."""
    inputs = {i.get("name"): i for i in config.get("input", [])}
    outputs = {o.get("name"): o for o in config.get("output", [])}
    if OUTPUT not in outputs:
        raise ContractMismatch(f"Triton model {model!r} has no {OUTPUT!r} output (outputs: {sorted(outputs)})")
    dims = [int(d) for d in outputs[OUTPUT].get("dims", [])]
    dim = dims[-1] if dims and dims[-1] > 0 else None
    params = {k: v.get("string_value", "") for k, v in (config.get("parameters") or {}).items()}
    mbs = int(config.get("max_batch_size", 0) or 0)
    if set(inputs) == {STRING_INPUT}:
        if inputs[STRING_INPUT].get("data_type") != "TYPE_STRING":
            raise ContractMismatch(f"Triton model {model!r}: input {STRING_INPUT!r} is "
                                   f"{inputs[STRING_INPUT].get('data_type')}, expected TYPE_STRING")
        return ModelSignature("strings", dim, mbs, fingerprint=params.get(P_FINGERPRINT) or None)
    if set(inputs) == set(TOKEN_INPUTS):
        bad = [n for n in TOKEN_INPUTS if inputs[n].get("data_type") != "TYPE_INT64"]
        if bad:
            raise ContractMismatch(f"Triton model {model!r}: inputs {bad} are not TYPE_INT64")
        return ModelSignature("tokens", dim, mbs, tokens=TokenContract.from_parameters(params, model))
    raise ContractMismatch(f"Triton model {model!r} takes inputs {sorted(inputs)}; semrank speaks "
                           f"[{STRING_INPUT!r}] (strings) or {list(TOKEN_INPUTS)} (token ids)")


def check_parameters(sig: ModelSignature, model_dir: str | Path, max_length: int, model: str) -> None:
    """Raise `ContractMismatch` when the model's contract is not the bundle encoder's."""
    from ranker.encoder import encoder_fingerprint

    fingerprint = encoder_fingerprint(model_dir)
    if sig.kind == "strings":
        if sig.fingerprint and sig.fingerprint != fingerprint:
            raise ContractMismatch(f"Triton model {model!r} serves encoder {sig.fingerprint}, the bundle's is {fingerprint}")
        return
    c = sig.tokens
    problems = []
    if c.max_length != max_length:
        problems.append(f"max_length {c.max_length} (the bundle's: {max_length})")
    if c.encoder_fingerprint != fingerprint:
        problems.append(f"encoder {c.encoder_fingerprint} (the bundle's: {fingerprint})")
    if c.tokenizer_sha256 != tokenizer_sha256(model_dir):
        problems.append("a tokenizer other than the bundle's")
    if problems:
        raise ContractMismatch(f"Triton model {model!r} was exported with " + "; ".join(problems)
                               + ": export the bundle's encoder again (`semrank export triton --bundle ...`)")


class ClientTokenizer:
    """The bundle's tokenizer as the exported model expects it: `[CLS] ... [SEP]`, truncated at
    `max_length`, padded with 0 (mask 0) to the contract's width. Equal to what
    `ranker.encoder.TextEncoder` feeds the transformer (tested)."""

    def __init__(self, model_dir: str | Path, contract: TokenContract):
        from tokenizers import Tokenizer

        from ranker.encoder import resolve_model_dir

        path = resolve_model_dir(model_dir) / "tokenizer.json"
        if not path.is_file():
            raise ContractMismatch(f"encoder {path.parent.name!r} has no tokenizer.json: the client cannot tokenize for "
                                   "a token-id model without it")
        self.contract = contract
        self._tok = Tokenizer.from_file(str(path))
        self._tok.no_padding()
        self._tok.enable_truncation(contract.max_length)

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        encs = self._tok.encode_batch(texts)
        longest = max((len(e.ids) for e in encs), default=1)
        width = self.contract.padding.width(longest, self.contract.max_length)
        ids = np.zeros((len(encs), width), dtype=np.int64)
        mask = np.zeros((len(encs), width), dtype=np.int64)
        for row, e in enumerate(encs):
            n = len(e.ids)
            ids[row, :n] = e.ids
            mask[row, :n] = 1
        return ids, mask
