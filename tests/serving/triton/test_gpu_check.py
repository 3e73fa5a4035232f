"""bench/gpu_check.py runs here on CPU with a tiny batch, so it cannot rot before a GPU machine runs it:
the kit bench/gpu_kit.py builds fits the 64 MB that travel, the check imports none of semrank's
packages, and a reference it cannot reproduce fails it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).resolve().parents[3]
OURS = ("ranker", "serving", "featurizer", "training", "semrank")


@pytest.fixture(scope="module")
def kit(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpu_kit")
    subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_kit.py"), "--out", str(out), "--texts", "8"],
                   check=True, cwd=ROOT, capture_output=True, timeout=500)
    return out


def run_check(kit: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """gpu_check.py as the GPU machine runs it: semrank's packages cannot be imported."""
    block = "; ".join(f"sys.modules[{m!r}] = None" for m in OURS)
    argv = ["gpu_check.py", "--kit", str(kit), "--out", str(out), "--device", "cpu", "--dtypes", "fp32",
            "--batches", "1", "2", "--seconds", "0.05", *extra]
    code = f"import runpy, sys; {block}; sys.argv = {argv!r}; runpy.run_path({str(ROOT / 'bench' / 'gpu_check.py')!r}, run_name='__main__')"
    return subprocess.run([sys.executable, "-c", code], cwd=kit, capture_output=True, text=True, timeout=300)


def test_the_kit_fits_and_the_check_passes_on_cpu(kit, tmp_path):
    info = json.loads((kit / "kit.json").read_text())
    assert info["total_mb"] <= 64 and info["onnx_min_cosine_here"] >= 0.999
    assert info["transposed_params"] > 0  # the linear weights come back from the graph's layout
    proc = run_check(kit, tmp_path / "check.json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "check.json").read_text())
    assert report["ok"] and report["device"] == "cpu"
    fp32 = report["precisions"]["fp32"]
    assert fp32["parity"]["ok"] and fp32["parity"]["min_cosine"] >= 0.999
    assert set(fp32["batches"]) == {"1", "2"} and all(b["texts_per_s"] > 0 for b in fp32["batches"].values())
    assert report["onnx_cpu"]["ok"] and report["skipped"] == []


def test_a_reference_the_weights_do_not_reproduce_fails_the_check(kit, tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import save_file

    odd = tmp_path / "kit"
    odd.mkdir()
    for f in kit.iterdir():
        (odd / f.name).symlink_to(f)
    (odd / "reference.safetensors").unlink()
    with safe_open(str(kit / "reference.safetensors"), framework="np") as f:
        meta, emb = f.metadata(), f.get_tensor("embeddings")
    save_file({"embeddings": np.roll(emb, 1, axis=0)}, str(odd / "reference.safetensors"), metadata=meta)
    proc = run_check(odd, tmp_path / "check.json", "--budget-s", "0")
    assert proc.returncode == 1
    report = json.loads((tmp_path / "check.json").read_text())
    assert not report["ok"] and not report["precisions"]["fp32"]["parity"]["ok"] and not report["onnx_cpu"]["ok"]
    assert report["skipped"] == ["fp32 batch 1", "fp32 batch 2"]  # the budget spent: reported, not run
