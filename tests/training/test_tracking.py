"""Tracked training runs (issue 32 item 3): every training command writes TensorBoard event files
beside its output; with --mlflow-uri a real MLflow store (local SQLite) gets the parameters, the
metrics and the bundle, and the bundle manifest records the run id."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from semrank.cli import main


def tensorboard_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] from the event files of one run directory, read with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def only_run(out: Path) -> Path:
    runs = sorted((out / "tensorboard").iterdir())
    assert len(runs) == 1, runs
    assert list(runs[0].glob("events.out.tfevents.*")), "no event file"
    return runs[0]


def test_train_ranker_writes_tensorboard_and_logs_to_a_real_mlflow_store(small_shop, tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    out, uri = tmp_path / "bundle", f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["train", "ranker", "--data", str(small_shop), "--out", str(out), "--variant", "behavioural",
                 "--test-days", "3", "--valid-days", "3", "--mlflow-uri", uri, "--mlflow-experiment", "tests",
                 "--mlflow-artifacts", str(tmp_path / "artifacts")]) == 0

    scalars = tensorboard_scalars(only_run(out))
    curve = scalars["valid/ndcg@10"]
    assert [s for s, _ in curve] == list(range(1, len(curve) + 1)) and len(curve) > 5  # every boosting round
    assert all(0 <= v <= 1 for _, v in curve) and "time/elapsed_s" in scalars
    manifest = json.loads((out / "manifest.json").read_text())
    final_ndcg = manifest["metrics"]["test"]["lightgbm-bundle"]["ndcg@10"]
    assert scalars["final/test/lightgbm-bundle/ndcg@10"][0][1] == pytest.approx(final_ndcg, rel=1e-6)

    tracking = manifest["tracking"]
    assert tracking["tensorboard"].startswith("tensorboard/train-ranker-")
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(tracking["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "tests"
    assert run.data.params["variant"] == "behavioural" and run.data.tags["semrank.command"] == "train-ranker"
    assert run.data.metrics["final/test/lightgbm-bundle/ndcg_10"] == pytest.approx(final_ndcg, rel=1e-6)
    history = client.get_metric_history(run.info.run_id, "valid/ndcg_10")
    assert sorted(m.step for m in history) == [s for s, _ in curve]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "bundle")}
    assert {"bundle/manifest.json", "bundle/ranker.txt"} <= artifacts
    assert (tmp_path / "artifacts" / run.info.run_id / "artifacts" / "bundle" / "manifest.json").is_file()


def test_a_failed_command_marks_its_mlflow_run_failed_and_closes_it(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from training import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(RuntimeError, match="boom"):
        with tracking.tracked_run(tmp_path / "out", "train-ranker", {"seed": 0}, mlflow_uri=uri,
                                  mlflow_artifacts=str(tmp_path / "artifacts")) as run:
            tracking.scalar("valid/ndcg@10", 0.5, 1)
            run_id = run.mlflow_run_id
            raise RuntimeError("boom")
    assert MlflowClient(tracking_uri=uri).get_run(run_id).info.status == "FAILED"
    assert tracking.current() is None  # the next command may open its own
    tracking.scalar("valid/ndcg@10", 0.5, 2)  # no run open: a no-op


def test_train_encoder_writes_loss_learning_rate_and_validation_curves(tmp_path):
    from training.data.synth import SynthConfig, synthesize

    shop = tmp_path / "shop"
    synthesize(shop, seed=3, config=SynthConfig(n_users=120, n_items=60, n_days=6))
    out = tmp_path / "enc"
    assert main(["train", "encoder", "--data", str(shop), "--out", str(out), "--max-steps", "2", "--batch-size", "8",
                 "--val-users", "10", "--eval-every", "2", "--test-days", "1", "--valid-days", "1",
                 "--max-length-user", "32", "--max-length-item", "24"]) == 0
    scalars = tensorboard_scalars(only_run(out))
    assert [s for s, _ in scalars["train/loss"]] == [1, 2] and [s for s, _ in scalars["train/lr"]] == [1, 2]
    assert [s for s, _ in scalars["valid/ndcg@10"]] == [0, 2]  # the frozen model, then step 2
    assert "final/best/ndcg@10" in scalars
    saved = json.loads((out / "encoder" / "training.json").read_text())
    assert saved["tracking"]["tensorboard"].startswith("tensorboard/train-encoder-") and "mlflow_run_id" not in saved["tracking"]


def test_mlflow_missing_is_a_clear_error(tmp_path, monkeypatch):
    import builtins

    from featurizer.errors import ConfigError
    from training import tracking

    real_import = builtins.__import__

    def no_mlflow(name, *args, **kwargs):  # fault injection: MLflow not installed
        if name == "mlflow" or name.startswith("mlflow."):
            raise ImportError("No module named 'mlflow'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mlflow)
    with pytest.raises(ConfigError, match=r"pip install 'semrank\[mlflow\]'"):
        with tracking.tracked_run(tmp_path, "train-ranker", {}, mlflow_uri="sqlite:///x.db"):
            pass
    assert tracking.current() is None
