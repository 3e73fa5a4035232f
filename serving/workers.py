"""`semrank serve --workers N`: N serving processes on one port, one Triton, one embedding set, one /metrics.

    supervisor = WorkerSupervisor(cfg, n=2, child_args=argv_without_workers)
    port = await supervisor.start()     # Triton up, catalog embedded once, N workers serving
    await supervisor.stop()             # SIGTERM every worker, then stop Triton

One asyncio loop uses one core, so a host runs several serving processes. This supervisor:
1. refuses `--workers > 1` without `--events jetstream`: the workers are replicas of one another
   and share their events, items and bundle through the stream exactly as replicas on several
   hosts do (docs/scaling.md). We chose this over one process owning the local log and the others
   tailing it: that would be a second consistency path, with its own exactly-once and
   read-your-writes rules, for a setup JetStream already covers;
2. starts one Triton per encoder the bundles use (supervised: restarted on the same port when it
   dies) and gives its address to every worker (`--worker-triton KEY=URL`), so the workers share
   one copy of the model and one dynamic batcher;
3. embeds the catalog once into `STATE/embeddings` and consolidates it into one file per encoder
   (`base.safetensors`), which every worker memory-maps copy-on-write, so the workers share its
   pages and no worker embeds the catalog again; upserted items' embeddings are appended there
   with file names of each worker's own (serving.ranking.item_store);
4. starts the workers on the same port: gRPC servers bind with SO_REUSEPORT (grpc's default on
   Linux), and the kernel spreads new connections over them. Each worker has its own state
   directory, `STATE/workers/<k>` (feature snapshot, upserted item data, exposures): nothing a
   worker writes can collide with another's. `semrank ab report --exposures STATE/workers/*/exposures`
   merges the exposures;
5. serves one `/metrics` (on `--metrics-port`): every worker's metrics, scraped on loopback,
   each sample labelled `worker="<k>"`, plus the supervisor's own (`semrank_workers_up`,
   `semrank_worker_restarts_total`). prometheus_client's multiprocess mode was the other way; it
   cannot hold the gauges and callbacks the workers expose, so it would lose metrics;
6. restarts a worker that dies (after 1 s), and stops everything on SIGTERM. Workers watch the
   supervisor and stop if it is killed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from featurizer.contracts.experiments import load_experiments
from featurizer.contracts.schema import read_dataset
from featurizer.errors import ConfigError
from ranker.bundle import load_bundle
from serving.config import ServeConfig
from serving.encoding.factories import TritonEncoderOptions, external_triton_factory, triton_encoder_factory
from serving.encoding.pool import EncoderPool
from serving.ranking.item_store import ItemStore
from serving.triton.process import free_port

log = logging.getLogger(__name__)

SERVING_LINE = re.compile(r"semrank serving on ([\w.\-]+):(\d+)(?:, metrics on :(\d+))?")
RESTART_AFTER_S = 1.0


@dataclass
class Worker:
    index: int
    proc: subprocess.Popen | None = None
    port: int | None = None
    metrics_port: int | None = None
    restarts: int = 0
    ready: threading.Event = field(default_factory=threading.Event)


class WorkerSupervisor:
    def __init__(self, cfg: ServeConfig, n: int, child_args: list[str]):
        if n < 2:
            raise ValueError(f"n={n}: a supervisor runs 2 or more workers (1 is plain `semrank serve`)")
        if cfg.events is None:
            raise ConfigError("--workers > 1 needs --events jetstream: the workers share events, items and the bundle "
                              "through the stream (docs/scaling.md); the local event log has one writer process")
        if cfg.state_dir is None:
            raise ConfigError("--workers > 1 needs --state-dir (the workers' state and the shared embeddings)")
        self.cfg, self.n, self.child_args = cfg, n, list(child_args)
        self.port = cfg.port or free_port(cfg.host if cfg.host not in ("0.0.0.0", "::") else "127.0.0.1")
        self.workers = [Worker(k) for k in range(n)]
        self.tritons: dict[str, object] = {}  # encoder key -> TritonProcess
        self.pool: EncoderPool | None = None
        self._stopping = False
        self._task: asyncio.Task | None = None
        self._http: ThreadingHTTPServer | None = None
        self.metrics_port: int | None = None

    # ------------------------------------------------------------ start

    async def start(self, timeout_s: float = 600.0) -> int:
        cfg = self.cfg
        try:
            await self._start_tritons()
            await self._embed_catalog()
            for w in self.workers:
                self._spawn(w)
            deadline = time.monotonic() + timeout_s
            for w in self.workers:
                while not w.ready.is_set():
                    if w.proc.poll() is not None:
                        raise RuntimeError(f"worker {w.index} exited with {w.proc.returncode} before serving "
                                           "(its log lines above say why)")
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"worker {w.index} did not report its port within {timeout_s:.0f} s")
                    await asyncio.sleep(0.05)
            if cfg.metrics_port is not None:
                self._start_metrics(cfg.metrics_host, cfg.metrics_port)
            self._task = asyncio.create_task(self._supervise())
        except BaseException:
            await self.stop()
            raise
        log.info("%d workers serving on %s:%d, one Triton per encoder (%s)", self.n, cfg.host, self.port,
                 ", ".join(f"{k}: {t.grpc_url}" for k, t in self.tritons.items()))
        return self.port

    async def _start_tritons(self) -> None:
        cfg = self.cfg
        opts = TritonEncoderOptions(deadline_s=cfg.encoder_timeout_s, retries=cfg.encoder_retries,
                                    max_queue_delay_us=cfg.triton_max_queue_delay_us, supervise_s=cfg.triton_supervise_s)
        if cfg.triton is not None:  # the workers use it too (their argv carries --triton-url)
            self.pool = EncoderPool(external_triton_factory(cfg.triton, opts))
        else:
            self.pool = EncoderPool(triton_encoder_factory(opts, started=self.tritons.__setitem__,
                                                           stopped=lambda k: self.tritons.pop(k, None)))
        paths = [Path(cfg.bundle_dir)]
        if cfg.experiments_file:
            paths += sorted(load_experiments(cfg.experiments_file).bundles())
        self._handles = []
        for p in paths:
            bundle = await asyncio.to_thread(load_bundle, p)
            self._handles.append(await self.pool.acquire(bundle.encoder, p))

    async def _embed_catalog(self) -> None:
        """Embed the catalog once into the shared embeddings directory (the workers then embed nothing)."""
        state = Path(self.cfg.state_dir)
        items = ItemStore(read_dataset(self.cfg.data_dir).items, None, state / "embeddings")
        for h in {h.key: h for h in self._handles}.values():
            n = await items.ensure_embeddings(h.key, h.encoder.encode_bulk, h.dim)
            if n:
                log.info("embedded %d catalog item(s) with encoder %s for the workers", n, h.key)
            path = await asyncio.to_thread(items.consolidate, h.key)  # one file the workers map and share
            log.info("the workers map %s", path)

    def _argv(self, w: Worker) -> list[str]:
        state = Path(self.cfg.state_dir)
        argv = [sys.executable, "-m", "semrank.cli", "serve", *self.child_args, "--port", str(self.port),
                "--state-dir", str(state / "workers" / str(w.index)), "--embeddings-dir", str(state / "embeddings"),
                "--worker-of", str(os.getpid())]
        if self.cfg.metrics_port is not None:
            argv += ["--metrics-port", "0", "--metrics-host", "127.0.0.1"]
        for key, t in self.tritons.items():
            argv += ["--worker-triton", f"{key}={t.grpc_url}"]
        return argv

    def _spawn(self, w: Worker) -> None:
        w.ready.clear()
        w.port = w.metrics_port = None
        w.proc = subprocess.Popen(self._argv(w), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1", "SEMRANK_WORKER": str(w.index)})
        threading.Thread(target=self._read_stdout, args=(w, w.proc), name=f"worker-{w.index}-stdout", daemon=True).start()

    def _read_stdout(self, w: Worker, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            if (m := SERVING_LINE.search(line)) and not w.ready.is_set():
                w.port, w.metrics_port = int(m[2]), int(m[3]) if m[3] else None
                w.ready.set()
            else:
                sys.stdout.write(f"[worker {w.index}] {line}")

    # ------------------------------------------------------------ run

    async def _supervise(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            for w in self.workers:
                if self._stopping or w.proc is None or w.proc.poll() is None:
                    continue
                log.error("worker %d exited with %s: restarting it in %.0f s", w.index, w.proc.returncode,
                          RESTART_AFTER_S)
                await asyncio.sleep(RESTART_AFTER_S)
                if not self._stopping:
                    w.restarts += 1
                    self._spawn(w)

    @property
    def pids(self) -> list[int]:
        return [w.proc.pid for w in self.workers if w.proc is not None and w.proc.poll() is None]

    # ------------------------------------------------------------ one /metrics

    def metrics_text(self) -> str:
        """Every worker's /metrics with a worker label, then the supervisor's own."""
        families: dict[str, dict[str, list[str]]] = {}  # name (of its # TYPE line) -> head lines, samples
        for w in self.workers:
            if w.metrics_port is None or not w.ready.is_set():
                continue
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{w.metrics_port}/metrics", timeout=2) as r:
                    text = r.read().decode()
            except OSError:
                continue  # a worker restarting: its samples are missing from this scrape
            family = None
            for line in text.splitlines():
                if line.startswith(("# HELP ", "# TYPE ")):
                    family = families.setdefault(line.split()[2], {"head": [], "samples": []})
                    if line not in family["head"]:
                        family["head"].append(line)
                elif line and family is not None:
                    family["samples"].append(_with_label(line, "worker", str(w.index)))
        out = [line for f in families.values() for line in f["head"] + f["samples"]]
        up = sum(1 for w in self.workers if w.proc is not None and w.proc.poll() is None and w.ready.is_set())
        out += ["# HELP semrank_workers_up Worker processes serving now.", "# TYPE semrank_workers_up gauge",
                f"semrank_workers_up {up}",
                "# HELP semrank_worker_restarts_total Worker processes restarted after they died.",
                "# TYPE semrank_worker_restarts_total counter"]
        out += [f'semrank_worker_restarts_total{{worker="{w.index}"}} {w.restarts}' for w in self.workers]
        return "\n".join(out) + "\n"

    def _start_metrics(self, host: str, port: int) -> None:
        supervisor = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the http.server API
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404)
                    return
                body = supervisor.metrics_text().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # quiet
                pass

        self._http = ThreadingHTTPServer((host, port), Handler)
        self._http.daemon_threads = True
        self.metrics_port = self._http.server_address[1]
        threading.Thread(target=self._http.serve_forever, name="metrics", daemon=True).start()

    # ------------------------------------------------------------ stop

    async def stop(self, grace_s: float = 30.0) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is None:
                w.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for w in self.workers:
            if w.proc is None:
                continue
            while w.proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if w.proc.poll() is None:
                log.error("worker %d did not stop within %.0f s: killing it", w.index, grace_s)
                w.proc.kill()
                w.proc.wait()
        if self._http is not None:
            self._http.shutdown()
            self._http = None
        if self.pool is not None:
            await self.pool.close()  # stops the Tritons
            self.pool = None


def _with_label(sample: str, name: str, value: str) -> str:
    """A Prometheus text sample line with one more label."""
    head, sep, rest = sample.partition("{")
    if sep:
        return f'{head}{{{name}="{value}",{rest}'
    metric, _, tail = sample.partition(" ")
    return f'{metric}{{{name}="{value}"}} {tail}'


def pin_worker(index: int) -> int:
    """Pin this process (its threads started from now on too) to one CPU: the `index`-th of the CPUs
    it may use, wrapping around. Returns that CPU. Called first thing in a worker, before its
    threads start (`semrank serve --workers N --pin-workers`)."""
    cpus = sorted(os.sched_getaffinity(0))
    cpu = cpus[index % len(cpus)]
    os.sched_setaffinity(0, {cpu})
    log.info("worker %d pinned to CPU %d", index, cpu)
    return cpu


def watch_supervisor(pid: int, period_s: float = 1.0) -> None:
    """In a worker: SIGTERM ourselves (a graceful stop) once the supervisor `pid` is gone."""
    def loop() -> None:
        while os.getppid() == pid:
            time.sleep(period_s)
        log.warning("the supervisor (pid %d) is gone: stopping", pid)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=loop, name="watch-supervisor", daemon=True).start()
