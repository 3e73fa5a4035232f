"""Erasing users on a running server (issue 18 item 3; the admin `DeleteUser` RPC), local events.

    erasure = LiveErasure(...)                                  # made by serving.server
    out = await erasure.erase(stored_ids, requested_by="ticket-1")

In order, one erasure at a time (later calls wait):
1. **suppressed** in this process at once: LogEvents refuses their events, the fold drops any
   that were on their way (accepted just before), and their Ranks write no exposure record;
2. **the event log**: their events replaced by null in place (`EventLog.erase`; appends wait);
3. **the exposure log**: their records removed (`ExposureLog.erase`; the writer waits);
4. **the features rebuilt beside the live ones**, in a child process (`serving.ingest.rebuild`):
   the data directory without the users, then the event log; the server keeps serving on the old
   state meanwhile and pays none of that CPU. It then loads the result (the in-process snapshot
   file, or the second Redis namespace), catches it up with the events logged since, and, under
   the apply lock (writes wait; Ranks go on), applies the last of them and **swaps** it in
   (`InProcessStore.adopt`, `RedisStore.adopt`; Ranks are marked degraded during Redis's rename).
   The features built over the rebuilt state go live with it, their caches filled before the swap
   (`OnlineFeatures.warm`, `rebind`): the first Ranks after it pay no cold cache; the users' cached
   user vectors and sequence states are dropped;
5. **persisted**: the in-process store writes a full snapshot over the old one and drops its delta,
   so no file holds the users' state any more; the event log is erased once more (events accepted
   in the instant before step 1 and written after step 2);
6. **recorded** in the suppression list (`featurizer.erasure`): keyed hashes, who asked, when, what
   was removed.

A DeleteUser that did not answer OK (the server stopped in between) may have done part of this: call
it again, which is safe. With event retention, the rebuild holds only the events still in the log
(as a restart without a snapshot would): the features forget events past retention.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, replace
from pathlib import Path

from featurizer.contracts.event_rules import EventRules
from featurizer.erasure import PRIVACY_DIR, Erasures
from featurizer.errors import SemrankError
from featurizer.online.features import OnlineFeatures
from featurizer.privacy import Pseudonyms
from featurizer.store.config import InProcessConfig, RedisConfig, StoreConfig
from featurizer.store.in_process import InProcessStore
from featurizer.store.redis import RedisStore
from serving.experiments.exposure_log import ExposureLog
from serving.ingest.apply import EventIngest, apply_logged, applied_seq
from serving.ingest.log_format import LoggedEvent
from serving.ranking.engine import RankingEngine

log = logging.getLogger(__name__)

REBUILD_DIR = "rebuild"  # STATE/privacy/rebuild: the child's snapshot and catalog, removed after
CATCH_UP_CHUNK = 50_000


class ErasureFailed(SemrankError):
    """The rebuild beside the live state failed: the users are suppressed and their logged events and
    exposures erased, but the features still count them; call DeleteUser again."""

    grpc_code = "INTERNAL"
    reason = "ERASURE_INCOMPLETE"


class LiveErasure:
    def __init__(self, *, state_dir: Path, data_dir: Path, store_cfg: StoreConfig, engine: RankingEngine,
                 ingest: EventIngest, exposures: ExposureLog, pseudonyms: Pseudonyms, rules: EventRules,
                 erasures: Erasures, persist: Callable[[], Awaitable[None]],
                 forget: Callable[[set[str]], None], rebuild: Callable[[dict], Awaitable[dict]] | None = None):
        """`persist`: write the in-process store's state now (a full snapshot); `forget`: drop the
        users' entries from the request path's caches (user vectors, sequence states); `rebuild`:
        runs the child (`run_rebuild`; tests wrap it to write while it runs)."""
        self.state_dir, self.data_dir, self.store_cfg = Path(state_dir), Path(data_dir), store_cfg
        self.engine, self.ingest, self.exposures = engine, ingest, exposures
        self.pseudonyms, self.rules, self.erasures = pseudonyms, rules, erasures
        self._persist, self._forget = persist, forget
        self._run_rebuild = rebuild or run_rebuild
        self._lock = asyncio.Lock()

    async def erase(self, stored_ids: list[str], requested_by: str) -> dict:
        """Erase the users (stored ids) as the module docstring says; returns what was removed and
        how long it took. Shielded: once started it finishes even if the caller goes away."""
        return await asyncio.shield(asyncio.ensure_future(self._erase(list(dict.fromkeys(stored_ids)), requested_by)))

    async def _erase(self, users: list[str], requested_by: str) -> dict:
        async with self._lock:
            t0 = time.monotonic()
            self.erasures.ensure_key()  # (a keyless server's first erasure makes the list's key)
            self.erasures.add(users)
            self.ingest.erasures = self.erasures  # the fold drops what was on its way
            gone = set(users)
            out: dict = {"users": len(users)}
            out["events"] = await asyncio.to_thread(self.ingest.event_log.erase, gone)
            out["exposures"] = await asyncio.to_thread(self.exposures.erase, gone)
            t_rebuild = time.monotonic()
            work = self.state_dir / PRIVACY_DIR / REBUILD_DIR
            try:
                out.update(await self._rebuild(users, work))
            except Exception as e:
                log.exception("erasure: rebuilding the features without %d user(s) failed", len(users))
                raise ErasureFailed(f"the features could not be rebuilt without the user(s) ({type(e).__name__}: {e}); "
                                    "their events and exposures are erased and new events refused; call DeleteUser "
                                    "again") from e
            finally:
                shutil.rmtree(work, ignore_errors=True)
            out["rebuild_s"] = round(time.monotonic() - t_rebuild, 3)
            self._forget(gone)
            await self._persist()
            out["events"] += await asyncio.to_thread(self.ingest.event_log.erase, gone)  # (accepted just before 1.)
            self.erasures.record(users, requested_by, {k: out[k] for k in ("events", "exposures")} | {"features": True})
            out["seconds"] = round(time.monotonic() - t0, 3)
            log.info("erased %d user(s) on a running server: %d event(s), %d exposure record(s); features rebuilt "
                     "beside (%d data-directory event(s), %d logged event(s) caught up) and swapped in %.1f s",
                     len(users), out["events"], out["exposures"], out["data_events"], out["caught_up"], out["seconds"])
            return out

    # ------------------------------------------------------------ the rebuild

    def _build_store(self, work: Path) -> StoreConfig:
        if isinstance(self.store_cfg, RedisConfig):
            cfg = replace(self.store_cfg, namespace=f"{self.store_cfg.namespace}-erasure")
            leftover = RedisStore(cfg)  # of an erasure that did not finish
            try:
                leftover.drop_namespace()
            finally:
                leftover.close()
            return cfg
        return InProcessConfig(path=str(work / "online-store.bin"), fork_snapshots=False)

    async def _rebuild(self, users: list[str], work: Path) -> dict:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        engine, ingest = self.engine, self.ingest
        items = engine.items.items
        await asyncio.to_thread(items.write_parquet, work / "items.parquet")
        build_cfg = self._build_store(work)
        spec = {"data_dir": str(self.data_dir), "state_dir": str(self.state_dir), "items": str(work / "items.parquet"),
                "store": asdict(build_cfg), "params": asdict(engine.online.params), "rules": asdict(self.rules),
                "erased": users, "pseudonym_key": self.pseudonyms.key_for_child()}
        child = await self._run_rebuild(spec)
        if isinstance(build_cfg, RedisConfig):
            rebuilt = RedisStore(build_cfg)
        else:
            rebuilt = await asyncio.to_thread(InProcessStore.detached, build_cfg.path)
        try:
            beside = await asyncio.to_thread(OnlineFeatures, rebuilt, items, engine.online.params)
            held = applied_seq(beside)
            caught = await asyncio.to_thread(self._catch_up, beside, held, ingest.committed_seq)
            held = applied_seq(beside)
            await asyncio.to_thread(beside.warm)  # its caches go live with it: no Rank pays their first fill
            redis = isinstance(rebuilt, RedisStore)
            async with ingest.applied_lock:
                target = ingest.committed_seq

                def swap() -> int:
                    n = self._catch_up(beside, held, target)
                    if engine.items.items is not items:  # items upserted meanwhile
                        beside.upsert_items(engine.items.items)
                    live = engine.online.store
                    live.adopt(rebuilt)
                    beside.rebind(live)
                    return n

                engine.store_rebuilding = redis  # Redis's rename is not atomic: answers say so meanwhile
                try:
                    last = await engine.store_worker.write(swap)
                finally:
                    engine.store_rebuilding = False
                engine.online = ingest.online = beside
                ingest.applied_lock.notify_all()
        finally:
            rebuilt.close()
        return {"data_events": child["events"], "rebuilt_seq": child["seq"], "child_s": child["seconds"],
                "caught_up": caught + last}

    def _catch_up(self, online: OnlineFeatures, after: int, upto: int) -> int:
        """Apply the event log's events (after, upto] to `online`, without erased users' and those the
        event rules refuse (as the restore does), recording `upto` as applied; returns how many."""
        if upto <= after:
            return 0
        batch: list[LoggedEvent] = []
        applied, last, now_us = 0, after, round(time.time() * 1_000_000)
        for seq, ev in self.ingest.event_log.replay(after):
            if seq > upto:
                break
            if ev.user_id not in self.erasures and self.rules.problem(ev, now_us) is None:
                batch.append(ev)
            if len(batch) >= CATCH_UP_CHUNK:
                apply_logged(online, batch, seq, last)
                applied, last, batch = applied + len(batch), seq, []
        apply_logged(online, batch, upto, last)
        return applied + len(batch)


async def run_rebuild(spec: dict) -> dict:
    """`python -m serving.ingest.rebuild` with `spec` on its standard input; its JSON answer."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "serving.ingest.rebuild",
                                                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate(json.dumps(spec).encode())
    if proc.returncode != 0:
        raise RuntimeError(f"the rebuild process exited with {proc.returncode} (its log is the server's stderr)")
    return json.loads(out.decode().strip().splitlines()[-1])
