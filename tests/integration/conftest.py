"""Fixtures shared by the integration tests (the shop and the bundle come from tests/conftest.py)."""

from __future__ import annotations

import pytest

from featurizer.contracts.schema import read_dataset


@pytest.fixture(scope="module")
def shop(small_shop):
    return read_dataset(small_shop)


@pytest.fixture(scope="module")
def catalog(shop) -> list[str]:
    return shop.items["item_id"].to_list()
