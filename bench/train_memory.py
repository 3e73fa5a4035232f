"""Peak memory and wall time of `semrank train ranker`, and where the memory goes (issue 32 item 1).

    .venv/bin/python bench/train_memory.py --data runs/data/D [--data runs/data/E ...]
        [--synth-interactions 20000 200000] [--chunk-rows 250000 [50000 ...]] [--max-users 20000 ...]
        [--baseline-checkout DIR]
        [--out runs/bench-train-memory] [--timeout-min 60] [-- extra `semrank train ranker` arguments]

Each run is a fresh `semrank train ranker --data D --out OUT/...` subprocess (the pretrained encoder
unless the extra arguments say otherwise; item embeddings cached in OUT/cache, shared by the runs).
Its resident memory (VmRSS of the process and its children) is sampled every 0.2 s and tagged with
the phase its log was in (the last `INFO module:` line); the peak is the kernel's VmHWM.
`--baseline-checkout DIR` runs the same commands from another checkout of semrank (e.g. a worktree of
the commit before a change), in the same invocation: the machine is noisy, compare within one run.

Prints one JSON object per run: data, users (of the dataset), max_users, chunk_rows, checkout, the
example rows (train / valid, from the bundle's manifest), peak_rss_mb, wall_s, the peak per phase,
the event log's in-memory size (polars `estimated_size` of events + items: the formula's first term),
the validation NDCG@10 of the bundle, and the machine. Writes OUT/train_memory.json and a PNG of RSS
over time per run (OUT/train_memory.png).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from machine import machine  # bench/ is sys.path[0]

ROOT = Path(__file__).resolve().parents[1]
PHASE = re.compile(r"INFO ([\w.]+): (.{0,60})")
LAUNCH = "import sys; from semrank.cli import main; sys.argv[0] = 'semrank'; sys.exit(main())"


def _rss_kb(pid: int) -> tuple[int, int]:
    """(VmRSS of pid and its descendants, VmHWM of pid) in kB; (0, 0) once it is gone."""
    def status(p: int) -> dict[str, int]:
        try:
            with open(f"/proc/{p}/status") as f:
                return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f) if k in ("VmRSS", "VmHWM")}
        except (OSError, ValueError):
            return {}

    def children(p: int) -> list[int]:
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                return [int(c) for c in f.read().split()]
        except OSError:
            return []

    top = status(pid)
    total, stack = top.get("VmRSS", 0), children(pid)
    while stack:
        c = stack.pop()
        total += status(c).get("VmRSS", 0)
        stack += children(c)
    return total, top.get("VmHWM", 0)


def run_one(data: Path, out: Path, chunk_rows: int | None, max_users: int | None, checkout: Path, extra: list[str],
            timeout_s: float, cache: Path) -> dict:
    cmd = [sys.executable, "-c", LAUNCH, "train", "ranker", "--data", str(data), "--out", str(out),
           "--embedding-cache", str(cache), *extra]
    if chunk_rows is not None:
        cmd += ["--chunk-rows", str(chunk_rows)]
    if max_users is not None:
        cmd += ["--max-users", str(max_users)]
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=checkout, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    phase, samples, tail = ["start"], [], []

    def read() -> None:
        buf = ""
        while chunk := os.read(proc.stderr.fileno(), 65536):  # what is there now: the phase must not lag
            buf += chunk.decode(errors="replace")
            *lines, buf = re.split(r"[\r\n]", buf)
            for line in lines:
                m = PHASE.search(line)
                if m:
                    phase[0] = f"{m.group(1).rsplit('.', 1)[-1]}: {m.group(2)}"
                    tail.append(line.strip())
                elif "Error" in line or "Traceback" in line:
                    tail.append(line.strip())
                del tail[:-20]

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    hwm = 0
    while proc.poll() is None:
        rss, top_hwm = _rss_kb(proc.pid)
        hwm = max(hwm, top_hwm)
        samples.append((round(time.monotonic() - t0, 2), rss // 1024, phase[0]))
        if time.monotonic() - t0 > timeout_s:
            proc.kill()
            break
        time.sleep(0.2)
    proc.wait()
    reader.join(timeout=5)
    wall = time.monotonic() - t0
    by_phase: dict[str, int] = {}
    for _, mb, ph in samples:
        by_phase[ph] = max(by_phase.get(ph, 0), mb)
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if proc.returncode == 0 and manifest_path.exists() else {}
    td = manifest.get("training_data", {})
    valid = manifest.get("metrics", {}).get("valid", {}).get("lightgbm", {}) or \
        manifest.get("metrics", {}).get("test", {}).get("lightgbm-bundle", {})
    return {
        "rc": proc.returncode, "wall_s": round(wall, 1),
        "peak_rss_mb": max(hwm // 1024, max((s[1] for s in samples), default=0)),
        "rows": td.get("rows"), "groups": td.get("groups") or td.get("lists"), "users_trained": td.get("users"),
        "ndcg@10": valid.get("ndcg@10"), "peak_by_phase_mb": dict(sorted(by_phase.items(), key=lambda kv: -kv[1])[:6]),
        "samples": samples, "log_tail": tail[-5:] if proc.returncode else [],
    }


def event_log_mb(data: Path) -> tuple[float, int]:
    """(events + items in memory as `read_dataset` gives them, MB; users in the events)."""
    sys.path.insert(0, str(ROOT))
    from featurizer.contracts.schema import read_dataset

    ds = read_dataset(data)
    return round((ds.events.estimated_size() + ds.items.estimated_size()) / 2**20, 1), ds.events["user_id"].n_unique()


def synth_interactions(out: Path, users: int, items: int = 20_000, seed: int = 0) -> Path:
    """An interaction log of `users` shoppers (purchases only, no impression lists: the leave-one-out
    path) over `items` titled items in 50 categories, written once to `out`. Each user buys 4 +
    Poisson(8) items over a few weeks, 60% from a favourite category, the rest by global popularity
    (Zipf). For memory and time at a given size; its rankings mean nothing."""
    if (out / "events.parquet").exists():
        return out
    sys.path.insert(0, str(ROOT))
    import numpy as np
    import polars as pl

    from featurizer.contracts.schema import write_dataset

    rng = np.random.default_rng(seed)
    cats = np.arange(items) % 50
    words = np.array(["soft", "bright", "classic", "travel", "mini", "deluxe", "organic", "daily", "pro", "slim"])
    titles = [f"{words[k % 10]} {words[(k // 10) % 10]} item {k} of category {c}" for k, c in enumerate(cats.tolist())]
    item_tbl = pl.DataFrame({"item_id": [f"i{k}" for k in range(items)], "title": titles,
                             "category": [f"c{c}" for c in cats.tolist()], "price": rng.uniform(2, 80, items).round(2)})
    lengths = 4 + rng.poisson(8, users)
    user = np.repeat(np.arange(users), lengths)
    n = user.size
    pop = 1.0 / np.arange(1, items + 1) ** 0.9
    pop /= pop.sum()
    favourite = rng.integers(0, 50, users)[user]
    in_cat = favourite + 50 * np.minimum(rng.zipf(1.6, n) - 1, items // 50 - 1)  # the category's k-th item
    item = np.where(rng.random(n) < 0.6, in_cat, rng.choice(items, size=n, p=pop))
    start = rng.uniform(0, 300 * 86_400, users)[user]
    gaps = rng.exponential(2 * 86_400, n)
    first = np.r_[0, np.cumsum(lengths)[:-1]]
    t = np.cumsum(gaps)
    t -= np.repeat(t[first], lengths)  # seconds since the user's first purchase
    ts = (1_700_000_000 + start + t) * 1_000_000
    events = pl.DataFrame({"ts": pl.Series(ts.astype(np.int64)).cast(pl.Datetime("us", "UTC")),
                           "user_id": [f"u{u}" for u in user.tolist()], "item_id": [f"i{k}" for k in item.tolist()],
                           "event": ["purchase"] * n})
    write_dataset(out, item_tbl, events)
    return out


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for r in results:
        t = [s[0] for s in r["samples"]]
        ax.plot(t, [s[1] / 1024 for s in r["samples"]], label=f"{r['label']} (peak {r['peak_rss_mb'] / 1024:.1f} GB)")
    ax.set_xlabel("seconds")
    ax.set_ylabel("RSS, GB")
    ax.set_title("semrank train ranker: resident memory")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, action="append", default=[])
    ap.add_argument("--synth-interactions", type=int, nargs="*", default=[],
                    help="also run on generated interaction logs of these many users (runs/synth/interactions-N)")
    ap.add_argument("--chunk-rows", type=int, nargs="*", default=[None], help="default: the trainer's own")
    ap.add_argument("--max-users", type=int, nargs="*", default=[None], help="default: the trainer's own (20,000)")
    ap.add_argument("--baseline-checkout", type=Path, default=None,
                    help="another checkout to run the same commands from (its own defaults; no --chunk-rows)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-train-memory")
    ap.add_argument("--timeout-min", type=float, default=60.0)
    args, extra = ap.parse_known_args()
    extra = [a for a in extra if a != "--"]
    args.out = args.out.resolve()  # a baseline checkout runs in its own directory: its bundle still goes here
    args.out.mkdir(parents=True, exist_ok=True)
    args.data += [synth_interactions(ROOT / "runs" / "synth" / f"interactions-{n}", n) for n in args.synth_interactions]
    if not args.data:
        ap.error("give --data or --synth-interactions")
    results = []
    checkouts = [("current", ROOT)] + ([("baseline", args.baseline_checkout.resolve())] if args.baseline_checkout else [])
    for data in args.data:
        log_mb, users = event_log_mb(data)
        for name, checkout in checkouts:
            for max_users in args.max_users:
                for chunk_rows in (args.chunk_rows if name == "current" else [None]):
                    label = f"{data.name} {name} users={max_users or 'default'} chunk={chunk_rows or 'default'}"
                    print(f"# {label}", file=sys.stderr, flush=True)
                    out = args.out / re.sub(r"[^\w.=-]+", "_", label)
                    r = run_one(data.resolve(), out, chunk_rows, max_users, checkout, extra, args.timeout_min * 60,
                                (args.out / "cache").resolve())
                    r.update(label=label, data=data.name, users=users, checkout=name, max_users=max_users,
                             chunk_rows=chunk_rows, event_log_mb=log_mb, machine=machine())
                    results.append(r)
                    print(json.dumps({k: v for k, v in r.items() if k != "samples"}), flush=True)
    (args.out / "train_memory.json").write_text(json.dumps(results))
    plot(results, args.out / "train_memory.png")
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
