"""Fixtures shared by the integration tests (the shop and the bundle come from tests/conftest.py)."""

from __future__ import annotations

import asyncio
import uuid

import nats
import pytest

from featurizer.contracts.schema import read_dataset
from tests.integration.serving_kit import MACHINE_NATS


@pytest.fixture(scope="module")
def shop(small_shop):
    return read_dataset(small_shop)


@pytest.fixture(scope="module")
def catalog(shop) -> list[str]:
    return shop.items["item_id"].to_list()


@pytest.fixture
def stream():
    """(stream name, subject prefix) of the test's own on the machine's NATS; the stream and the
    snapshot and control buckets made for it are deleted afterwards."""
    name = f"TEST_{uuid.uuid4().hex[:12]}"
    yield name, f"test.{name}"

    async def drop():
        from serving.ingest.control import bucket_name as control
        from serving.ingest.snapshots import bucket_name as snapshots

        nc = await nats.connect(MACHINE_NATS)
        js = nc.jetstream()
        for delete, what in ((js.delete_stream, name), (js.delete_object_store, snapshots(name)),
                             (js.delete_key_value, control(name))):
            try:
                await delete(what)
            except Exception:  # noqa: BLE001 - the test may not have made it
                pass
        await nc.close()

    asyncio.run(drop())
