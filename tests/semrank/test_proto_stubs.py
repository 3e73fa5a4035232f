"""The committed gRPC stubs must be exactly what `make proto` generates from protos/."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO = "semrank/ranking/v1/ranking_service.proto"


def test_stubs_match_proto(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", str(ROOT / "protos"), f"--python_out={tmp_path}",
         f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", str(ROOT / "protos" / PROTO)],
        check=True,
    )
    for name in ("ranking_service_pb2.py", "ranking_service_pb2.pyi", "ranking_service_pb2_grpc.py"):
        fresh = (tmp_path / "semrank/ranking/v1" / name).read_text()
        committed = (ROOT / "semrank/ranking/v1" / name).read_text()
        assert fresh == committed, f"semrank/ranking/v1/{name} drifted from {PROTO}: run `make proto`"
