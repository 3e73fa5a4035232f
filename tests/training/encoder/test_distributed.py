"""Data-parallel encoder fine-tuning (issue 32 item 2, `training.encoder.distributed`): 2 CPU processes
(gloo) give the loss and the gradients of one process on the same global batch, in-batch and hard
negatives gathered across processes with their gradients; and `torchrun` runs `semrank train encoder`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from featurizer.contracts.schema import read_dataset
from training.encoder.train import EncoderTrainConfig

CFG = dict(batch_size=8, val_users=10, val_negatives=5, test_days=1, valid_days=1, max_length_user=32,
           max_length_item=24, history_items=4, history_grad=2, hard_negatives=1, bf16=False)
ROWS = np.arange(8)
CHECKED = ("log_weights", "encoder.encoder.layer.5.output.dense.weight", "encoder.embeddings.word_embeddings.weight")


@pytest.fixture(scope="module")
def tiny_shop(tmp_path_factory):
    from training.data.synth import SynthConfig, synthesize

    out = tmp_path_factory.mktemp("ddp_shop")
    synthesize(out, 3, SynthConfig(n_users=80, n_items=60, n_days=6))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _step(data_dir: Path, world: int) -> dict:
    """One training step on the global batch ROWS (this process's slice of it), dropout off, no
    optimiser step; the loss, the rows and the gradients of CHECKED."""
    from training.encoder import distributed
    from training.encoder.train import _Batcher, build_data, load_base, train_step
    from training.encoder.two_tower import TwoTower

    torch.manual_seed(0)
    cfg = EncoderTrainConfig(**CFG)
    tokenizer, model = load_base(cfg)
    model.eval()  # dropout off: the processes and the single run must see the same network
    two = TwoTower(model, cfg.scale, cfg.initial_tower(), learn_tower=True)
    net = torch.nn.parallel.DistributedDataParallel(two, find_unused_parameters=True) if world > 1 else two
    batcher = _Batcher(build_data(read_dataset(data_dir), cfg), tokenizer, cfg)
    batcher.refresh_cache(model)  # history positions past the first 2 come from the cache
    b = batcher.make(distributed.my_slice(ROWS), key=0)
    params = [p for p in model.parameters() if p.requires_grad]
    loss, rows = train_step(net, b, world, params, bf16=False)
    named = dict(two.named_parameters())
    return {"loss": loss, "rows": rows, "hard": b["n_candidates"] - len(b["weights"]),
            **{name: named[name].grad.numpy().copy() for name in CHECKED}}


def _worker(rank: int, port: int, data_dir: str, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        out = _step(Path(data_dir), 2)
    finally:
        dist.destroy_process_group()
    np.savez(Path(out_dir) / f"rank{rank}.npz", **out)


def test_two_processes_give_the_loss_and_gradients_of_one(tiny_shop, tmp_path):
    import torch.multiprocessing as mp

    single = _step(tiny_shop, 1)
    assert single["hard"] > 0  # the batch has hard negatives: their gather is exercised too
    mp.spawn(_worker, args=(_free_port(), str(tiny_shop), str(tmp_path)), nprocs=2, join=True)
    ranks = [dict(np.load(tmp_path / f"rank{r}.npz")) for r in range(2)]
    for r in ranks:
        assert float(r["loss"]) == pytest.approx(single["loss"], rel=1e-5)  # the processes' shares, summed
        assert int(r["rows"]) == len(ROWS)
        for name in CHECKED:  # DDP's averaged gradient is the one process's gradient of the global loss
            np.testing.assert_allclose(r[name], single[name], rtol=1e-3, atol=1e-6, err_msg=name)
    assert np.abs(single["log_weights"]).sum() > 0 and np.abs(single[CHECKED[2]]).sum() > 0
    np.testing.assert_array_equal(ranks[0][CHECKED[1]], ranks[1][CHECKED[1]])  # all-reduced: the same everywhere


def test_torchrun_trains_the_encoder_on_two_processes(tiny_shop, tmp_path):
    semrank = Path(sys.executable).parent / "semrank"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), str(semrank), "train", "encoder", "--data", str(tiny_shop),
           "--out", str(tmp_path), "--max-steps", "2", "--batch-size", "8", "--val-users", "10", "--eval-every", "2",
           "--test-days", "1", "--valid-days", "1", "--max-length-user", "32", "--max-length-item", "24"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = json.loads((tmp_path / "encoder" / "training.json").read_text())
    assert saved["host"]["processes"] == 2 and saved["steps"] == 2 and saved["status"] == "finished"
    assert saved["examples_seen"] == 16  # two global batches of 8, 4 rows per process
    assert (tmp_path / "encoder" / "model.safetensors").is_file()
