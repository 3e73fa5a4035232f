"""Start and stop the Triton encoder worker (serving/triton/worker.py) from the parent process.

`TritonProcess` spawns `python -m serving.triton.worker` in its own process group, waits until
the model is ready, and on `stop()`/`kill_hard()` makes sure no process of that group (in
particular `tritonserver`) survives, nor the shared memory and model copies a hard-killed
worker leaves behind.
"""

from __future__ import annotations

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
import time
from pathlib import Path

from featurizer.errors import SemrankError
from serving.triton.worker import TritonWorkerConfig

log = logging.getLogger(__name__)

# Where `python -m serving.triton.worker` works even without an installed package.
_PROJECT_ROOT = Path(__file__).resolve().parents[2]
# pytriton names the Python backend's shared-memory regions "pytrtion<worker pid>-<hash>..."
# (sic); a hard-killed worker leaves them in /dev/shm.
_SHM_DIR = Path("/dev/shm")
_SHM_PREFIX = "pytrtion"
# tritonserver copies each model it loads to /tmp/folderXXXXXX (it ignores TMPDIR) and removes
# the copy only on a clean exit; the Python-backend stub gets ".../folderXXXXXX/<version>/model.py".
_MODEL_COPY_RE = re.compile(r"^(/.+/folder[A-Za-z0-9]{6})/\d+/model\.py$")


class PortInUseError(SemrankError, RuntimeError):
    """A port the worker needs is already bound by another process."""

    grpc_code = "UNAVAILABLE"
    reason = "PORT_IN_USE"


class TritonStartupError(SemrankError, RuntimeError):
    """The Triton worker exited or did not become ready in time."""

    grpc_code = "UNAVAILABLE"
    reason = "TRITON_NOT_READY"


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
            sys.executable, "-m", "serving.triton.worker",
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
        tls = {}
        if cfg.tls_cert is not None:
            tls = {"ssl": True, "root_certificates": cfg.tls_ca}  # a path: tritonclient reads it
        client = grpcclient.InferenceServerClient(url=self.grpc_url, **tls)
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
