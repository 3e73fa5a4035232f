"""Score batch-input chunks with the service's own engine: `RankingEngine.rank` per request.

    scorer = Scorer(ScoreConfig(bundle_dir, data_dir, state_dir, as_of=None, encoder="inprocess"))
    out = scorer.score_table(chunk, layout, first_row)    # input columns + score + rank
    scorer.close()

The engine, the bundle runtime and the catalog embeddings are built exactly as `semrank serve`
builds them (`serving.ingest.restore.build_engine`, `serving.ranking.registry.BundleRegistry`), from the same
data and state directories, read-only. Features are read at one instant, `as_of` (default: the
state's latest event + 1 µs, so a rerun on the same state gives the same scores).

Each request goes through `RankingEngine.rank`, the code behind the Rank RPC. The only batch
addition, for a bundle with a text user tower: before ranking a group of requests, the history
texts of their users are embedded in one bulk encoder call (`prefetch_user_embeddings`) and cached
as `rank` would cache them; `rank` then finds them there. A pooled tower needs no prefetch: its
user vectors come from the item vectors. A degraded answer (encoder unavailable) fails the job instead of writing
scores without the text features.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from featurizer.errors import SemrankError
from featurizer.privacy import Pseudonyms, check_state
from serving.batch.input import INLINE_COLUMNS, BatchInputError, InputLayout, key_breaks
from serving.encoding.factories import TritonEncoderOptions, encoder_factory
from serving.triton.client import ExternalTriton
from serving.encoding.pool import EncoderPool
from serving.ingest.restore import build_engine
from serving.ranking.outcome import Candidate
from serving.ranking.registry import BundleRegistry

log = logging.getLogger(__name__)

# The batch job waits for the encoder rather than answering without it.
BATCH_TRITON = TritonEncoderOptions(deadline_s=60.0, retries=2, breaker_failures=1_000_000, bulk_timeout_s=600.0)


# Users whose embeddings stay cached across request groups and chunks (~1.6 KB each): bounds memory
# whatever the number of distinct users; a group's users (users_per_call) always fit.
USER_CACHE = 50_000


class BatchScoringError(SemrankError, RuntimeError):
    """The job cannot produce the scores the service would; the message says why and what to do."""

    grpc_code = "FAILED_PRECONDITION"
    reason = "BATCH_SCORING_FAILED"


@dataclass(frozen=True)
class ScoreConfig:
    bundle_dir: Path
    data_dir: Path
    state_dir: Path
    as_of: datetime | None = None  # None: the state's latest event + 1 µs
    encoder: str = "inprocess"  # or "triton"
    threads: int | None = None  # torch threads of the in-process encoder
    triton: ExternalTriton | None = None  # with encoder "triton": this Triton instead of a child process
    users_per_call: int = 256  # requests whose user texts are embedded in one encoder call (<= USER_CACHE)
    # The server's pseudonymous ids (featurizer.privacy): input user ids are mapped before their features are
    # read; the output keeps the ids the input gave
    pseudonyms: Pseudonyms = field(default_factory=Pseudonyms)


def resolve_as_of(as_of: datetime | None, watermark: datetime | None) -> datetime:
    """The scoring instant: `as_of` (naive = UTC), checked against the state, or watermark + 1 µs."""
    if as_of is None:
        if watermark is None:
            raise BatchScoringError("the state holds no events, so there is no default --as-of; pass --as-of ISO-TIME")
        return watermark + timedelta(microseconds=1)
    if as_of.tzinfo is None:
        as_of = as_of.replace(tzinfo=timezone.utc)
    if watermark is not None and as_of <= watermark:
        raise BatchScoringError(
            f"--as-of {as_of.isoformat()} is not after the latest event in the state ({watermark.isoformat()}): "
            "online features are read strictly before as-of from state that already holds later events. Pass an "
            f"--as-of after {watermark.isoformat()}, or omit it (default: that event + 1 µs)"
        )
    return as_of


class Scorer:
    """One engine, bundle runtime and encoder, built once; scores chunks (see the module docstring)."""

    def __init__(self, cfg: ScoreConfig):
        self.cfg = cfg
        self._loop = asyncio.new_event_loop()
        self._built = None
        self._registry: BundleRegistry | None = None
        try:
            self._loop.run_until_complete(self._start())
        except BaseException:
            self.close()
            raise

    async def _start(self) -> None:
        cfg = self.cfg
        self.as_of: datetime | None = None
        check_state(cfg.state_dir, cfg.pseudonyms, holds_data=True, record=False)
        self._built = build_engine(cfg.data_dir, cfg.state_dir, None, clock=lambda: self.as_of, read_only=True,
                                   user_cache_size=USER_CACHE, pseudonyms=cfg.pseudonyms)
        self.engine = self._built.engine
        self.as_of = resolve_as_of(cfg.as_of, self.engine.online.watermark)
        factory = encoder_factory(cfg.encoder, threads=cfg.threads, triton=BATCH_TRITON, external=cfg.triton)
        self._registry = BundleRegistry(self.engine, EncoderPool(factory))
        await self._registry.start(cfg.bundle_dir)  # loads, embeds missing catalog items, probes
        self.runtime = self._registry.default.runtime
        self.bundle_version = self.runtime.version
        log.info("batch scorer: bundle %s, as of %s, encoder %s (%s)", self.bundle_version, self.as_of.isoformat(),
                 cfg.encoder, self.runtime.encoder_key or "none")

    def close(self) -> None:
        if self._registry is not None:
            self._loop.run_until_complete(self._registry.close())
            self._registry = None
        if self._built is not None:
            self._built.close()
            self._built = None
        if not self._loop.is_closed():
            self._loop.close()

    # ------------------------------------------------------------ scoring

    def score_requests(self, requests: list[tuple[str, list[Candidate]]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(scores, 1-based ranks) per request, both in candidate order."""
        return self._loop.run_until_complete(self._score_requests(requests))

    async def _score_requests(self, requests):
        engine, rt, step = self.engine, self.runtime, min(max(1, self.cfg.users_per_call), USER_CACHE)
        out = []
        for g in range(0, len(requests), step):
            group = [(self.cfg.pseudonyms(u), c) for u, c in requests[g : g + step]]  # the stored ids
            await engine.prefetch_user_embeddings(rt, [u for u, _ in group])
            for user_id, candidates in group:
                outcome = await engine.rank(rt, user_id, candidates)
                if outcome.degraded:
                    raise BatchScoringError(f"user {user_id!r}: {'; '.join(outcome.degraded_reasons)}; the batch job "
                                            "does not write scores without text features: fix the encoder and rerun "
                                            "(finished chunks are kept)")
                n = len(candidates)
                pos = {c.item_id: k for k, c in enumerate(candidates)}
                order = np.fromiter((pos[i] for i in outcome.item_ids), dtype=np.int64, count=n)
                scores = np.empty(n, dtype=np.float64)
                ranks = np.empty(n, dtype=np.int32)
                scores[order] = outcome.scores
                ranks[order] = np.arange(1, n + 1, dtype=np.int32)
                out.append((scores, ranks))
        return out

    def score_table(self, table: pa.Table, layout: InputLayout, first_row: int = 0, where: str = "input") -> pa.Table:
        """The chunk's columns plus `score` and `rank` (lists layout: lists aligned with item_ids)."""
        if layout.kind == "lists":
            return self._score_lists(table, first_row, where)
        return self._score_rows(table, layout, first_row, where)

    def _score_rows(self, table: pa.Table, layout: InputLayout, first_row: int, where: str) -> pa.Table:
        n = table.num_rows
        users = _strings(table, "user_id", first_row, where)
        items = _strings(table, "item_id", first_row, where)
        key = table.column(layout.key).combine_chunks() if n else pa.array([], pa.string())
        starts = np.concatenate([[0], key_breaks(key)]).astype(np.int64) if n else np.zeros(0, dtype=np.int64)
        ends = np.append(starts[1:], n)
        run_keys = [key[int(s)].as_py() for s in starts]
        if len(set(run_keys)) != len(run_keys):
            seen: dict = {}
            for s, k in zip(starts.tolist(), run_keys):
                if k in seen:
                    raise BatchInputError(
                        f"{where}: rows {first_row + seen[k]} and {first_row + s}: request {layout.key}={k!r} is split "
                        f"into runs that are not contiguous; sort the input by {layout.key} (a request is a run of "
                        "consecutive rows)")
                seen[k] = s
        inline = [c for c in INLINE_COLUMNS if c in table.column_names]
        cols = {c: table.column(c).to_pylist() for c in inline}
        requests = []
        for s, e in zip(starts.tolist(), ends.tolist()):
            user = users[s]
            if any(u != user for u in users[s:e]):
                raise BatchInputError(f"{where}: request {layout.key}={run_keys[len(requests)]!r} (rows "
                                      f"{first_row + s}..{first_row + e - 1}) has more than one user_id")
            cands = [_candidate(items[r], cols, r) for r in range(s, e)]
            _check_unique(cands, first_row + s, where)
            requests.append((user, cands))
        scored = self.score_requests(requests)
        score = np.concatenate([x for x, _ in scored]) if scored else np.zeros(0)
        rank = np.concatenate([r for _, r in scored]) if scored else np.zeros(0, dtype=np.int32)
        return table.append_column("score", pa.array(score, pa.float64())).append_column("rank", pa.array(rank, pa.int32()))

    def _score_lists(self, table: pa.Table, first_row: int, where: str) -> pa.Table:
        users = _strings(table, "user_id", first_row, where)
        lists = table.column("item_ids").combine_chunks() if table.num_rows else pa.array([], pa.list_(pa.string()))
        if lists.null_count:
            bad = first_row + int(np.flatnonzero(lists.is_null().to_numpy(zero_copy_only=False))[0])
            raise BatchInputError(f"{where}: row {bad}: item_ids is null; give a (possibly empty) list")
        offsets = lists.offsets.to_numpy() - lists.offsets[0].as_py()
        values = pc.cast(lists.flatten(), pa.string()).to_pylist()
        requests = []
        for r in range(len(users)):
            ids = values[offsets[r] : offsets[r + 1]]
            if any(i is None or i == "" for i in ids):
                raise BatchInputError(f"{where}: row {first_row + r}: item_ids holds a null or empty id")
            cands = [Candidate(item_id=i) for i in ids]
            _check_unique(cands, first_row + r, where)
            requests.append((users[r], cands))
        scored = self.score_requests(requests)
        flat_s = np.concatenate([x for x, _ in scored]) if scored else np.zeros(0)
        flat_r = np.concatenate([r for _, r in scored]) if scored else np.zeros(0, dtype=np.int32)
        off = pa.array(offsets, pa.int32())
        score = pa.ListArray.from_arrays(off, pa.array(flat_s, pa.float64()))
        rank = pa.ListArray.from_arrays(off, pa.array(flat_r, pa.int32()))
        return table.append_column("score", score).append_column("rank", rank)


def _strings(table: pa.Table, column: str, first_row: int, where: str) -> list[str]:
    col = table.column(column)
    if col.null_count:
        bad = first_row + int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise BatchInputError(f"{where}: row {bad}: {column} is null")
    values = pc.cast(col, pa.string()).to_pylist()
    if "" in values:
        raise BatchInputError(f"{where}: row {first_row + values.index('')}: {column} is empty")
    return values


def _candidate(item_id: str, cols: dict[str, list], r: int) -> Candidate:
    if not cols:
        return Candidate(item_id=item_id)
    text = {c: (cols[c][r] or "") for c in ("title", "description", "category", "brand") if c in cols}
    price = cols["price"][r] if "price" in cols else None
    return Candidate(item_id=item_id, price=None if price is None else float(price), **text)


def _check_unique(cands: list[Candidate], first_row: int, where: str) -> None:
    seen: dict[str, int] = {}
    for k, c in enumerate(cands):
        if c.item_id in seen:
            raise BatchInputError(f"{where}: request at row {first_row}: candidate {c.item_id!r} appears twice "
                                  f"(positions {seen[c.item_id]} and {k}); the service rejects duplicates too")
        seen[c.item_id] = k
