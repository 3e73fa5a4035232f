"""Shared, expensive fixtures: built once per session (a small synthetic shop and a bundle trained on it)."""

from __future__ import annotations

# First, before any test module imports grpc: serving's package sets GRPC_ENABLE_FORK_SUPPORT=false
# while grpc is not loaded, so the in-process store may fork its snapshot writer in this process,
# where servers and clients run (featurizer.store.snapshot_write.fork_is_safe).
import serving  # noqa: F401, I001

import pytest

from training.data.synth import SynthConfig

SMALL_SHOP = SynthConfig(n_users=300, n_items=160, n_days=14)


@pytest.fixture(scope="session")
def encoder():
    from ranker.encoder import TextEncoder

    return TextEncoder(max_length=128)


@pytest.fixture(scope="session")
def small_shop(tmp_path_factory):
    from training.data.synth import synthesize

    out = tmp_path_factory.mktemp("small_shop")
    synthesize(out, seed=7, config=SMALL_SHOP)
    return out


@pytest.fixture(scope="session")
def small_bundle(tmp_path_factory, small_shop, encoder):
    from featurizer.contracts.schema import read_dataset
    from training.lambdarank.impression_lists import train_ranker
    from training.lambdarank.params import RankerTrainConfig

    out = tmp_path_factory.mktemp("small_bundle")
    extra = train_ranker(
        read_dataset(small_shop), out, RankerTrainConfig(test_days=3, valid_days=3, seed=0), encoder, data_source=str(small_shop)
    )
    return out, extra
