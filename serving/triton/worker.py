"""The Triton encoder worker program: `python -m serving.triton.worker --grpc-port ... --http-port ... --metrics-port ...`.

It loads `ranker.encoder.TextEncoder` once, binds it to Triton (pytriton) as a dynamically
batched model `texts (bytes) -> embedding (float32)`, and serves until SIGINT/SIGTERM, or until
the process that started it dies (`--exit-with-parent`). pytriton starts a `tritonserver`
child (plus a Python-backend stub and a shared-memory tensor store), all in this process's
group. `serving.triton.process.TritonProcess` is the parent side that starts and stops it.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TritonWorkerConfig:
    """Everything the Triton encoder worker needs; passed explicitly, never read from env."""

    grpc_port: int
    http_port: int
    metrics_port: int
    model_dir: str = "base"
    max_length: int = 128
    model_name: str = "encoder"
    max_batch_size: int = 64
    max_queue_delay_us: int = 2000
    startup_timeout_s: float = 180.0
    host: str = "127.0.0.1"
    threads: int | None = None  # torch intra-op threads; None keeps torch's default
    # An exported model directory (REPO/<name>): serve an EMULATION of it (serving/triton/onnx_emulation.py)
    # under its own name instead of the encoder; model_dir, max_length and model_name then do not apply.
    onnx_model: str | None = None
    # TLS on the gRPC port (PEM files): what a team puts in front of a production Triton, here so
    # that the client's TLS path is tested against a real server. `tls_ca` is what start-up trusts.
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None

    def __post_init__(self) -> None:
        ports = {"grpc_port": self.grpc_port, "http_port": self.http_port, "metrics_port": self.metrics_port}
        for name, port in ports.items():
            if not 1 <= int(port) <= 65535:
                raise ValueError(f"{name}={port} is not a valid TCP port; use 1..65535 (free_port() picks one)")
        if len(set(ports.values())) != 3:
            raise ValueError(f"Triton needs three distinct ports, got {ports}; pick separate ports for each")
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size={self.max_batch_size} must be >= 1")
        if self.max_queue_delay_us < 0:
            raise ValueError(f"max_queue_delay_us={self.max_queue_delay_us} must be >= 0")
        if self.max_length < 1:
            raise ValueError(f"max_length={self.max_length} must be >= 1")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads={self.threads} must be >= 1, or None for torch's default")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.startup_timeout_s <= 0:
            raise ValueError(f"startup_timeout_s={self.startup_timeout_s} must be > 0")

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def to_argv(self, workspace: str | Path | None = None) -> list[str]:
        """Command-line flags for `python -m serving.triton.worker`."""
        argv = [
            "--model-dir", str(self.model_dir),
            "--max-length", str(self.max_length),
            "--model-name", self.model_name,
            "--grpc-port", str(self.grpc_port),
            "--http-port", str(self.http_port),
            "--metrics-port", str(self.metrics_port),
            "--max-batch-size", str(self.max_batch_size),
            "--max-queue-delay-us", str(self.max_queue_delay_us),
            "--host", self.host,
        ]  # fmt: skip
        if self.threads is not None:
            argv += ["--threads", str(self.threads)]
        if self.onnx_model is not None:
            argv += ["--emulate-onnx", str(Path(self.onnx_model).resolve())]
        if self.tls_cert is not None:
            argv += ["--tls-cert", str(Path(self.tls_cert).resolve()), "--tls-key", str(Path(self.tls_key).resolve())]
        if workspace is not None:
            argv += ["--workspace", str(workspace)]
        return argv


def _parse_args(argv: list[str] | None) -> tuple[TritonWorkerConfig, str | None, int | None]:
    p = argparse.ArgumentParser(prog="python -m serving.triton.worker", description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default="base", help="encoder directory, or 'base' for the pretrained package")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--model-name", default="encoder")
    p.add_argument("--grpc-port", type=int, required=True)
    p.add_argument("--http-port", type=int, required=True)
    p.add_argument("--metrics-port", type=int, required=True)
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--max-queue-delay-us", type=int, default=2000)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--emulate-onnx", default=None, metavar="REPO/NAME",
                   help="serve an EMULATION of this exported model (onnxruntime in a Python-backend model) instead")
    p.add_argument("--tls-cert", default=None, help="serve gRPC over TLS with this certificate (PEM)")
    p.add_argument("--tls-key", default=None, help="... and this private key (PEM)")
    p.add_argument("--workspace", default=None, help="new directory for pytriton's files (default: ~/.cache/pytriton)")
    p.add_argument(
        "--exit-with-parent", type=int, default=None, metavar="PID",
        help="stop gracefully when process PID (our parent) dies; TritonProcess passes its own pid",
    )  # fmt: skip
    a = p.parse_args(argv)
    cfg = TritonWorkerConfig(
        grpc_port=a.grpc_port,
        http_port=a.http_port,
        metrics_port=a.metrics_port,
        model_dir=a.model_dir,
        max_length=a.max_length,
        model_name=a.model_name,
        max_batch_size=a.max_batch_size,
        max_queue_delay_us=a.max_queue_delay_us,
        host=a.host,
        threads=a.threads,
        onnx_model=a.emulate_onnx,
        tls_cert=a.tls_cert,
        tls_key=a.tls_key,
    )
    return cfg, a.workspace, a.exit_with_parent


def make_infer_func(encoder):
    """The batched Triton infer function: bytes (B, 1) -> float32 embeddings (B, dim)."""
    from pytriton.decorators import batch

    @batch
    def infer(texts: np.ndarray) -> dict[str, np.ndarray]:
        # Undecodable bytes must not take the worker down: replace them and carry on.
        decoded = [_as_text(x) for x in texts.reshape(-1)]
        return {"embedding": encoder.encode(decoded)}

    return infer


def _as_text(x: object) -> str:
    if isinstance(x, bytes):
        return x.decode("utf-8", errors="replace")
    return str(x)


class _Terminate(KeyboardInterrupt):
    """SIGTERM mapped onto pytriton's SIGINT path (Triton.serve catches KeyboardInterrupt)."""


def _on_sigterm(signum, frame):  # noqa: ARG001
    raise _Terminate()


def _watch_parent(parent_pid: int, period_s: float = 1.0) -> None:
    """SIGINT ourselves once we are re-parented, i.e. the process that started us died.

    Covers a parent killed with SIGKILL (no atexit): without this the worker, in its own
    session, would keep Triton running forever. Polling getppid() rather than PR_SET_PDEATHSIG,
    which fires when the spawning *thread* exits.
    """

    def loop() -> None:
        while os.getppid() == parent_pid:
            time.sleep(period_s)
        log.warning("parent process %d is gone; stopping Triton", parent_pid)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=loop, name="watch-parent", daemon=True).start()


def serve(cfg: TritonWorkerConfig, workspace: str | None = None) -> None:
    """Load the encoder once, bind it to Triton and block until SIGINT/SIGTERM."""
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    encoder = None
    if cfg.onnx_model is None:
        from ranker.encoder import TextEncoder

        if cfg.threads is not None:
            import torch

            torch.set_num_threads(cfg.threads)
        t0 = time.monotonic()
        encoder = TextEncoder(cfg.model_dir, max_length=cfg.max_length)
        encoder.encode(["warm up"])  # first call allocates; keep it out of the first request
        log.info("encoder %s loaded in %.1fs (dim=%d)", encoder.model_dir, time.monotonic() - t0, encoder.dim)

    triton_cfg = TritonConfig(
        http_address=cfg.host,
        http_port=cfg.http_port,
        grpc_address=cfg.host,
        grpc_port=cfg.grpc_port,
        metrics_address=cfg.host,
        metrics_port=cfg.metrics_port,
        **({"grpc_use_ssl": True, "grpc_server_cert": cfg.tls_cert, "grpc_server_key": cfg.tls_key}
           if cfg.tls_cert else {}),
    )
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        with Triton(config=triton_cfg, workspace=workspace) as triton:
            if cfg.onnx_model is not None:
                from serving.triton.onnx_emulation import bind

                name = bind(triton, cfg.onnx_model, cfg.threads)
                log.info("serving the EMULATION %r on grpc %s", name, cfg.grpc_url)
                triton.serve()
                return
            triton.bind(
                model_name=cfg.model_name,
                infer_func=make_infer_func(encoder),
                inputs=[Tensor(name="texts", dtype=bytes, shape=(1,))],
                outputs=[Tensor(name="embedding", dtype=np.float32, shape=(-1,))],
                config=ModelConfig(
                    max_batch_size=cfg.max_batch_size,
                    batcher=DynamicBatcher(max_queue_delay_microseconds=cfg.max_queue_delay_us),
                ),
                strict=True,
            )
            log.info("serving model %r on grpc %s, http %s:%d", cfg.model_name, cfg.grpc_url, cfg.host, cfg.http_port)
            triton.serve()  # returns on SIGINT (KeyboardInterrupt) or when tritonserver dies
    except KeyboardInterrupt:
        log.info("signal received while starting; stopping")
    log.info("Triton stopped")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg, workspace, parent_pid = _parse_args(argv)
    if parent_pid is not None:
        _watch_parent(parent_pid)
    try:
        serve(cfg, workspace)
    except KeyboardInterrupt:  # SIGINT/SIGTERM while the encoder was still loading
        log.info("interrupted before serving")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
