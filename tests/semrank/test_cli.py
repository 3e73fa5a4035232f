import subprocess
import sys

import pytest

COMMANDS = [[], ["data"], ["data", "synth"], ["data", "import"], ["data", "validate"], ["train"], ["train", "ranker"], ["serve"], ["demo"]]


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "semrank")
def test_every_subcommand_has_help(cmd):
    out = subprocess.run([sys.executable, "-m", "semrank.cli", *cmd, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "usage: semrank" in out.stdout


@pytest.mark.parametrize("args, message", [
    (["--share-snapshot-s", "60"], "--share-snapshot-s need --events jetstream"),
    (["--snapshot-interval-s", "-1"], "snapshot_interval_s=-1.0 must be >= 0"),
])
def test_serve_setting_errors_exit_2_naming_the_setting(tmp_path, args, message):
    """A bad `semrank serve` setting fails before anything starts, with exit code 2 and a message
    naming it (no traceback)."""
    out = subprocess.run([sys.executable, "-m", "semrank.cli", "serve", "--bundle", str(tmp_path), "--data", str(tmp_path),
                          *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert message in out.stderr and "Traceback" not in out.stderr, out.stderr
