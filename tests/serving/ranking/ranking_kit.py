"""Pieces for the unit tests of serving/ranking: a small bundle over every feature, an engine over the
session's small shop, and an encoder pool of in-process hash encoders (tests/fakes.py)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import lightgbm as lgb
import numpy as np

from featurizer.definitions import NAMES
from ranker.bundle import EncoderRef, load_bundle, save_bundle
from ranker.sequence import BUNDLE_DIR, SASRecConfig
from ranker.user_tower import UserTower
from serving.encoding.pool import EncoderHandle, EncoderPool, InProcessEncoder
from tests.fakes import DIM, HashEncoder

FEATURES = [*NAMES, "position"]
CONSTANTS = {"position": 0.0}


def write_bundle(path: Path, seed: int = 0, feature_names: list[str] = FEATURES, history_items: int = 5,
                 tower: UserTower | None = None, sequence_catalog: list[str] | None = None):
    """A LightGBM lambdarank bundle whose scores depend on its first three features (the interest score
    first when it has it), trained on random rows with a label built from them. `tower` None: the
    text tower over `history_items` (as bundles made before the pooled tower). `sequence_catalog`:
    item ids of a sequence model (an untrained SASRec, seeded, reading 4 items) whose
    `sequence_score` comes first."""
    rng = np.random.default_rng(seed)
    extra = {}
    if sequence_catalog is not None:
        feature_names = ["sequence_score", *feature_names]
        extra["sequence_model"] = write_sequence_model(path / BUNDLE_DIR, sequence_catalog, seed).name
    X = rng.standard_normal((600, len(feature_names)))
    y = (X[:, 0] + 0.5 * X[:, 1] > 0.3).astype(int) + (X[:, 2] > 1).astype(int)
    booster = lgb.train({"objective": "lambdarank", "num_leaves": 7, "min_data_in_leaf": 5, "verbose": -1, "seed": seed},
                        lgb.Dataset(X, y, group=[20] * 30, feature_name=list(feature_names)), num_boost_round=20)
    constants = {k: v for k, v in CONSTANTS.items() if k in feature_names}
    save_bundle(path, booster, list(feature_names), EncoderRef(model_dir="base", max_length=128,
                                                               history_items=history_items),
                {"inference_constants": constants, **extra}, tower=tower)
    return load_bundle(path)


def write_sequence_model(out: Path, item_ids: list[str], seed: int = 0) -> Path:
    """An untrained SASRec (ranker.sequence files) over `item_ids`, reading 4 items of history."""
    import torch

    from ranker.sequence import FORMAT
    from ranker.sequence_torch import SASRec
    from training.sequence.sasrec import save

    torch.manual_seed(seed)
    cfg = SASRecConfig(max_len=4, dim=8, heads=2, layers=1)
    summary = {"format": FORMAT, "config": asdict(cfg), "n_items": len(item_ids), "curve": []}
    return save(SASRec(len(item_ids), cfg).eval(), item_ids, summary, out)


class HashEncoderPool(EncoderPool):
    """An EncoderPool whose factory serves a HashEncoder in this process; counts starts and stops."""

    def __init__(self) -> None:
        self.started = 0
        self.stopped = 0

        async def factory(ref, bundle_path, key) -> EncoderHandle:
            self.started += 1

            async def close() -> None:
                self.stopped += 1

            return EncoderHandle(key=key, encoder=InProcessEncoder(HashEncoder()), close=close, dim=DIM)

        super().__init__(factory)
