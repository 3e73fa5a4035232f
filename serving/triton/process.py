"""Run the text encoder behind NVIDIA Triton (via pytriton), and manage that process.

Two halves:

* `main()` is the worker entry point (`python -m serving.triton.process ...`). It loads
  `TextEncoder` once, binds it to Triton as a dynamically batched model and serves
  until SIGINT/SIGTERM. pytriton starts a `tritonserver` child (plus a Python-backend
  stub under it and a shared-memory tensor store), all in the worker's process group.
* `TritonProcess` runs in the parent: it spawns the worker in its own process group,
  waits until the model is ready, and on `stop()`/`kill_hard()` makes sure no process
  of that group (in particular `tritonserver`) survives.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# Where `python -m serving.triton.process` works even without an installed package.
_PROJECT_ROOT = Path(__file__).resolve().parents[2]
# pytriton names the Python backend's shared-memory regions "pytrtion<worker pid>-<hash>..."
# (sic); a hard-killed worker leaves them in /dev/shm.
_SHM_DIR = Path("/dev/shm")
_SHM_PREFIX = "pytrtion"
# tritonserver copies each model it loads to /tmp/folderXXXXXX (it ignores TMPDIR) and removes
# the copy only on a clean exit; the Python-backend stub gets ".../folderXXXXXX/<version>/model.py".
_MODEL_COPY_RE = re.compile(r"^(/.+/folder[A-Za-z0-9]{6})/\d+/model\.py$")


class PortInUseError(RuntimeError):
    """A port the worker needs is already bound by another process."""


class TritonStartupError(RuntimeError):
    """The Triton worker exited or did not become ready in time."""


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
        if self.startup_timeout_s <= 0:
            raise ValueError(f"startup_timeout_s={self.startup_timeout_s} must be > 0")

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def to_argv(self, workspace: str | Path | None = None) -> list[str]:
        """Command-line flags for `python -m serving.triton.process`."""
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
        if workspace is not None:
            argv += ["--workspace", str(workspace)]
        return argv


# --------------------------------------------------------------------------- worker


def _parse_args(argv: list[str] | None) -> tuple[TritonWorkerConfig, str | None, int | None]:
    p = argparse.ArgumentParser(prog="python -m serving.triton.process", description=__doc__.splitlines()[0])
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
    )
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        with Triton(config=triton_cfg, workspace=workspace) as triton:
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


# --------------------------------------------------------------------------- parent side


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (the OS picks it by binding to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """True if another socket is bound/listening on host:port (TIME_WAIT leftovers do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) pids whose process group is pgid, from /proc."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path("/proc", entry, "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ...": comm may contain spaces, so split after the last ')'.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) >= 3 and int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(entry))
    return pids


def _model_copy_dirs(pgid: int) -> set[Path]:
    """tritonserver's temporary model copies, read from the command lines of the group's stubs."""
    dirs = set()
    for pid in _group_members(pgid):
        try:
            args = Path("/proc", str(pid), "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        for arg in args:
            m = _MODEL_COPY_RE.match(arg.decode(errors="replace"))
            if m:
                dirs.add(Path(m.group(1)))
    return dirs


def _worker_env(tmpdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    # tritonserver copies each loaded model to $TMPDIR/folderXXXXXX and only removes it on a
    # clean exit; keep those copies (and the stub's multiprocessing files) inside our workdir.
    env["TMPDIR"] = str(tmpdir)
    # The Python-backend stub links the system libpython; point it at this interpreter's.
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir:
        old = env.get("LD_LIBRARY_PATH")
        env["LD_LIBRARY_PATH"] = f"{libdir}:{old}" if old else libdir
    env["PYTHONUNBUFFERED"] = "1"
    return env


class TritonProcess:
    """A Triton encoder worker in its own process group, as a context manager.

    Usage::

        cfg = TritonWorkerConfig(grpc_port=free_port(), http_port=free_port(), metrics_port=free_port())
        with TritonProcess(cfg) as tp:
            client = EncoderClient(tp.grpc_url)
    """

    def __init__(self, config: TritonWorkerConfig, keep_log: bool = False):
        """keep_log: keep the temp dir with the worker log after a normal stop (it is always
        kept when startup fails, so the error message's log path stays readable)."""
        self.config = config
        self.keep_log = keep_log
        self._proc: subprocess.Popen | None = None
        self._workdir: Path | None = None
        self._log_file = None
        self.log_path: Path | None = None
        self.startup_s: float | None = None
        self._model_copies: set[Path] = set()

    # -- properties
    @property
    def grpc_url(self) -> str:
        return self.config.grpc_url

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def workdir(self) -> Path | None:
        """Temp directory holding the log and pytriton's workspace (tritonserver copy)."""
        return self._workdir

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, n_lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n_lines:])

    # -- lifecycle
    def start(self) -> TritonProcess:
        if self._proc is not None:
            raise RuntimeError("TritonProcess already started; call stop() first or create a new TritonProcess")
        cfg = self.config
        for name in ("grpc_port", "http_port", "metrics_port"):
            port = getattr(cfg, name)
            if port_in_use(port, cfg.host):
                raise PortInUseError(
                    f"port {port} ({name}) on {cfg.host} is already in use; stop whatever holds it "
                    f"(`ss -ltnp | grep :{port}`) or choose another port, e.g. serving.triton.process.free_port()"
                )

        self._workdir = Path(tempfile.mkdtemp(prefix="semrank-triton-"))
        self.log_path = self._workdir / "triton_worker.log"
        self._log_file = open(self.log_path, "wb")  # noqa: SIM115  (closed in stop)
        tmpdir = self._workdir / "tmp"
        tmpdir.mkdir()
        cmd = [
            sys.executable, "-m", "serving.triton.process",
            *cfg.to_argv(workspace=self._workdir / "workspace"),
            "--exit-with-parent", str(os.getpid()),
        ]  # fmt: skip
        log.info("starting Triton worker: %s (log %s)", " ".join(cmd), self.log_path)
        t0 = time.monotonic()
        self._proc = subprocess.Popen(
            cmd,
            cwd=_PROJECT_ROOT,
            env=_worker_env(tmpdir),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        atexit.register(self.stop)
        try:
            self._wait_ready(t0)
        except BaseException:
            self._abort_start()
            raise
        self.startup_s = time.monotonic() - t0
        self._model_copies = _model_copy_dirs(self._proc.pid)
        log.info("Triton model %r ready at %s after %.1fs", cfg.model_name, self.grpc_url, self.startup_s)
        return self

    def _abort_start(self) -> None:
        if self._proc is not None:
            self._signal_group(self._proc.pid, signal.SIGINT)
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            self._finish(self._proc.pid, expected_exit=False)

    def _wait_ready(self, t0: float) -> None:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        cfg = self.config
        deadline = t0 + cfg.startup_timeout_s
        client = grpcclient.InferenceServerClient(url=self.grpc_url)
        try:
            while True:
                rc = self._proc.poll()
                if rc is not None:
                    raise TritonStartupError(
                        f"Triton worker exited with code {rc} before model {cfg.model_name!r} was ready; "
                        f"log {self.log_path} ends with:\n{self.log_tail()}"
                    )
                try:
                    if client.is_model_ready(cfg.model_name, client_timeout=2.0):
                        return
                except InferenceServerException:
                    pass  # not listening yet
                if time.monotonic() > deadline:
                    raise TritonStartupError(
                        f"model {cfg.model_name!r} not ready at {self.grpc_url} after {cfg.startup_timeout_s:.0f}s; "
                        f"raise startup_timeout_s if the machine is slow. Log {self.log_path} ends with:\n"
                        f"{self.log_tail()}"
                    )
                time.sleep(0.25)
        finally:
            client.close()

    def stop(self, timeout: float = 20.0) -> None:
        """SIGINT the process group, wait up to `timeout`, then SIGKILL whatever is left. Idempotent."""
        proc = self._proc
        if proc is None:
            return
        pgid = proc.pid  # start_new_session: the worker leads its own group
        rc = proc.poll()
        if rc is not None:
            log.warning("Triton worker %d had already exited with code %s; see %s", pgid, rc, self.log_path)
        else:
            self._signal_group(pgid, signal.SIGINT)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning("Triton worker %d ignored SIGINT for %.0fs; killing its process group", pgid, timeout)
        # The worker may be gone while tritonserver is still shutting down: give it the same grace.
        self._wait_group_gone(pgid, timeout=max(1.0, timeout))
        self._finish(pgid, expected_exit=rc == 0)

    def kill_hard(self) -> None:
        """SIGKILL the whole process group with no graceful step (fault injection). Idempotent."""
        proc = self._proc
        if proc is None:
            return
        self._finish(proc.pid, expected_exit=True)

    def _finish(self, pgid: int, expected_exit: bool) -> None:
        """SIGKILL any survivor of the group, reap the worker, remove files. Leaves no live process."""
        proc = self._proc
        self._signal_group(pgid, signal.SIGKILL)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            log.error("Triton worker %d still alive 10s after SIGKILL", pgid)
        # Children of a killed worker are re-parented to init, which reaps them; until then they
        # are zombies, which _group_members ignores (they hold no ports, memory or GPU).
        if not self._wait_group_gone(pgid, timeout=10):
            log.error("processes %s of Triton group %d survived SIGKILL", _group_members(pgid), pgid)
        self._proc = None
        atexit.unregister(self.stop)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        self._cleanup_files(pgid, keep_log=self.keep_log or not expected_exit)

    @staticmethod
    def _signal_group(pgid: int, sig: int) -> None:
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass

    @staticmethod
    def _wait_group_gone(pgid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while _group_members(pgid):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def _cleanup_files(self, worker_pid: int, keep_log: bool) -> None:
        """Remove the workdir (or all but the log) and shared memory a killed worker left behind."""
        if _SHM_DIR.is_dir():
            for p in _SHM_DIR.glob(f"{_SHM_PREFIX}{worker_pid}-*"):
                try:
                    p.unlink()
                except OSError:
                    pass
        for d in self._model_copies:
            shutil.rmtree(d, ignore_errors=True)
        self._model_copies = set()
        if self._workdir is None:
            return
        if keep_log:
            shutil.rmtree(self._workdir / "workspace", ignore_errors=True)
            shutil.rmtree(self._workdir / "tmp", ignore_errors=True)
            log.info("Triton worker log kept at %s", self.log_path)
        else:
            shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> TritonProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"TritonProcess({self.config.model_name!r} at {self.grpc_url}, {state}, pid={self.pid})"


if __name__ == "__main__":
    sys.exit(main())
