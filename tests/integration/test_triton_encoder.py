"""The encoder behind a real Triton server (pytriton's tritonserver on CPU); no mocks.

Each TritonProcess takes ~10 s to start (Triton + MiniLM), so one server is shared by the
module and only the fault-injection test starts its own.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from ranker.encoder import EMBEDDING_DIM, TextEncoder
from serving.triton.client import EncoderClient, EncoderUnavailable
from serving.triton.process import (
    PortInUseError,
    TritonProcess,
    TritonStartupError,
    TritonWorkerConfig,
    free_port,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

TEXTS = [
    "red running shoes for men",
    "stainless steel water bottle 1l",
    "wireless noise cancelling headphones",
    "organic green tea, 100 bags",
    "a",
    "children's winter jacket with hood, waterproof and warm, sizes 4 to 12 years",
    "USB-C charging cable",
]


def _config(**overrides) -> TritonWorkerConfig:
    kwargs = {"model_dir": "base", "grpc_port": free_port(), "http_port": free_port(), "metrics_port": free_port()}
    kwargs.update(overrides)
    return TritonWorkerConfig(**kwargs)


def live_tritonserver_processes(marker: str) -> list[str]:
    """`pgrep -af tritonserver` lines of live (non-zombie) processes whose command line has `marker`.

    Filtering by this instance's workdir keeps tests independent of other Tritons on the
    machine; zombies are skipped because a SIGKILLed worker's children are re-parented to
    init, which reaps them on its own schedule (they are dead and hold no resources).
    """
    out = subprocess.run(["pgrep", "-af", "tritonserver"], capture_output=True, text=True).stdout
    live = []
    for line in out.splitlines():
        pid, _, cmd = line.partition(" ")
        if marker not in cmd:
            continue
        try:
            stat = Path("/proc", pid, "stat").read_text()
        except OSError:
            continue  # already gone
        if stat[stat.rfind(")") + 2] != "Z":
            live.append(line)
    return live


def run(coro):
    return asyncio.run(coro)


async def _encode(url: str, texts: list[str], **kw) -> np.ndarray:
    async with EncoderClient(url, **kw) as client:
        return await client.encode(texts)


def assert_same_embeddings(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == np.float32
    assert got.shape == want.shape
    cos = np.sum(got * want, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cos.min() >= 0.9999, f"min cosine {cos.min()}"


@pytest.fixture(scope="module")
def triton():
    tp = TritonProcess(_config())
    tp.start()
    marker = str(tp.workdir)
    assert live_tritonserver_processes(marker), "tritonserver should be running under the worker"
    yield tp
    tp.stop()
    assert not tp.is_running()
    assert live_tritonserver_processes(marker) == []


@pytest.fixture(scope="module")
def local_encoder() -> TextEncoder:
    return TextEncoder("base")


def test_embeddings_match_in_process_encoder(triton, local_encoder):
    got = run(_encode(triton.grpc_url, TEXTS))
    assert got.shape == (len(TEXTS), EMBEDDING_DIM)
    assert_same_embeddings(got, local_encoder.encode(TEXTS))
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_concurrent_requests_of_different_sizes(triton, local_encoder):
    rng = np.random.default_rng(0)
    words = "shoe bag red blue cotton wool lamp desk chair phone case cable kettle mug".split()
    sizes = [1, 7, 100, 1, 64, 65]
    batches = [[" ".join(rng.choice(words, size=rng.integers(1, 12))) for _ in range(n)] for n in sizes]

    async def all_at_once():
        async with EncoderClient(triton.grpc_url, max_batch_size=64) as client:
            return await asyncio.gather(*(client.encode(b) for b in batches))

    results = run(all_at_once())
    for texts, got in zip(batches, results, strict=True):
        assert got.shape == (len(texts), EMBEDDING_DIM)
        assert_same_embeddings(got, local_encoder.encode(texts))


def test_small_client_chunks_keep_order(triton, local_encoder):
    got = run(_encode(triton.grpc_url, TEXTS, max_batch_size=2))
    assert_same_embeddings(got, local_encoder.encode(TEXTS))


def test_bulk_encode_bounds_chunks_in_flight_and_keeps_order(triton, local_encoder):
    texts = [f"{t} #{k}" for k in range(9) for t in TEXTS]

    async def go():
        async with EncoderClient(triton.grpc_url, max_batch_size=8) as client:
            return await client.encode_bulk(texts, timeout_s=120, max_in_flight=1)

    assert_same_embeddings(run(go()), local_encoder.encode(texts))


def test_empty_list_needs_no_call():
    # An unreachable URL proves no request is made.
    got = run(_encode(f"127.0.0.1:{free_port()}", [], timeout_s=1.0))
    assert got.shape == (0, EMBEDDING_DIM)
    assert got.dtype == np.float32


def test_empty_list_after_a_call_keeps_dim(triton):
    async def go():
        async with EncoderClient(triton.grpc_url) as client:
            await client.encode(["warm"])
            return await client.encode([])

    assert run(go()).shape == (0, EMBEDDING_DIM)


def test_unicode_text(triton, local_encoder):
    texts = ["Größe 42 – Laufschuhe", "红色运动鞋", "café crème 🍮", "", "ñandú — “quoted”"]
    got = run(_encode(triton.grpc_url, texts))
    assert_same_embeddings(got, local_encoder.encode(texts))


def test_invalid_utf8_does_not_kill_the_worker(triton, local_encoder):
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        inp = grpcclient.InferInput("texts", [2, 1], "BYTES")
        inp.set_data_from_numpy(np.array([[b"\xff\xfe broken"], [b"ok"]], dtype=np.object_))
        emb = client.infer("encoder", [inp], client_timeout=30).as_numpy("embedding")
    finally:
        client.close()
    assert emb.shape == (2, EMBEDDING_DIM)
    assert np.isfinite(emb).all()
    assert triton.is_running()
    assert_same_embeddings(run(_encode(triton.grpc_url, ["ok"])), local_encoder.encode(["ok"]))


def test_ready(triton):
    async def go():
        async with EncoderClient(triton.grpc_url) as ok, EncoderClient(triton.grpc_url, model_name="nope") as bad:
            return await ok.ready(), await bad.ready()

    assert run(go()) == (True, False)


def test_unknown_model_raises_encoder_unavailable(triton):
    with pytest.raises(EncoderUnavailable, match="'nope'") as info:
        run(_encode(triton.grpc_url, ["x"], model_name="nope"))
    assert triton.grpc_url in str(info.value)
    assert info.value.__cause__ is not None


def test_port_in_use_is_refused(triton):
    busy = triton.config.grpc_port
    second = TritonProcess(_config(grpc_port=busy))
    with pytest.raises(PortInUseError, match=f"port {busy} \\(grpc_port\\).*already in use"):
        second.start()
    assert second.pid is None  # nothing was spawned
    assert triton.is_running()


def test_startup_failure_reports_log_tail(tmp_path):
    tp = TritonProcess(_config(model_dir=str(tmp_path / "no-such-model")))
    with pytest.raises(TritonStartupError, match="exited with code") as info:
        tp.start()
    assert "no config.json" in str(info.value)  # the worker's traceback, from the log tail
    assert not tp.is_running()
    assert tp.log_path.exists()  # kept for debugging after a failed start
    assert live_tritonserver_processes(str(tp.workdir)) == []
    shutil.rmtree(tp.workdir)


def test_kill_hard_leaves_no_triton_and_client_fails_fast():
    tp = TritonProcess(_config())
    tp.start()
    marker = str(tp.workdir)
    try:
        assert run(_encode(tp.grpc_url, ["before the crash"])).shape == (1, EMBEDDING_DIM)
        assert live_tritonserver_processes(marker)
    finally:
        tp.kill_hard()
    assert not tp.is_running()
    assert live_tritonserver_processes(marker) == []
    assert not Path(marker).exists()

    async def after():
        async with EncoderClient(tp.grpc_url, timeout_s=2.0) as client:
            ready = await client.ready()
            with pytest.raises(EncoderUnavailable, match=tp.grpc_url) as info:
                await client.encode(["after the crash"])
            return ready, info.value

    ready, err = run(after())
    assert ready is False
    assert err.__cause__ is not None
    tp.kill_hard()  # idempotent
    tp.stop()
