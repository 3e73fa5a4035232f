"""`semrank ab report`: help, exit codes and the sample-ratio banner end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import polars as pl
import pytest

from semrank.cli import main


@pytest.mark.parametrize("cmd", [["ab"], ["ab", "report"]], ids=" ".join)
def test_ab_subcommands_have_help(cmd):
    out = subprocess.run([sys.executable, "-m", "semrank.cli", *cmd, "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "usage: semrank ab" in out.stdout


def _experiment_files(tmp_path, n_control: int, n_treatment: int):
    """One exposure per user, a click for every third user, items with prices."""
    n = n_control + n_treatment
    users = [f"u{i:05d}" for i in range(n)]
    ts = "2026-12-01T10:00:00.000000Z"
    pl.DataFrame({
        "ts": ts, "request_id": [f"r{i}" for i in range(n)], "user_id": users, "experiment": "ft",
        "variant": ["control"] * n_control + ["treatment"] * n_treatment, "bundle_version": "v1",
        "item_ids": [["i1", "i2"]] * n,
    }).write_ndjson(tmp_path / "exposures-000.jsonl")
    clicked = np.arange(n) % 3 == 0
    pl.DataFrame({"ts": "2026-12-01T10:01:00Z", "user_id": np.array(users)[clicked].tolist(), "item_id": "i2",
                  "event": "click"}).write_csv(tmp_path / "events.csv")
    pl.DataFrame({"item_id": ["i1", "i2"], "title": ["a", "b"], "price": [5.0, 7.5]}).write_csv(tmp_path / "items.csv")
    (tmp_path / "experiments.toml").write_text(
        '[[experiment]]\nname = "ft"\nsalt = "x"\nstart = 2026-12-01T00:00:00Z\nend = 2026-12-02T00:00:00Z\n'
        '[[experiment.variant]]\nname = "control"\nshare = 0.5\nbundle = "a"\n'
        '[[experiment.variant]]\nname = "treatment"\nshare = 0.5\nbundle = "b"\n')


def _args(tmp_path, *extra: str) -> list[str]:
    return ["ab", "report", "--exposures", str(tmp_path / "exposures-000.jsonl"), "--events",
            str(tmp_path / "events.csv"), "--items", str(tmp_path / "items.csv"), "--out-dir", str(tmp_path / "out"),
            *extra]


def test_srm_52_48_fails_with_fail_on_srm_and_warns_loudly(tmp_path, capsys):
    _experiment_files(tmp_path, 10_400, 9_600)
    assert main(_args(tmp_path, "--experiments", str(tmp_path / "experiments.toml"), "--fail-on-srm")) == 3
    err = capsys.readouterr().err
    assert "WARNING: SAMPLE-RATIO MISMATCH" in err and "control 10400 (expected 10000)" in err
    md = (tmp_path / "out" / "ab-ft.md").read_text()
    assert "> **WARNING — SAMPLE-RATIO MISMATCH" in md
    report = json.loads((tmp_path / "out" / "ab-ft.json").read_text())
    assert report["srm"]["flagged"] and report["srm"]["source"].endswith("experiments.toml")
    # Without --fail-on-srm the report still succeeds; with the true shares there is no mismatch.
    assert main(_args(tmp_path, "--shares", "control=0.5,treatment=0.5")) == 0
    assert "WARNING: SAMPLE-RATIO MISMATCH" in capsys.readouterr().err
    assert main(_args(tmp_path, "--shares", "control=0.52,treatment=0.48", "--fail-on-srm")) == 0
    assert "WARNING" not in capsys.readouterr().err


def test_fair_split_report_with_revenue(tmp_path, capsys):
    _experiment_files(tmp_path, 10_000, 10_000)
    assert main(_args(tmp_path, "--fail-on-srm", "--json", str(tmp_path / "r.json"), "--window", "2m")) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert not report["srm"]["flagged"] and report["window"] == "2m"
    control = report["variants"]["control"]["metrics"]
    assert control["ctr"]["value"] == pytest.approx(3334 / 10_000)
    assert control["revenue_per_user"]["value"] == 0.0  # clicks only, no purchases
    assert "| CTR | treatment |" in capsys.readouterr().out
    assert (tmp_path / "out" / "ab-ft.png").stat().st_size > 0
    assert report["variants"]["treatment"]["lost_exposures"] == 0
    # A server's writer that dropped 300 of treatment's exposures (3%): the report says so and withholds its verdict.
    (tmp_path / "exposure-losses-20261201T100000-77.json").write_text('{"dropped": {"ft\\ttreatment": 300}}')
    assert main(_args(tmp_path, "--json", str(tmp_path / "r2.json"))) == 0
    lossy = json.loads((tmp_path / "r2.json").read_text())
    assert lossy["variants"]["treatment"]["lost_exposures"] == 300 and lossy["verdict"]["status"] == "withheld"


def test_bad_input_exits_2_with_the_reason(tmp_path, capsys):
    _experiment_files(tmp_path, 10, 10)
    assert main(_args(tmp_path, "--window", "soon")) == 2
    assert "window 'soon'" in capsys.readouterr().err
    assert main(_args(tmp_path, "--control", "nope")) == 2
    assert "--control 'nope' has no users" in capsys.readouterr().err
    assert main(_args(tmp_path, "--shares", "control=1")) == 2
    assert "treatment have users but no configured share" in capsys.readouterr().err


def test_sequential_as_of_and_timeline(tmp_path, capsys):
    """--sequential calls from confidence sequences, --as-of replays an earlier moment (here, before
    any exposure: refused with the reason), --timeline writes the daily replay and its plot."""
    _experiment_files(tmp_path, 1_000, 1_000)
    assert main(_args(tmp_path, "--sequential", "2000", "--timeline", "--json", str(tmp_path / "r.json"))) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    ctr = report["comparisons"]["treatment"]["ctr"]
    assert report["sequential"]["n_star"] == 2000 and report["sequential"]["alpha_per_test"] == pytest.approx(0.05 / 6)
    assert ctr["cs"][0] < ctr["diff_ci"][0] and ctr["cs"][1] > ctr["diff_ci"][1]  # wider: valid at every look
    assert report["timeline"] and "cs" in report["timeline"][-1]["variants"]["treatment"]
    assert (tmp_path / "out" / "ab-ft-timeline.png").stat().st_size > 0
    assert "always-valid CI of the difference" in capsys.readouterr().out
    assert main(_args(tmp_path, "--as-of", "2026-11-30T00:00:00Z")) == 2
    assert "no exposures by then" in capsys.readouterr().err
    with pytest.raises(SystemExit) as bad:  # argparse: usage and the reason on stderr
        main(_args(tmp_path, "--as-of", "yesterday"))
    assert bad.value.code == 2 and "'yesterday' is not an ISO time" in capsys.readouterr().err
