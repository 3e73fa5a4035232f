"""Tracked training runs: TensorBoard event files beside every training command's output, and, with
`--mlflow-uri`, an MLflow run with the parameters, the metrics and the bundle.

    with tracked_run(out_dir, "train-ranker", params, mlflow_uri=None) as run:
        ...                                  # training code calls the module-level functions below
        scalar("valid/ndcg@10", 0.41, step)  # a no-op when no run is open (library use, tests)
        run.finish(final_metrics, artifacts=out_dir)

- TensorBoard: `OUT/tensorboard/<command>-<UTC time>/events.out.tfevents.*`, written as training
  goes (`tensorboard --logdir OUT/tensorboard`): losses, learning rates, validation metrics by step,
  and `time/elapsed_s`; the final metrics under `final/`.
- MLflow (an optional extra: `pip install 'semrank[mlflow]'`): the run logs the parameters, every
  scalar with its step, the final metrics and, at the end, the output directory as the `bundle`
  artifact. Any tracking URI MLflow takes works; tests use a local SQLite store (`sqlite:///…`;
  MLflow 3.13 and later refuse the plain file store). A run that raises is marked FAILED.
- `describe()` is what the bundle manifest records under `tracking` (the run id and where the
  event files are), so a bundle leads back to the run that made it.

One run is open at a time, per process, as MLflow's own active run is; training code reaches it
through `scalar` / `scalars` and never holds it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from featurizer.errors import ConfigError

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
_current: TrackedRun | None = None


class TrackedRun:
    """One training command's run: a TensorBoard writer and, optionally, an MLflow run."""

    def __init__(self, out_dir: Path, command: str, params: Mapping[str, Any], mlflow_uri: str | None = None,
                 mlflow_experiment: str = "semrank", mlflow_artifacts: str | None = None):
        from torch.utils.tensorboard import SummaryWriter  # (torch ships the writer; the `tensorboard` package the format)

        mlflow = _mlflow() if mlflow_uri else None  # (before any file is written: a missing extra is a ConfigError)
        self.command, self.t0 = command, time.monotonic()
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        self.tensorboard_dir = Path(out_dir) / TENSORBOARD_DIR / f"{command}-{stamp}"
        self.out_dir = Path(out_dir)
        self._tb = SummaryWriter(log_dir=str(self.tensorboard_dir))
        self._tb.add_text("params", "\n".join(f"{k}: {v}" for k, v in sorted(_flat(params).items())), 0)
        self._mlflow, self.mlflow_run_id = mlflow, None
        if mlflow is not None:
            self._mlflow.set_tracking_uri(mlflow_uri)
            if mlflow_artifacts and self._mlflow.get_experiment_by_name(mlflow_experiment) is None:
                # where a new experiment keeps its artifacts (without it MLflow picks ./mlruns under the
                # current directory for a database store; a tracking server picks its own)
                self._mlflow.create_experiment(mlflow_experiment, artifact_location=mlflow_artifacts)
            self._mlflow.set_experiment(mlflow_experiment)
            run = self._mlflow.start_run(run_name=f"{command}-{stamp}")
            self.mlflow_run_id = run.info.run_id
            self._mlflow.log_params({k: str(v)[:500] for k, v in _flat(params).items()})
            self._mlflow.set_tag("semrank.command", command)
            log.info("MLflow run %s (experiment %r at %s)", self.mlflow_run_id, mlflow_experiment, mlflow_uri)

    def scalar(self, tag: str, value: float, step: int) -> None:
        value = float(value)
        self._tb.add_scalar(tag, value, step)
        self._tb.add_scalar("time/elapsed_s", time.monotonic() - self.t0, step)
        if self._mlflow is not None:
            self._mlflow.log_metric(_mlflow_key(tag), value, step=step)

    def finish(self, metrics: Mapping[str, Any], artifacts: Path | None = None) -> None:
        """The final metrics (nested dicts flattened to `a/b`), and the output as the run's artifact."""
        flat = {k: float(v) for k, v in _flat(metrics).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for k, v in flat.items():
            self._tb.add_scalar(f"final/{k}", v, 0)
        self._tb.flush()
        if self._mlflow is not None:
            self._mlflow.log_metrics({_mlflow_key(f"final/{k}"): v for k, v in flat.items()})
            if artifacts is not None:
                self._mlflow.log_artifacts(str(artifacts), artifact_path="bundle")

    def describe(self) -> dict[str, str]:
        """What a bundle manifest records (paths relative to the output directory)."""
        out = {"tensorboard": str(self.tensorboard_dir.relative_to(self.out_dir))}
        if self.mlflow_run_id is not None:
            out["mlflow_run_id"] = self.mlflow_run_id
        return out

    def close(self, failed: bool) -> None:
        self._tb.close()
        if self._mlflow is not None:
            self._mlflow.end_run(status="FAILED" if failed else "FINISHED")


@contextmanager
def tracked_run(out_dir: str | Path, command: str, params: Mapping[str, Any], mlflow_uri: str | None = None,
                mlflow_experiment: str = "semrank", mlflow_artifacts: str | None = None) -> Iterator[TrackedRun]:
    """Open the process's run for one training command (see the module docstring)."""
    global _current
    if _current is not None:
        raise RuntimeError(f"a tracked run ({_current.command}) is already open in this process")
    run = TrackedRun(Path(out_dir), command, params, mlflow_uri, mlflow_experiment, mlflow_artifacts)
    _current = run
    failed = True
    try:
        yield run
        failed = False
    finally:
        _current = None
        run.close(failed)


def current() -> TrackedRun | None:
    return _current


def scalar(tag: str, value: float, step: int) -> None:
    """Log one scalar to the open run, if any."""
    if _current is not None:
        _current.scalar(tag, value, step)


def scalars(prefix: str, values: Mapping[str, Any], step: int) -> None:
    """Log the numbers of `values` as `prefix/key`."""
    if _current is not None:
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                _current.scalar(f"{prefix}/{k}", v, step)


def describe() -> dict[str, str] | None:
    return None if _current is None else _current.describe()


def lightgbm_callback():
    """A LightGBM callback logging every iteration's evaluation results (`valid/ndcg@10`, ...)."""

    def log_evaluation(env) -> None:
        for data_name, metric, value, _ in env.evaluation_result_list:
            scalar(f"{data_name}/{metric}", value, env.iteration + 1)

    log_evaluation.order = 25  # after record_evaluation (20), before early stopping (30), which ends training by raising
    return log_evaluation


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flat(v, key + "/"))
        else:
            out[key] = v
    return out


def _mlflow_key(tag: str) -> str:
    """MLflow metric names allow letters, digits, `_ - . / space` (and `@` is not one of them)."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in tag)


def _mlflow():
    try:
        import mlflow
    except ImportError:
        raise ConfigError("--mlflow-uri needs MLflow: pip install 'semrank[mlflow]'") from None
    return mlflow
