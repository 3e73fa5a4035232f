"""What several commands share."""

from __future__ import annotations

from pathlib import Path

from featurizer.errors import ConfigError


def data_dir(args) -> Path:
    """`--data`, else the data directory the bundle (`--bundle`) was trained on."""
    if args.data is not None:
        return Path(args.data)
    from ranker.bundle import load_bundle

    source = load_bundle(args.bundle).manifest.get("training_data", {}).get("source")
    if not source:
        raise ConfigError("--data is required (the bundle does not name its training data)")
    return Path(source)


def add_triton_args(s, with_model_default: str = "encoder_onnx") -> None:
    """`--triton-url` and what goes with it: a Triton this command did not start (docs/triton.md)."""
    g = s.add_argument_group("external Triton (a GPU Triton somebody else runs; docs/triton.md)")
    g.add_argument("--triton-url", default=None, metavar="HOST:PORT[,HOST:PORT]",
                   help="encode through this Triton's gRPC endpoint(s) instead of starting one; its model is "
                        "checked against the bundle (contract parameters and probe embeddings)")
    g.add_argument("--triton-model", default=with_model_default,
                   help=f"the model's name there (default {with_model_default}; the export's name)")
    g.add_argument("--triton-tls", action="store_true", help="TLS to Triton with the system's CAs")
    g.add_argument("--triton-ca", type=Path, default=None, help="TLS: the CA that signed Triton's certificate")
    g.add_argument("--triton-cert", type=Path, default=None, help="mutual TLS: this client's certificate chain")
    g.add_argument("--triton-key", type=Path, default=None, help="mutual TLS: this client's private key")
    g.add_argument("--triton-header", action="append", default=[], metavar="NAME=VALUE",
                   help="a header sent with every call (repeatable), e.g. for a gateway's auth")
    g.add_argument("--triton-header-env", action="append", default=[], metavar="NAME=VARIABLE",
                   help="a header whose value is read from an environment variable (keeps secrets off the command line)")


def external_triton(args):
    """The `ExternalTriton` the arguments describe, or None without --triton-url."""
    import os

    from serving.triton.client import ExternalTriton, TritonTls

    tls_files = (args.triton_ca, args.triton_cert, args.triton_key)
    if args.triton_url is None:
        if args.triton_tls or any(tls_files) or args.triton_header or args.triton_header_env:
            raise ConfigError("--triton-tls, --triton-ca, --triton-cert, --triton-key and --triton-header go with --triton-url")
        return None
    headers = []
    for spec in args.triton_header:
        name, sep, value = spec.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"--triton-header {spec!r}: expected NAME=VALUE")
        headers.append((name.strip().lower(), value))
    for spec in args.triton_header_env:
        name, sep, var = spec.partition("=")
        if not sep or not name.strip() or not var:
            raise ConfigError(f"--triton-header-env {spec!r}: expected NAME=VARIABLE")
        if var not in os.environ:
            raise ConfigError(f"--triton-header-env {spec!r}: the variable {var} is not set")
        headers.append((name.strip().lower(), os.environ[var]))
    try:
        tls = TritonTls(*tls_files[:1], args.triton_cert, args.triton_key) if args.triton_tls or any(tls_files) else None
        return ExternalTriton(args.triton_url, args.triton_model, tls=tls, headers=tuple(headers))
    except ValueError as e:
        raise ConfigError(str(e)) from e
