"""The Node.js client (clients/node) against a real server over a real channel: Rank, LogEvents with
event ids (a retried call is stored once), the rich error details decoded in JavaScript, health.
`make test` installs its dependencies with `npm ci` from the lock file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest

from featurizer.contracts.schema import read_dataset
from serving.config import ServeConfig
from tests.integration.serving_kit import ServerThread

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

CLIENT = Path(__file__).resolve().parents[2] / "clients" / "node"


def test_the_node_client_ranks_logs_events_once_and_decodes_errors(small_shop, small_bundle):
    node = shutil.which("node")
    assert node, "Node.js is needed for the client test (see README: Node 20)"
    assert (CLIENT / "node_modules" / "@grpc" / "grpc-js").is_dir(), \
        "clients/node has no node_modules: run `make test` (it runs `npm ci` there) or `npm ci --prefix clients/node`"
    items = read_dataset(small_shop).items["item_id"].head(8).to_list()
    cfg = ServeConfig(bundle_dir=small_bundle[0], data_dir=small_shop, port=0, reload_poll_s=0, encoder_timeout_s=5.0)
    with ServerThread(cfg) as st:
        env = {**os.environ, "SEMRANK_ADDRESS": f"127.0.0.1:{st.port}", "SEMRANK_ITEMS": ",".join(items)}
        proc = subprocess.run([node, "check.js"], cwd=CLIENT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["health"] == "SERVING"
    assert seen["logEvents"] == {"first": {"accepted": 3, "duplicates": 0}, "retry": {"accepted": 0, "duplicates": 3}}
    assert seen["invalid"]["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert [v["field"] for v in seen["invalid"]["fieldViolations"]] == ["user_id", "candidates"]
