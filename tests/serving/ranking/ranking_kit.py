"""Pieces for the unit tests of serving/ranking: a small bundle over every feature, an engine over the
session's small shop, and an encoder pool of in-process hash encoders (tests/fakes.py)."""

from __future__ import annotations

from pathlib import Path

import lightgbm as lgb
import numpy as np

from featurizer.definitions import NAMES
from ranker.bundle import EncoderRef, load_bundle, save_bundle
from ranker.user_tower import UserTower
from serving.encoding.pool import EncoderHandle, EncoderPool, InProcessEncoder
from tests.fakes import DIM, HashEncoder

FEATURES = [*NAMES, "position"]
CONSTANTS = {"position": 0.0}


def write_bundle(path: Path, seed: int = 0, feature_names: list[str] = FEATURES, history_items: int = 5,
                 tower: UserTower | None = None):
    """A LightGBM lambdarank bundle whose scores depend on its first three features (the interest score
    first when it has it), trained on random rows with a label built from them. `tower` None: the
    text tower over `history_items` (as bundles made before the pooled tower)."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((600, len(feature_names)))
    y = (X[:, 0] + 0.5 * X[:, 1] > 0.3).astype(int) + (X[:, 2] > 1).astype(int)
    booster = lgb.train({"objective": "lambdarank", "num_leaves": 7, "min_data_in_leaf": 5, "verbose": -1, "seed": seed},
                        lgb.Dataset(X, y, group=[20] * 30, feature_name=list(feature_names)), num_boost_round=20)
    constants = {k: v for k, v in CONSTANTS.items() if k in feature_names}
    save_bundle(path, booster, list(feature_names), EncoderRef(model_dir="base", max_length=128,
                                                               history_items=history_items),
                {"inference_constants": constants}, tower=tower)
    return load_bundle(path)


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
