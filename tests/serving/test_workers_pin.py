"""`semrank serve --workers N --pin-workers`: worker i runs on one CPU, the i-th of those it may use."""

from __future__ import annotations

import os
import subprocess
import sys


def test_a_pinned_worker_runs_on_its_cpu_and_its_later_threads_too():
    code = (
        "import os, threading\n"
        "from serving.workers import pin_worker\n"
        "cpus = sorted(os.sched_getaffinity(0))\n"
        "got = pin_worker(3)\n"
        "seen = []\n"
        "t = threading.Thread(target=lambda: seen.append(os.sched_getaffinity(0))); t.start(); t.join()\n"
        "assert got == cpus[3 % len(cpus)], (got, cpus)\n"
        "assert os.sched_getaffinity(0) == {got} == seen[0], (os.sched_getaffinity(0), seen)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
