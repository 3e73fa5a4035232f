"""Erasing users on a running server (issue 18 item 3; the admin `DeleteUser` RPC).

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

On JetStream (`StreamSide`) the event log's part is the stream's: the users' subjects are purged
and one entry per user goes to the fleet's control bucket (serving.ingest.control); every replica
applies the entries it has not applied (`sync_fleet`: steps 1, 3-6, the child folding the stream
from its start, a second fold over the rebuilt state from its seq to the live one's, and the purge
again), and the replica that took the call shares its new snapshot. The state's meta row records
the fleet revision it reflects (`fleet_through`), which a replica's start-up compares with the
fleet's entries (serving.server). docs/privacy.md has the whole contract.

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
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from itertools import takewhile
from pathlib import Path

from featurizer.contracts.event_rules import EventRules, ItemRules
from featurizer.erasure import PRIVACY_DIR, Erasures
from featurizer.errors import SemrankError
from featurizer.online.features import OnlineFeatures
from featurizer.privacy import Pseudonyms
from featurizer.store.config import InProcessConfig, RedisConfig, StoreConfig
from featurizer.store.in_process import InProcessStore
from featurizer.store.redis import RedisStore
from serving.config import JetStreamConfig
from serving.experiments.exposure_log import ExposureLog
from serving.ingest.apply import EventIngest, applied_seq
from serving.ingest.control import fleet_erasures, publish_erasures
from serving.ingest.jetstream import StreamIngest
from serving.ingest.rebuild import catalog_items
from serving.ingest.restore import replay_logged
from serving.ingest.stream_format import subject_for
from serving.ranking.engine import RankingEngine
from serving.ranking.store_worker import StoreWorker

log = logging.getLogger(__name__)

REBUILD_DIR = "rebuild"  # STATE/privacy/rebuild: the child's snapshot and catalog, removed after
FLEET_ERASURES_KEY = "fleet-erasures"  # meta row: {"through": the fleet erasure revision the state reflects}
CLOSE_TIMEOUT_S = 10.0


class ErasureFailed(SemrankError):
    """An erasure did not finish (the message says which part did): call DeleteUser again."""

    grpc_code = "INTERNAL"
    reason = "ERASURE_INCOMPLETE"


class ErasureUnavailable(SemrankError):
    """DeleteUser where erasure cannot reach every copy of the users' data (docs/privacy.md)."""

    grpc_code = "FAILED_PRECONDITION"
    reason = "ERASURE_UNAVAILABLE"


class _Hashed:
    """Stored ids whose keyed hash is one of `hashes` (a fleet's erasures are known by hash only)."""

    def __init__(self, erasures: Erasures, hashes: set[str]):
        self._erasures, self._hashes = erasures, hashes

    def __contains__(self, stored_id: object) -> bool:
        return isinstance(stored_id, str) and self._erasures.hash(stored_id) in self._hashes


@dataclass
class StreamSide:
    """What an erasure needs of a JetStream replica (None with local events)."""

    cfg: JetStreamConfig
    dedup_window_s: float
    item_rules: ItemRules
    share: Callable[[], Awaitable[None]]  # share the snapshot just persisted (serving.ingest.snapshots)


class LiveErasure:
    def __init__(self, *, state_dir: Path, data_dir: Path, store_cfg: StoreConfig, engine: RankingEngine,
                 ingest: EventIngest | StreamIngest, exposures: ExposureLog, pseudonyms: Pseudonyms,
                 rules: EventRules, erasures: Erasures, persist: Callable[[], Awaitable[None]],
                 forget: Callable[[object], None], rebuild: Callable[[dict], Awaitable[dict]] | None = None,
                 stream: StreamSide | None = None):
        """`persist`: write the in-process store's state now (a full snapshot); `forget`: drop the
        cached entries (user vectors, sequence states) of the stored ids a container holds;
        `rebuild`: runs the child (`run_rebuild`; tests wrap it to write while it runs); `stream`:
        the replica's JetStream side (events on the stream, erasures shared by the fleet)."""
        self.state_dir, self.data_dir, self.store_cfg = Path(state_dir), Path(data_dir), store_cfg
        self.engine, self.ingest, self.exposures = engine, ingest, exposures
        self.pseudonyms, self.rules, self.erasures = pseudonyms, rules, erasures
        self._persist, self._forget = persist, forget
        self._run_rebuild = rebuild or run_rebuild
        self.stream = stream
        self.pending = 0  # fleet entries seen and not applied yet (the snapshot is not shared meanwhile)
        self.applied = set(erasures.hashes)  # erasures this state reflects (a failed one is tried again)
        self.rebuilds = 0  # states rebuilt by this process (each a child process and a swap)
        self._lock = asyncio.Lock()

    def refusal(self) -> str | None:
        """Why DeleteUser cannot run on this server (None: it can)."""
        if self.stream is None:
            return None
        if not isinstance(self.store_cfg, InProcessConfig):
            return ("with --events jetstream and Redis features, erasure is not built (the replicas share one "
                    "namespace); use in-process features, or stop the fleet and use semrank privacy delete-user")
        if not self.erasures.fleet:
            return ("with --events jetstream, erasure needs pseudonymous ids (--pseudonym-key-file): the fleet's "
                    "erasure list is keyed by the fleet's key, so that every replica recognises the users")
        return None

    async def erase(self, stored_ids: list[str], requested_by: str) -> dict:
        """Erase the users (stored ids) as the module docstring says; returns what was removed and
        how long it took. Shielded: once started it finishes even if the caller goes away."""
        users = list(dict.fromkeys(stored_ids))
        work = self._erase(users, requested_by) if self.stream is None else self._erase_fleet(users, requested_by)
        return await asyncio.shield(asyncio.ensure_future(work))

    async def _erase(self, users: list[str], requested_by: str) -> dict:
        async with self._lock:
            t0 = time.monotonic()
            self.erasures.ensure_key()  # (a keyless server's first erasure makes the list's key)
            hashes = {self.erasures.hash(u) for u in users}
            self.erasures.add(hashes)
            self.ingest.erasures = self.erasures  # the fold drops what was on its way
            gone = set(users)
            out: dict = {"users": len(users)}
            out["events"] = await asyncio.to_thread(self.ingest.event_log.erase, gone)
            out["exposures"] = await asyncio.to_thread(self.exposures.erase, gone)
            out.update(await self._rebuild_and_swap(hashes, gone))
            out["events"] += await asyncio.to_thread(self.ingest.event_log.erase, gone)  # (accepted just before 1.)
            self.erasures.record(users, requested_by, {k: out[k] for k in ("events", "exposures")} | {"features": True})
            return self._done(out, t0)

    async def _erase_fleet(self, users: list[str], requested_by: str) -> dict:
        """On JetStream: purge the users' subjects, publish the fleet's entries, apply them here (every
        other replica applies them when it sees them: `sync_fleet`)."""
        t0 = time.monotonic()
        cfg = self.stream.cfg
        now = datetime.now(timezone.utc).isoformat()
        entries = [{"user": self.erasures.hash(u), "subject": subject_for(cfg.subject_prefix, u),
                    "requested_by": requested_by, "at": now} for u in users]
        async with self._lock:  # (the poll applies the entries after this call, or finds them applied)
            try:
                purged = await self.ingest.purge_subjects([e["subject"] for e in entries])
                await publish_erasures(self.ingest.js, cfg, entries)
            except Exception as e:  # noqa: BLE001 - NATS down, or this replica may not purge or write the bucket
                raise ErasureFailed(f"the erasure could not be recorded for the fleet ({type(e).__name__}: {e}); the "
                                    "stream may still hold the users' events: check NATS and this replica's permissions "
                                    "(docs/nats/semrank.conf) and call DeleteUser again") from e
            out = await self._sync_fleet(share=True)
        out.update(users=len(users), events=purged + out.get("events", 0))
        out["seconds"] = round(time.monotonic() - t0, 3)
        return out

    async def sync_fleet(self) -> dict:
        """Apply the fleet's erasure entries this replica has not applied, in the order of their
        revisions (the poll of serving.server, and its start-up)."""
        async with self._lock:
            return await self._sync_fleet(share=False)

    async def _sync_fleet(self, share: bool) -> dict:
        """`sync_fleet`, under the lock; `share`: replace the shared snapshot after (DeleteUser's replica)."""
        entries = await fleet_erasures(self.ingest.js, self.stream.cfg, known=self.applied)
        out: dict = {"users": 0, "events": 0, "exposures": 0, "data_events": 0, "caught_up": 0}
        if not entries:
            return out
        t0 = time.monotonic()
        self.pending = len(entries)
        try:
            hashes = {e["user"] for e in entries}
            self.erasures.add(hashes)
            self.ingest.erasures = self.erasures  # the fold skips their messages from now on
            gone = _Hashed(self.erasures, hashes)
            out["users"] = len(hashes)
            out["exposures"] = await asyncio.to_thread(self.exposures.erase, gone)
            out.update(await self._rebuild_and_swap(hashes, gone, max(e["revision"] for e in entries)))
            if share:  # the replica that took DeleteUser replaces the shared snapshot (one upload a fleet)
                await self.stream.share()
            # messages published by replicas that had not seen the entries yet
            out["events"] = await self.ingest.purge_subjects([e["subject"] for e in entries])
            self.erasures.record_hashes(entries, {"exposures": out["exposures"], "features": True,
                                                  "stream_purged": True})
            self.applied |= hashes
        finally:
            self.pending = 0
        return self._done(out, t0)

    def _done(self, out: dict, t0: float) -> dict:
        out["seconds"] = round(time.monotonic() - t0, 3)
        log.info("erased %d user(s) on a running server: %d event(s), %d exposure record(s); features rebuilt "
                 "beside (%d data-directory event(s), %d event(s) caught up) and swapped in %.1f s", out["users"],
                 out["events"], out["exposures"], out["data_events"], out["caught_up"], out["seconds"])
        return out

    # ------------------------------------------------------------ the rebuild

    async def _rebuild_and_swap(self, hashes: set[str], gone, through: int | None = None) -> dict:
        """Rebuild without `hashes`, swap in, forget `gone`'s cached entries, persist. `through`: the
        fleet's erasure revision the new state reflects (JetStream)."""
        t_rebuild = time.monotonic()
        work = self.state_dir / PRIVACY_DIR / REBUILD_DIR
        try:
            out = await self._rebuild(sorted(hashes), work, through)
        except Exception as e:
            log.exception("erasure: rebuilding the features without %d user(s) failed", len(hashes))
            raise ErasureFailed(f"the features could not be rebuilt without the user(s) ({type(e).__name__}: {e}); "
                                "their events and exposures are erased and new events refused; call DeleteUser "
                                "again") from e
        finally:
            shutil.rmtree(work, ignore_errors=True)
        out["rebuild_s"] = round(time.monotonic() - t_rebuild, 3)
        self._forget(gone)
        await self._persist()
        return out

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

    async def _rebuild(self, hashes: list[str], work: Path, through: int | None) -> dict:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        engine, ingest = self.engine, self.ingest
        items = engine.items.items
        await asyncio.to_thread(items.write_parquet, work / "items.parquet")
        build_cfg = self._build_store(work)
        spec = {"data_dir": str(self.data_dir), "state_dir": str(self.state_dir), "items": str(work / "items.parquet"),
                "store": asdict(build_cfg), "params": asdict(engine.online.params), "rules": asdict(self.rules),
                "erased": hashes, "pseudonym_key": self.pseudonyms.key_for_child()}
        if self.stream is not None:
            spec.update(jetstream=asdict(self.stream.cfg), dedup_window_s=self.stream.dedup_window_s,
                        item_rules=asdict(self.stream.item_rules))
        child = await self._run_rebuild(spec)
        self.rebuilds += 1
        if isinstance(build_cfg, RedisConfig):
            rebuilt = RedisStore(build_cfg)
        else:
            rebuilt = await asyncio.to_thread(InProcessStore.detached, build_cfg.path)
        beside_ingest = None
        try:
            beside = await asyncio.to_thread(OnlineFeatures, rebuilt, items, engine.online.params)
            if self.stream is None:
                held = applied_seq(beside)
                caught = await asyncio.to_thread(self._catch_up, beside, held, ingest.committed_seq)
                held = applied_seq(beside)
            else:  # a second fold of the stream over the rebuilt state, from its seq on
                s = self.stream
                beside_ingest = await StreamIngest.open(
                    s.cfg, beside, StoreWorker(False), s.dedup_window_s, rules=self.rules, item_rules=s.item_rules,
                    on_items=catalog_items(beside, set(items["item_id"].to_list())),
                    item_known=engine.items.index.__contains__, pseudonyms=self.pseudonyms, erasures=self.erasures,
                    dead_letters=False)
                caught = beside_ingest.committed_seq - child["seq"]
            await asyncio.to_thread(beside.warm)  # its caches go live with it: no Rank pays their first fill
            redis = isinstance(rebuilt, RedisStore)
            async with ingest.applied_lock:
                target = ingest.committed_seq
                if beside_ingest is not None:
                    if not await beside_ingest.wait_folded(target, self.stream.cfg.apply_timeout_s * 4):
                        raise TimeoutError(f"the rebuilt state's fold did not reach seq {target} in time")
                    await beside_ingest.stop_fold()  # (its connection is closed after the lock is released)
                    target = beside_ingest.committed_seq
                    caught = target - child["seq"]

                def swap() -> int:
                    n = self._catch_up(beside, held, target) if beside_ingest is None else 0
                    if engine.items.items is not items:  # items upserted meanwhile
                        beside.upsert_items(engine.items.items)
                    if through is not None:  # what a snapshot of this state reflects (`fleet_through`)
                        rebuilt.write("meta", {FLEET_ERASURES_KEY: {"through": through}})
                    live = engine.online.store
                    live.adopt(rebuilt)
                    beside.rebind(live)
                    return n

                engine.store_rebuilding = redis  # Redis's rename is not atomic: answers say so meanwhile
                try:
                    last = await engine.store_worker.write(swap)
                finally:
                    engine.store_rebuilding = False
                engine.online = beside
                if isinstance(ingest, EventIngest):
                    ingest.online, ingest.committed_seq = beside, target
                    ingest.applied_lock.notify_all()
                else:
                    await ingest.moved_to(beside, target)
        finally:
            rebuilt.close()
            if beside_ingest is not None:
                try:  # bounded: a NATS client's close has been seen to wait for ever
                    await asyncio.wait_for(beside_ingest.close(), CLOSE_TIMEOUT_S)
                except asyncio.TimeoutError:
                    log.warning("erasure: the rebuilt state's NATS connection did not close in %.0f s", CLOSE_TIMEOUT_S)
        return {"data_events": child["events"], "rebuilt_seq": child["seq"], "child_s": child["seconds"],
                "caught_up": caught + last}

    def _catch_up(self, online: OnlineFeatures, after: int, upto: int) -> int:
        """Apply the event log's events (after, upto] to `online` as the restore does
        (`replay_logged`), without erased users', recording `upto` as applied; returns how many."""
        logged = takewhile(lambda pair: pair[0] <= upto, self.ingest.event_log.replay(after))
        kept = ((seq, ev) for seq, ev in logged if ev.user_id not in self.erasures)
        return replay_logged(online, kept, after, self.rules, through=upto)[0]


def fleet_through(online: OnlineFeatures) -> int:
    """The fleet erasure revision the state reflects (0: none; serving.ingest.control)."""
    held = online.store.read("meta", [FLEET_ERASURES_KEY])[0]
    return int(held["through"]) if held else 0


async def run_rebuild(spec: dict) -> dict:
    """`python -m serving.ingest.rebuild` with `spec` on its standard input; its JSON answer."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "serving.ingest.rebuild",
                                                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate(json.dumps(spec).encode())
    if proc.returncode != 0:
        raise RuntimeError(f"the rebuild process exited with {proc.returncode} (its log is the server's stderr)")
    return json.loads(out.decode().strip().splitlines()[-1])
