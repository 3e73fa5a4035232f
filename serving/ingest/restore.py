"""The state a RankingEngine reads, built one way for the service and for batch jobs.

    built = build_engine(data_dir, state_dir, store_cfg, clock)                   # semrank serve
    built = build_engine(data_dir, state_dir, None, clock, read_only=True)       # semrank score
    built.engine.rank(...); built.close()

In start-up order (serving.server's):
1. the data directory's items, then the items upserted since (`state_dir/items`);
2. the online features: the store's snapshot when it has one, else the data directory's
   events (without those of users erased on request: featurizer.erasure); then the durable event
   log (`state_dir/events`) past what the snapshot holds;
3. a `RankingEngine` over both, reading features at `clock()`.

`read_only` is for jobs that read a state directory a server may be using: the event log is
read without its writer lock (a record being written is left out) and the in-process snapshot
is loaded but never written back. Item embeddings are still added to `state_dir/embeddings`
(append-only files, as the server adds them).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

import polars as pl

from featurizer.contracts.event_rules import EventRules
from featurizer.contracts.schema import read_dataset
from featurizer.definitions import FeatureParams
from featurizer.erasure import Erasures
from featurizer.errors import SemrankError
from featurizer.online.features import OnlineFeatures
from featurizer.privacy import Pseudonyms
from featurizer.store.base import OnlineStore
from featurizer.store.config import InProcessConfig, StoreConfig
from featurizer.store.factory import store_from_config
from serving.ingest.apply import apply_logged, applied_seq
from serving.ingest.event_log import EventLog
from serving.ingest.log_format import LoggedEvent, read_log
from serving.ranking.engine import RankingEngine, utc_now
from serving.ranking.item_store import ItemStore

log = logging.getLogger(__name__)

REPLAY_CHUNK = 50_000
SNAPSHOT_FILE = "online-store.bin"  # the in-process store's snapshot in a state directory


class ReadOnlyStateError(SemrankError, ValueError):
    """A read-only job was pointed at state it would have to modify."""

    grpc_code = "FAILED_PRECONDITION"
    reason = "READ_ONLY_STATE"


@dataclass
class BuiltEngine:
    engine: RankingEngine
    event_log: EventLog | None  # the open writer; None when read_only or on JetStream
    closers: list[Callable[[], None]] = field(default_factory=list)  # in order: store worker, event log, store
    erasures: Erasures | None = None  # the state directory's erased users (featurizer.erasure)

    def close(self) -> None:
        close_all(self.closers)
        self.closers = []


def close_all(closers: list[Callable[[], None]]) -> None:
    """Call each closer in order; one that fails is logged and the rest still run."""
    for close in closers:
        try:
            close()
        except Exception:  # noqa: BLE001 - close the rest anyway
            log.exception("closing %s", close)


def default_store(state_dir: Path) -> InProcessConfig:
    """In-process features, snapshotted to state_dir/online-store.bin."""
    return InProcessConfig(path=str(state_dir / SNAPSHOT_FILE))


# What of a state directory holds stored user ids (featurizer.privacy.check_state).
STATE_DATA = ("events", SNAPSHOT_FILE, "exposures")


def snapshot_file(cfg, state_dir: Path) -> Path | None:
    """The in-process store's snapshot file for a ServeConfig (None: Redis, or memory only)."""
    store = cfg.store or default_store(state_dir)
    return Path(store.path) if isinstance(store, InProcessConfig) and store.path else None


def restore_online(store: OnlineStore, items: pl.DataFrame, events: pl.DataFrame,
                   logged: Callable[[int], Iterator[tuple[int, LoggedEvent]]],
                   rules: EventRules = EventRules(), params: FeatureParams = FeatureParams()) -> OnlineFeatures:
    """Online features from the store's snapshot (or `events` when it has none), then the logged
    events after the snapshot's seq (`logged(after_seq)` yields them in seq order), as
    `replay_logged` applies them."""
    online = OnlineFeatures(store, items, params)
    if online.watermark is None:
        online.apply(events)
        after = 0
        log.info("online features built from %d data-dir events", events.height)
    else:
        after = applied_seq(online)
        log.info("online features restored from the store (up to %s, event log seq %d)", online.watermark, after)
    replayed, refused = replay_logged(online, logged(after), after, rules)
    if replayed or refused:
        log.info("replayed %d event(s) from the event log (%d refused by the event rules)", replayed, refused)
    return online


def replay_logged(online: OnlineFeatures, logged: Iterable[tuple[int, LoggedEvent]], after: int,
                  rules: EventRules, through: int | None = None) -> tuple[int, int]:
    """Apply logged events (seq, event; the seqs after `after`, in order) to `online` in commits of
    REPLAY_CHUNK, each fenced on the seq before it; an event the event rules refuse now (the log was
    written after LogEvents checked them with the same rules at an earlier clock, so only a damaged
    or edited log holds one) is skipped and logged: it never reaches the features, nor moves their
    clock. Records `through` (default: the last seq read) as applied, so the store holds the log's
    end past refused or filtered events. Returns (applied, refused)."""
    replayed = refused = 0
    batch: list[LoggedEvent] = []
    seq = last = after
    now_us = round(time.time() * 1_000_000)
    for seq, ev in logged:
        problem = rules.problem(ev, now_us)
        if problem is not None:
            refused += 1
            log.error("event log seq %d is skipped: the event rules refuse it (%s)", seq, problem)
        else:
            batch.append(ev)
        if len(batch) >= REPLAY_CHUNK:
            apply_logged(online, batch, seq, last)
            replayed, last, batch = replayed + len(batch), seq, []
    end = seq if through is None else through
    if end > last:
        apply_logged(online, batch, end, last)
        replayed += len(batch)
    return replayed, refused


def build_engine(data_dir: Path, state_dir: Path, store_cfg: StoreConfig | None = None,
                 clock: Callable[[], datetime] = utc_now, *, read_only: bool = False, local_log: bool = True,
                 embeddings_dir: Path | None = None, on_cache: Callable[[str, bool], None] | None = None,
                 rules: EventRules = EventRules(), pseudonyms: Pseudonyms = Pseudonyms(),
                 feature_params: FeatureParams = FeatureParams(), **engine_kw) -> BuiltEngine:
    """Items, online features and the engine over them (see the module docstring).

    `store_cfg` None: in-process, snapshotted to state_dir/online-store.bin. `local_log` False:
    events come from JetStream, which the server folds after this (serving.ingest.jetstream); no
    local event log is opened or replayed. `pseudonyms`: the data directory's user ids (the shop's
    own) are mapped to the stored ids (featurizer.privacy); the event log holds stored ids already.
    `feature_params`: for a state made now (a stored state keeps its `sequence_items`).
    `engine_kw` go to RankingEngine (cache sizes). On failure whatever was opened is closed again."""
    state_dir = Path(state_dir)
    cfg = store_cfg or default_store(state_dir)
    if read_only and not isinstance(cfg, InProcessConfig):
        raise ReadOnlyStateError(
            f"a read-only job cannot use a {cfg.type} online store: replaying the event log would write into "
            "the live store; point it at the state directory's in-process snapshot instead"
        )
    ds = read_dataset(data_dir)
    log.info("data: %s", ds.report)
    items = ItemStore(ds.items, state_dir, embeddings_dir)
    closers: list[Callable[[], None]] = []
    try:
        if read_only:
            event_log = None
            store = store_from_config(replace(cfg, autoflush=False))  # never flushed nor closed: nothing written
            logged = lambda after: read_log(state_dir / "events", after)  # noqa: E731
        elif not local_log:
            event_log = None
            store = store_from_config(cfg)
            closers.append(store.close)
            logged = lambda after: iter(())  # noqa: E731 - the stream is folded by the server
        else:
            event_log = EventLog(state_dir / "events")
            closers.append(event_log.close)
            store = store_from_config(cfg)
            closers.append(store.close)
            logged = event_log.replay
        erasures = Erasures.open(state_dir, pseudonyms)  # erased users' events never come back (featurizer.erasure)
        online = restore_online(store, items.items, erasures.filter_events(pseudonyms.events(ds.events)), logged, rules,
                                feature_params)
        engine = RankingEngine(items=items, online=online, clock=clock, on_cache=on_cache, **engine_kw)
        closers.insert(0, engine.store_worker.close)  # no call into the store runs once the log and store close
    except BaseException:
        BuiltEngine(engine=None, event_log=None, closers=closers).close()  # type: ignore[arg-type]
        raise
    return BuiltEngine(engine=engine, event_log=event_log, closers=closers, erasures=erasures)
