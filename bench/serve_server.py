"""The server under bench/serve.py: `semrank serve` as a child process (it starts its own Triton
worker), its metrics scraped, the CPU time of its processes read from /proc, and its warm-up."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from loadgen import RANK_METHOD, serialize  # bench/ is sys.path[0]

log = logging.getLogger("bench.serve")


# ---------------------------------------------------------------- processes and CPU


def _proc_stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds used) from /proc/<pid>/stat."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_tree(root: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and (st := _proc_stat(int(d.name))) is not None:
            parents.setdefault(st[0], []).append(int(d.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(parents.get(pid, []))
    return out


def cpu_seconds(pids: list[int]) -> float:
    return sum(st[1] for pid in pids if (st := _proc_stat(pid)) is not None)


class ServerProcess:
    """`semrank serve` in a child process (it starts its own Triton worker); stopped with SIGTERM."""

    def __init__(self, bundle: Path, shop: Path, state_dir: Path, log_path: Path, max_concurrent_rpcs: int,
                 encoder_timeout_ms: float, extra: list[str] = (), env: dict[str, str] | None = None):
        self.argv = [
            sys.executable, "-m", "semrank.cli", "serve", "--bundle", str(bundle), "--data", str(shop),
            "--state-dir", str(state_dir), "--port", "0", "--reload-poll-s", "0", "--log-level", "WARNING",
            "--max-concurrent-rpcs", str(max_concurrent_rpcs), "--encoder-timeout-ms", str(encoder_timeout_ms),
            "--metrics-port", "0", *extra,
        ]
        self.env = {**os.environ, **(env or {})}
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None

    def start(self, timeout_s: float = 900.0) -> int:
        import re

        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=self._log, text=True, env=self.env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"semrank serve exited ({self.proc.wait()}); see {self.log_path}")
            if m := re.search(r"semrank serving on [\w.\-]+:(\d+)(?:, metrics on :(\d+))?", line):
                self.port, self.metrics_port = int(m[1]), int(m[2]) if m[2] else None
                threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()  # drain
                return self.port
        raise RuntimeError(f"semrank serve not ready after {timeout_s:.0f} s; see {self.log_path}")

    def _is_server(self, pid: int) -> bool:
        """The serving processes (the supervisor and its workers) as opposed to Triton's."""
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return b"semrank.cli" in argv and b"serve" in argv

    def server_pids(self) -> list[int]:
        return [p for p in process_tree(self.proc.pid) if self._is_server(p)]

    def triton_pids(self) -> list[int]:
        return [p for p in process_tree(self.proc.pid) if not self._is_server(p)]

    def rank_counts(self) -> dict[str, float]:
        """Rank calls answered so far, per worker ("0" for a server without workers), from /metrics."""
        return self.scrape()["ranks_per_worker"]

    def scrape(self) -> dict:
        """From /metrics (every worker summed): Ranks per worker, Rank and Triton latency sums, the engine's
        cache lookups by cache and result ("user_embedding:miss"), the encoder calls Rank issued by cause,
        degraded answers by reason, and history items the pooled tower left out."""
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        out = {"ranks_per_worker": {}, "rank_s": 0.0, "triton_s": 0.0, "triton_calls": 0.0, "cache": {},
               "rank_encoder_calls": {}, "degraded": {}, "history_skipped": 0.0, "gc_count": {}, "gc_s": {},
               "gc_over_100ms": {}, "loop_lag_over_100ms": 0.0, "engine_s": 0.0, "engine_n": 0.0, "engine_cpu_s": 0.0}
        for fam in text_string_to_metric_families(text):
            for smp in fam.samples:
                labels = smp.labels
                if smp.name == "semrank_rpc_latency_seconds_count" and labels.get("method") == "Rank":
                    w = labels.get("worker", "0")
                    out["ranks_per_worker"][w] = out["ranks_per_worker"].get(w, 0.0) + smp.value
                elif smp.name == "semrank_rpc_latency_seconds_sum" and labels.get("method") == "Rank":
                    out["rank_s"] += smp.value
                elif smp.name == "semrank_triton_latency_seconds_sum":
                    out["triton_s"] += smp.value
                elif smp.name == "semrank_triton_latency_seconds_count":
                    out["triton_calls"] += smp.value
                elif smp.name == "semrank_cache_requests_total":
                    c = f"{labels.get('cache')}:{labels.get('result')}"
                    out["cache"][c] = out["cache"].get(c, 0.0) + smp.value
                elif smp.name == "semrank_rank_encoder_calls_total":
                    c = labels.get("cause", "?")
                    out["rank_encoder_calls"][c] = out["rank_encoder_calls"].get(c, 0.0) + smp.value
                elif smp.name == "semrank_degraded_total":
                    c = labels.get("reason", "?")
                    out["degraded"][c] = out["degraded"].get(c, 0.0) + smp.value
                elif smp.name == "semrank_user_history_items_skipped_total":
                    out["history_skipped"] += smp.value
                elif smp.name.startswith("semrank_gc_pause_seconds"):
                    g = labels.get("generation", "?")
                    if smp.name.endswith("_count"):
                        out["gc_count"][g] = out["gc_count"].get(g, 0.0) + smp.value
                    elif smp.name.endswith("_sum"):
                        out["gc_s"][g] = out["gc_s"].get(g, 0.0) + smp.value
                    elif smp.name.endswith("_bucket") and labels.get("le") == "0.1":
                        out["gc_over_100ms"][g] = out["gc_over_100ms"].get(g, 0.0) - smp.value
                    elif smp.name.endswith("_bucket") and labels.get("le") == "+Inf":
                        out["gc_over_100ms"][g] = out["gc_over_100ms"].get(g, 0.0) + smp.value
                elif smp.name == "semrank_rank_engine_seconds_sum":
                    out["engine_s"] += smp.value
                elif smp.name == "semrank_rank_engine_seconds_count":
                    out["engine_n"] += smp.value
                elif smp.name == "semrank_rank_engine_cpu_seconds_total":
                    out["engine_cpu_s"] += smp.value
                elif smp.name == "semrank_event_loop_lag_seconds_bucket" and labels.get("le") in ("0.1", "+Inf"):
                    out["loop_lag_over_100ms"] += smp.value if labels["le"] == "+Inf" else -smp.value
        return out

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            log.warning("semrank serve did not stop in 90 s: killing it")
            self.proc.kill()
            self.proc.wait()
        self._log.close()


# ---------------------------------------------------------------- warm-up


def warm_server(port: int, users: list[str], items: list[str], concurrency: int = 4, rounds: int = 3,
                token: str | None = None, channels: int = 1) -> dict:
    """Rank every bench user once, so Triton embeds their history and the server caches it; users
    whose answer came back degraded (encoder busy) are tried again, after the breaker's pause.
    With workers (each has its own cache), every user is ranked once on each of `channels`
    separate connections, which SO_REUSEPORT spreads over the workers as it will in the phases."""
    import grpc

    from semrank.ranking.v1 import ranking_service_pb2 as pb

    metadata = (("authorization", f"Bearer {token}"),) if token else None

    async def run(todo: list[str]) -> list[str]:
        degraded: list[str] = []
        chans = [grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
                 for _ in range(channels)]
        try:
            for ch in chans:
                call, left = ch.unary_unary(RANK_METHOD), list(todo)

                async def worker() -> None:
                    while left:
                        u = left.pop()
                        raw = await call(serialize(u, items[:100], 10), timeout=60, metadata=metadata)
                        if pb.RankResponse.FromString(raw).degraded and u not in degraded:
                            degraded.append(u)

                await asyncio.gather(*(worker() for _ in range(concurrency)))
        finally:
            for ch in chans:
                await ch.close()
        return degraded

    t = time.monotonic()
    todo = list(users)
    for r in range(rounds):
        todo = asyncio.run(run(todo))
        if not todo:
            break
        log.warning("warm-up round %d: %d degraded answer(s); trying those users again", r + 1, len(todo))
        time.sleep(3.0)
    return {"users": len(users), "still_degraded": len(todo), "seconds": round(time.monotonic() - t, 1)}
