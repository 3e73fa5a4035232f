"""State and bundles written before the package split still load, and give the same answers.

tests/fixtures/compat_v1 was written by main at b12e5e0 (see its README): a data directory, a
bundle, and a state directory with an event-log segment, an in-process snapshot, an upserted
item chunk and two embedding chunks. Read with today's code, read-only (the fixture is never
modified), it must reproduce the features and scores main computed (`expected.json`), with the
same fake encoder.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from ranker.bundle import load_bundle
from ranker.encoder import encoder_key
from serving.ingest.log_format import read_log
from serving.ingest.restore import build_engine
from serving.ranking.engine import BundleRuntime
from serving.ranking.outcome import Candidate

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "compat_v1"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())
DIM = 384


def hash_vector(text: str) -> np.ndarray:
    """The fixture's fake encoder: a unit vector drawn from the sha256 of the text."""
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


class HashEncoderService:
    async def encode(self, texts, timeout_s=None):
        return np.stack([hash_vector(t) for t in texts]) if texts else np.zeros((0, DIM), np.float32)

    async def encode_bulk(self, texts):
        return await self.encode(texts)


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    """A copy of the fixture's state directory (the embedding cache may be written to; the original never is)."""
    out = tmp_path_factory.mktemp("compat") / "state"
    shutil.copytree(FIXTURE / "state", out)
    return out


@pytest.fixture(scope="module")
def built(state):
    now = datetime.fromisoformat(EXPECTED["now"])
    b = build_engine(FIXTURE / "data", state, read_only=True, clock=lambda: now)
    yield b
    b.close()


def test_the_bundle_loads_with_its_version_and_encoder_key():
    bundle = load_bundle(FIXTURE / "bundle")
    assert bundle.version == EXPECTED["bundle_version"]
    assert encoder_key(bundle.encoder.resolve(bundle.path), bundle.encoder.max_length) == EXPECTED["encoder_key"]


def test_the_event_log_segment_reads_back():
    assert [seq for seq, _ in read_log(FIXTURE / "state" / "events")] == list(range(1, EXPECTED["event_log_last_seq"] + 1))


def test_upserted_items_and_embedding_chunks_load(built):
    items = built.engine.items
    assert "new-item" in items.index and items.title("new-item") == "Compat fixture lamp"

    async def refuse(texts):
        raise AssertionError(f"every item has a current embedding on disk; asked to embed {len(texts)}")

    assert asyncio.run(items.ensure_embeddings(EXPECTED["encoder_key"], refuse, DIM)) == 0


def test_features_and_scores_equal_what_main_computed(built):
    engine = built.engine
    assert engine.now().isoformat() == EXPECTED["now"]
    runtime = BundleRuntime(load_bundle(FIXTURE / "bundle"), EXPECTED["encoder_key"], HashEncoderService())
    for want in EXPECTED["requests"]:
        cands = [Candidate(i) if i != "inline-x" else Candidate(i, title="Inline only item") for i in want["item_ids"]]
        out = asyncio.run(engine.rank(runtime, want["user_id"], cands))
        feats = engine.online.features(want["user_id"], want["item_ids"], engine.now())
        np.testing.assert_allclose(np.nan_to_num(feats[:, 1:], nan=-1e300), want["behavioural_features"], rtol=1e-12,
                                   err_msg=want["user_id"])
        assert out.item_ids == want["ranked_ids"] and out.missing_ids == want["missing_ids"]
        np.testing.assert_allclose(out.scores, want["scores"], rtol=1e-6, atol=1e-7, err_msg=want["user_id"])
