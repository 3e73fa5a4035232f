"""Open the online store a config names (`featurizer.store.config`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from featurizer.store.base import OnlineStore
from featurizer.store.config import InProcessConfig, StoreConfig, store_config


def store_from_config(config: Mapping[str, Any] | StoreConfig) -> OnlineStore:
    """An open store for `config` (a typed config or a mapping such as {"type": "redis", ...})."""
    cfg = store_config(config)
    if isinstance(cfg, InProcessConfig):
        from featurizer.store.in_process import InProcessStore

        return InProcessStore(cfg)
    from featurizer.store.redis import RedisStore

    return RedisStore(cfg)
