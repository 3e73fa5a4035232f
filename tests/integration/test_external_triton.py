"""The service on a Triton it did not start (`--triton-url`), with the exported ONNX model's contract.

The Triton here is a real `tritonserver` serving an EMULATION of the exported model
(serving/triton/onnx_emulation.py): the export's config.pbtxt (name, INT64 inputs, batching,
contract parameters) and its model.onnx run by onnxruntime inside a Python-backend model, because
pytriton's server has no onnxruntime backend. The client cannot tell it from the real one by its
config; the tests show parity with in-process embeddings, the deadline / breaker / degraded path
when it stops and comes back, and mismatched models and bundles refused while the old bundle serves.
"""

from __future__ import annotations

import asyncio
import json
import shutil

import grpc
import numpy as np
import pytest

from ranker.bundle import load_bundle
from ranker.encoder import encoder_key
from ranker.encoder_probes import PROBE_FILE, compute_probes, load_probes, save_probes
from semrank.ranking.v1 import ranking_service_pb2 as pb
from serving.config import ServeConfig
from serving.encoding.factories import TritonEncoderOptions, external_triton_factory
from serving.triton.client import ExternalTriton
from serving.triton.contract import P_FINGERPRINT, ContractMismatch
from serving.triton.export import ExportConfig, export_triton_repo
from serving.triton.process import TritonProcess, free_port
from serving.triton.worker import TritonWorkerConfig
from tests.integration.production_kit import engaged_users, rank, stub
from tests.integration.serving_kit import ServerThread, metric, scrape_metrics, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

MODEL = "encoder_onnx"


@pytest.fixture(scope="module")
def onnx_repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("triton-repo")
    export_triton_repo("base", repo, ExportConfig(name=MODEL, cpu_variant=False, max_batch_size=16))
    return repo


def emulation(model_root, **ports) -> TritonProcess:
    cfg = TritonWorkerConfig(grpc_port=ports.get("grpc", free_port()), http_port=ports.get("http", free_port()),
                             metrics_port=ports.get("metrics", free_port()), model_name=MODEL,
                             onnx_model=str(model_root), threads=1)
    return TritonProcess(cfg)


@pytest.fixture(scope="module")
def triton(onnx_repo):
    with emulation(onnx_repo / MODEL) as tp:
        yield tp


@pytest.fixture(scope="module")
def bundle(small_bundle, encoder, tmp_path_factory):
    """The session's bundle (base encoder), with its probe embeddings, as `semrank export` writes them."""
    out = tmp_path_factory.mktemp("ext-bundles") / "bundle"
    shutil.copytree(small_bundle[0], out)
    save_probes(out, compute_probes(encoder, encoder_key("base", 128)))
    return out


def _handle(url: str, bundle):
    b = load_bundle(bundle, compile_trees=False)
    factory = external_triton_factory(ExternalTriton(url, MODEL, health_s=0), TritonEncoderOptions(deadline_s=10.0))
    return factory(b.encoder, b.path, "k")


def test_embeddings_through_the_exported_contract_equal_in_process_ones(triton, bundle, encoder):
    texts = ["a", "Waterproof trail running shoes, men's size 44", "Crème brûlée torch — für Zuhause 🎉",
             "ceramic planter " * 200, ""]

    async def go():
        handle = await _handle(triton.grpc_url, bundle)
        try:
            assert handle.encoder.client.tokenizer is not None  # the token-id contract, read from the model's config
            return await handle.encoder.encode(texts), await handle.encoder.encode_bulk(texts * 20)
        finally:
            await handle.close()

    got, bulk = asyncio.run(go())
    want = encoder.encode(texts)
    assert got.shape == want.shape == (len(texts), 384)
    assert np.min(np.sum(got * want, axis=1)) > 0.9999
    assert np.allclose(bulk, np.tile(want, (20, 1)), atol=1e-4)


def test_a_model_exported_from_another_encoder_is_refused_with_the_reason(onnx_repo, bundle, tmp_path):
    """The same graph with a config naming other weights: the client refuses it before any call."""
    root = tmp_path / MODEL
    shutil.copytree(onnx_repo / MODEL, root)
    conf = (root / "config.pbtxt").read_text()
    fingerprint = conf.split(f'key: "{P_FINGERPRINT}"')[1].split('string_value: "')[1].split('"')[0]
    (root / "config.pbtxt").write_text(conf.replace(fingerprint, "0123456789abcdef"))
    with emulation(root) as other:
        with pytest.raises(ContractMismatch, match="encoder 0123456789abcdef"):
            asyncio.run(_handle(other.grpc_url, bundle))


def test_probe_embeddings_unlike_the_models_are_refused(triton, bundle, tmp_path):
    """A reference that the model does not reproduce (as if it ran other weights) is refused;
    a bundle without one is refused with the command that writes it."""
    odd = tmp_path / "odd"
    shutil.copytree(bundle, odd)
    probes = load_probes(odd)
    rolled = np.roll(probes.embeddings, 1, axis=0)
    save_probes(odd, type(probes)(probes.texts, rolled, probes.encoder_key))
    with pytest.raises(ContractMismatch, match="min cosine"):
        asyncio.run(_handle(triton.grpc_url, odd))
    (odd / PROBE_FILE).unlink()
    with pytest.raises(ContractMismatch, match="semrank export triton --bundle"):
        asyncio.run(_handle(triton.grpc_url, odd))


@pytest.fixture(scope="module")
def ext_server(small_shop, bundle, triton, tmp_path_factory):
    cfg = ServeConfig(bundle_dir=bundle, data_dir=small_shop, state_dir=tmp_path_factory.mktemp("ext-state"), port=0,
                      metrics_port=0, reload_poll_s=0, open_admin=True, bundle_roots=(bundle.parent,),
                      encoder_timeout_s=2.0, breaker_failures=2, breaker_open_s=0.5,
                      triton=ExternalTriton(triton.grpc_url, MODEL, health_s=0.2))
    with ServerThread(cfg) as st, grpc.insecure_channel(f"127.0.0.1:{st.port}") as channel:
        yield st, channel


def fresh_inline(k: int) -> pb.RankCandidate:
    """An inline item whose text nobody embedded before: only Triton can give its vector."""
    return pb.RankCandidate(item_id=f"ext-inline-{k}", title=f"Hand-thrown stoneware mug, glaze {k}", category="Kitchen")


def test_the_service_ranks_through_the_external_triton_and_starts_none(ext_server, shop, catalog):
    st, channel = ext_server
    assert st.server.tritons == {}  # nothing started, nothing supervised
    user = engaged_users(shop)[0]
    r = rank(channel, user, catalog[:10], extra=[fresh_inline(0)])
    assert len(r.items) == 11 and not r.degraded, r.degraded_reason
    m = scrape_metrics(st.server.metrics_port)
    assert [v for (name, _), v in m.items() if name == "semrank_triton_up"] == [1.0]


def test_a_refused_bundle_leaves_the_serving_one_and_names_the_mismatch(ext_server, bundle, tmp_path_factory):
    st, channel = ext_server
    serving = load_bundle(bundle, compile_trees=False).version
    other = bundle.parent / "bundle-maxlen-64"
    shutil.copytree(bundle, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["encoder"]["max_length"] = 64
    manifest["bundle_version"] = "maxlen-64"
    (other / "manifest.json").write_text(json.dumps(manifest))
    reply = stub(channel).ReloadBundle(pb.ReloadBundleRequest(path=str(other)), timeout=120)
    assert not reply.reloaded and reply.version == serving
    assert "max_length 128 (the bundle's: 64)" in reply.message
    same = bundle.parent / "bundle-again"
    shutil.copytree(bundle, same)
    manifest = json.loads((same / "manifest.json").read_text())
    manifest["bundle_version"] = "again"
    (same / "manifest.json").write_text(json.dumps(manifest))
    reply = stub(channel).ReloadBundle(pb.ReloadBundleRequest(path=str(same)), timeout=120)
    assert reply.reloaded and reply.version == "again", reply.message  # the shared handle checked again, and passed


def test_external_triton_stopped_degrades_answers_and_started_again_serves(ext_server, triton, shop, catalog):
    st, channel = ext_server
    users = engaged_users(shop)
    items = catalog[:10]
    triton.stop()
    try:
        wait_until(lambda: metric(scrape_metrics(st.server.metrics_port), "semrank_triton_up") == 0, 30,
                   "the health watcher seeing Triton down")
        down = [rank(channel, users[k], items, extra=[fresh_inline(100 + k)]) for k in range(6)]
        assert all(len(r.items) == 11 for r in down)
        assert all(r.degraded and "encoder_unavailable" in r.degraded_reason for r in down)
        known = rank(channel, users[7], items)  # known items need no encoder (the pooled user tower)
        assert not known.degraded
    finally:
        cfg = triton.config
        triton.__init__(cfg)  # the same ports: the operator restarts their Triton
        triton.start()

    def serves_again():
        r = rank(channel, users[8], items, extra=[fresh_inline(200)])
        return not r.degraded

    wait_until(serves_again, 60, "answers from the restarted Triton", poll_s=0.5)
    # The health watcher reads readiness on its own period: it sees the restart soon after, not at once.
    wait_until(lambda: metric(scrape_metrics(st.server.metrics_port), "semrank_triton_up") == 1, 30,
               "the health watcher seeing Triton up again")


def test_tls_and_endpoints_in_turn_with_one_unreachable(onnx_repo, bundle, encoder, tmp_path):
    """TLS to Triton (the CA given), and two endpoints of which the first is down: every call lands."""
    from serving.triton.client import TritonTls
    from tests.integration.serving_kit import make_server_pki

    pki = make_server_pki(tmp_path / "pki")
    cfg = TritonWorkerConfig(grpc_port=free_port(), http_port=free_port(), metrics_port=free_port(), model_name=MODEL,
                             onnx_model=str(onnx_repo / MODEL), threads=1, tls_cert=str(pki.server_cert),
                             tls_key=str(pki.server_key), tls_ca=str(pki.ca))
    texts = ["stoneware mug", "trail running shoes, waterproof"]
    with TritonProcess(cfg) as tls_triton:
        url = f"127.0.0.1:{free_port()},localhost:{tls_triton.config.grpc_port}"
        b = load_bundle(bundle, compile_trees=False)

        async def go(tls):
            ext = ExternalTriton(url, MODEL, tls=tls, health_s=0)
            handle = await external_triton_factory(ext, TritonEncoderOptions(deadline_s=10.0))(b.encoder, b.path, "k")
            try:
                return [await handle.encoder.encode(texts) for _ in range(4)]
            finally:
                await handle.close()

        for got in asyncio.run(go(TritonTls(root_certificates=pki.ca))):
            assert np.min(np.sum(got * encoder.encode(texts), axis=1)) > 0.9999
        from serving.triton.client import EncoderUnavailable

        with pytest.raises(EncoderUnavailable, match="UNAVAILABLE"):
            asyncio.run(go(None))  # a plaintext client cannot talk to it


VERIFY_WITHOUT_TORCH = """
import asyncio, json, sys
from pathlib import Path
from ranker.bundle import load_bundle
from serving.encoding.factories import TritonEncoderOptions, external_triton_factory
from serving.triton.client import ExternalTriton

async def main():
    b = load_bundle(Path(sys.argv[1]), compile_trees=False)
    factory = external_triton_factory(ExternalTriton(sys.argv[2], sys.argv[3], health_s=0), TritonEncoderOptions(deadline_s=10.0))
    handle = await factory(b.encoder, b.path, "k")
    emb = await handle.encoder.encode(["stoneware mug"])
    await handle.close()
    print(json.dumps({"torch": "torch" in sys.modules, "transformers": "transformers" in sys.modules,
                      "tokens": handle.encoder.client.tokenizer is not None, "emb": emb[0].tolist()}))

asyncio.run(main())
"""


@pytest.mark.parametrize("contract", ["tokens", "strings"])
def test_each_contract_is_checked_and_served_without_torch_in_the_service(contract, triton, bundle, encoder):
    """The client picks the contract from the model's config (the exported model: token ids; the
    development worker: strings), checks it and its probes, and never loads torch to do so."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]

    def check(url: str, model: str) -> dict:
        proc = subprocess.run([sys.executable, "-c", VERIFY_WITHOUT_TORCH, str(bundle), url, model], cwd=root,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    if contract == "tokens":
        out = check(triton.grpc_url, MODEL)
    else:
        dev = TritonWorkerConfig(grpc_port=free_port(), http_port=free_port(), metrics_port=free_port(), threads=1)
        with TritonProcess(dev) as worker:
            out = check(worker.grpc_url, "encoder")
    assert out["tokens"] is (contract == "tokens")
    assert not out["torch"] and not out["transformers"]
    assert float(np.dot(out["emb"], encoder.encode(["stoneware mug"])[0])) > 0.9999


def test_embed_catalog_through_the_external_triton_equals_in_process(triton, bundle, small_shop, tmp_path):
    """`semrank embed-catalog --triton-url`: the batch path takes the same checked client."""
    from featurizer.contracts.schema import read_dataset
    from serving.batch.catalog_embed import embed_catalog
    from serving.ranking.item_store import ItemStore

    ext = ExternalTriton(triton.grpc_url, MODEL, health_s=0)
    remote = asyncio.run(embed_catalog(bundle, small_shop, tmp_path / "remote", encoder="triton", progress=False,
                                       triton=ext))
    local = asyncio.run(embed_catalog(bundle, small_shop, tmp_path / "local", progress=False))
    assert remote["embedded"] == local["embedded"] == remote["items"] > 0
    assert remote["encoder_key"] == local["encoder_key"]

    def vectors(state):
        items = ItemStore(read_dataset(small_shop).items, state)
        asyncio.run(items.ensure_embeddings(remote["encoder_key"], None, 384, only=np.zeros(0, dtype=np.int64)))
        emb, current = items.embeddings(remote["encoder_key"])
        assert current.all()
        return emb[np.arange(len(emb))]

    a, b = vectors(tmp_path / "remote"), vectors(tmp_path / "local")
    assert np.min(np.sum(a * b, axis=1)) > 0.9999
