"""The Go client example (clients/go), built offline from Debian's Go and gRPC packages, against a
real server over a real channel: health, Rank, LogEvents with event ids (a retried call is stored
once, an event without an id is refused client-side), the rich error details decoded in Go.
`make test` installs the Debian packages when they are missing (the `go-toolchain` target)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from featurizer.contracts.schema import read_dataset
from serving.config import ServeConfig
from tests.integration.serving_kit import ServerThread

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

CLIENT = Path(__file__).resolve().parents[2] / "clients" / "go"


def test_the_go_client_builds_from_debian_packages_and_checks_out(small_shop, small_bundle, tmp_path):
    assert shutil.which("go") and shutil.which("protoc-gen-go-grpc"), \
        "the Go toolchain is needed for the Go client test: run `make go-toolchain` (Debian packages)"
    build = subprocess.run([str(CLIENT / "build.sh"), str(tmp_path / "go")], capture_output=True, text=True,
                           timeout=300, env={**os.environ, "PYTHON": sys.executable})
    assert build.returncode == 0, build.stderr
    binary = build.stdout.strip().splitlines()[-1]
    items = read_dataset(small_shop).items["item_id"].head(8).to_list()
    cfg = ServeConfig(bundle_dir=small_bundle[0], data_dir=small_shop, port=0, reload_poll_s=0, encoder_timeout_s=5.0)
    with ServerThread(cfg) as st:
        env = {**os.environ, "SEMRANK_ADDRESS": f"127.0.0.1:{st.port}", "SEMRANK_ITEMS": ",".join(items)}
        proc = subprocess.run([binary], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["health"] == "SERVING"
    assert seen["logEvents"] == {"first": {"accepted": 3, "duplicates": 0}, "retry": {"accepted": 0, "duplicates": 3}}
    assert seen["invalid"]["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert seen["invalid"]["reason"] == "INVALID_REQUEST"
    assert [v["field"] for v in seen["invalid"]["fieldViolations"]] == ["user_id", "candidates"]
