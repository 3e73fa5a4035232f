"""The serve bench's state under a write flood, in process, for the benches that measure the write
path without a server (bench/fold_profile.py, bench/delta_stall.py): the bench's shop and feature
snapshot (`bench/serve.py --prepare-only` makes them), and LogEvents-sized click batches folded into
a store loaded from that snapshot the way the server's event log folds them (`apply_logged`: one
atomic commit with the log's seq)."""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

from serve_setup import BenchConfig, online_snapshot, prepare  # bench/ is sys.path[0]


def flood_shop(work_dir: Path):
    """(the bench shop's Dataset, its feature snapshot file)."""
    from featurizer.contracts.schema import read_dataset

    cfg = BenchConfig(work_dir=work_dir)
    shop, _ = prepare(cfg)
    return read_dataset(shop), online_snapshot(cfg.work_dir / "state", shop)


class Flood:
    """A store loaded from a copy of `snapshot` at `store_path` (never the snapshot itself), and
    clicks of `users` users drawn with `seed` (the serve bench's heavy mix: 2,000) on the catalog."""

    def __init__(self, ds, snapshot: Path, store_path: Path, users: int = 2000, seed: int = 0):
        from featurizer.online.features import OnlineFeatures
        from featurizer.store.config import InProcessConfig
        from featurizer.store.in_process import InProcessStore
        from serving.ingest.apply import applied_seq

        shutil.copyfile(snapshot, store_path)
        Path(f"{store_path}.delta").unlink(missing_ok=True)  # an earlier run's: it names the same full snapshot
        self.store = InProcessStore(InProcessConfig(path=str(store_path)))
        self.online = OnlineFeatures(self.store, ds.items)
        self.rng = random.Random(seed)
        self.users = self.rng.sample(sorted(set(ds.events["user_id"].unique().to_list())), users)
        self.items = ds.items["item_id"].to_list()
        self.seq = applied_seq(self.online)
        self._calls = 0

    def fold(self, per_call: int) -> float:
        """One LogEvents call of `per_call` clicks at now, folded; returns the fold's seconds."""
        from serving.ingest.apply import apply_logged
        from serving.ingest.log_format import LoggedEvent

        self._calls += 1
        now_us = int(time.time() * 1e6)
        batch = [LoggedEvent(now_us, self.rng.choice(self.users), self.rng.choice(self.items), "click",
                             event_id=f"flood-{self._calls}-{e}") for e in range(per_call)]
        began = time.perf_counter()
        apply_logged(self.online, batch, self.seq + len(batch), self.seq)
        self.seq += len(batch)
        return time.perf_counter() - began
