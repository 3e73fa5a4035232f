import subprocess
import sys

import pytest

COMMANDS = [[], ["data"], ["data", "synth"], ["data", "import"], ["data", "validate"], ["train"], ["train", "ranker"], ["serve"], ["demo"]]


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "semrank")
def test_every_subcommand_has_help(cmd):
    out = subprocess.run([sys.executable, "-m", "semrank.cli", *cmd, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "usage: semrank" in out.stdout
