"""What several commands share."""

from __future__ import annotations

from pathlib import Path

from featurizer.errors import ConfigError


def data_dir(args) -> Path:
    """`--data`, else the data directory the bundle (`--bundle`) was trained on."""
    if args.data is not None:
        return Path(args.data)
    from ranker.bundle import load_bundle

    source = load_bundle(args.bundle).manifest.get("training_data", {}).get("source")
    if not source:
        raise ConfigError("--data is required (the bundle does not name its training data)")
    return Path(source)
