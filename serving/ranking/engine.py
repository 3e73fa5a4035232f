"""The request path: gather features, get embeddings, score with a bundle.

`RankingEngine` holds what every bundle shares: the item store (item data and cached
item embeddings per encoder), the online features (`featurizer.online.features`, the
same definitions as training), the user-vector cache and the clock. A `BundleRuntime`
is one loaded bundle plus the encoder that serves its item texts. Features are
gathered and LightGBM scores all candidates of a request in one vectorised call.

The user side of the interest score is the bundle's user tower (`ranker.user_tower`). The
pooled tower pools the item store's vectors of the user's recent items, with no encoder call
(cached until the user's history or the item store's vectors change): a Rank over known items
never waits on the encoder. The encoder is called
only for text the item store has no current vector of (inline unknown items, items whose
text changed), and by a text tower after the user's history changed; each call is reported
by cause (`on_encode`, `serving.ranking.outcome.ENCODE_CAUSES`).

A bundle with a sequence model also gets `sequence_score` in this process, without Triton
(`serving.ranking.sequence_scores`: the model's numpy forward pass over the user's item sequence,
cached per user and history).

When the encoder is unavailable the engine still answers: a text tower's cached user
embedding (even one computed from an older history) is used if there is one, otherwise the
text features are missing (NaN, which LightGBM routes as trained); the outcome then
says `degraded` and why.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import numpy as np

from featurizer.definitions import NAMES
from featurizer.online.features import OnlineFeatures, StaleQueryError
from featurizer.store.base import OnlineStoreError
from ranker.bundle import Bundle, BundleError
from ranker.explain import explain as explain_scores
from ranker.feature_matrix import BundleInputs
from ranker.interest import interest_scores
from serving.encoding.pool import EncoderService
from serving.ranking.item_store import ItemStore
from serving.ranking.lru import LruCache
from serving.ranking.outcome import (
    ENCODER_UNAVAILABLE,
    INLINE_ITEM,
    INLINE_ITEM_LIMIT,
    STALE_ITEM,
    STORE_REBUILDING,
    STORE_UNAVAILABLE,
    USER_TEXT,
    Candidate,
    RankOutcome,
    inline_data,
    inline_text,
)
from serving.ranking.sequence_scores import SequenceScorer
from serving.ranking.store_worker import StoreWorker
from serving.triton.client import EncoderUnavailable

log = logging.getLogger(__name__)


def serving_inputs(bundle: Bundle, online: OnlineFeatures | None = None) -> BundleInputs:
    """The bundle's inputs, or BundleError when this server cannot compute one of them: a feature of
    a newer semrank, or `sequence_score` over an online state (`online`) whose user sequences are
    partial (written before semrank kept them) or shorter than the sequence model reads."""
    inputs = BundleInputs.of(bundle)
    other = [n for n in inputs.given if n != "sequence_score"]
    if other:
        raise BundleError(f"bundle {bundle.version} takes {', '.join(other)}, which this server cannot compute")
    if inputs.given and online is not None:
        if not online.sequence_complete:
            raise BundleError(f"bundle {bundle.version} has a sequence model, and the online state was written before "
                              "semrank kept each user's item sequence (its sequences are partial): rebuild it in a new "
                              "state directory or Redis namespace, from the data and the event log")
        if bundle.sequence.cfg.max_len > online.params.sequence_items:
            raise BundleError(f"bundle {bundle.version}: its sequence model reads the last {bundle.sequence.cfg.max_len} "
                              f"items of a user's sequence; the online state keeps {online.params.sequence_items}: "
                              "make the state with `semrank serve --sequence-items N` (N >= that; it is set when a "
                              "state is made)")
    return inputs


class BundleRuntime:
    """One bundle ready to score: its inputs (`ranker.feature_matrix.BundleInputs`) and the encoder of
    its text tower (None for a bundle without text features)."""

    def __init__(self, bundle: Bundle, encoder_key: str, encoder: EncoderService | None):
        self.bundle = bundle
        self.encoder_key = encoder_key
        self.encoder = encoder
        self.inputs = serving_inputs(bundle)  # BundleError when this server cannot compute its features
        self.inflight = 0  # requests currently using this runtime (see BundleRegistry)
        self.sequence: SequenceScorer | None = None  # its sequence model's scorer, made by the engine on first use

    @property
    def version(self) -> str:
        return self.bundle.version

    @property
    def uses_text(self) -> bool:
        return self.inputs.uses_text


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class RankingEngine:
    items: ItemStore
    online: OnlineFeatures
    clock: Callable[[], datetime] = utc_now
    user_cache_size: int = 200_000
    inline_cache_size: int = 50_000
    max_inline_encodes: int = 64  # texts one request may send to the encoder; the rest rank without text
    store_read_timeout_s: float = 0.25  # an online-store read of a Rank waits at most this (then: degraded)
    max_store_waiting: int = 256  # online-store calls queued at most (a remote store; then: degraded at once)
    store_rebuilding: bool = False  # the store lost its state and is being refilled (set by the server)
    on_cache: Callable[[str, bool], None] | None = None  # (cache name, hit) -> None, for metrics
    on_encode: Callable[[str, int], None] | None = None  # (cause, texts) per encoder call a Rank issues, for metrics
    on_history_skipped: Callable[[int], None] | None = None  # history items without a vector (pooled tower)

    def __post_init__(self) -> None:
        self._users = LruCache(self.user_cache_size)  # (encoder key, tower key, user) -> (history, embedding)
        self._inline = LruCache(self.inline_cache_size)  # (encoder key, text) -> embedding
        # Every call into self.online goes through it: off the event loop when the store is remote.
        self.store_worker = StoreWorker(self.online.store.remote, self.store_read_timeout_s, self.max_store_waiting)

    def forget_users(self, users: set[str], runtimes) -> int:
        """Drop the cached user vectors of `users` (stored ids), and their sequence states in each
        bundle runtime of `runtimes` (an erasure: serving.ingest.live_erasure); returns how many."""
        n = self._users.discard_where(lambda key: key[2] in users)
        return n + sum(rt.sequence.forget(users) for rt in runtimes if rt.sequence is not None)

    def now(self) -> datetime:
        """Features are read strictly before this instant (never before the latest applied event)."""
        now = self.clock()
        mark = self.online.watermark
        return now if mark is None or now > mark else mark + timedelta(microseconds=1)

    def _encode_call(self, cause: str, texts: int) -> None:
        if self.on_encode is not None:
            self.on_encode(cause, texts)

    def _hit(self, cache: str, hit: bool) -> None:
        if self.on_cache is not None:
            self.on_cache(cache, hit)

    async def user_embedding(self, rt: BundleRuntime, user_id: str, t: datetime, timeout_s: float | None,
                             reasons: list[str]) -> np.ndarray | None:
        """The user side of the interest score, by the bundle's tower (`ranker.user_tower`); None for
        a user with no history (or no history item with a vector), or when it cannot be computed and
        nothing is cached.

        - pooled: from the item vectors of the user's recent items, which the item store holds; no
          encoder call. Cached per user with the history and the item store's `vectors_version` it
          was computed from, so it follows every event and every re-embedded item at once.
        - text: the encoder over the history text, cached per user and history."""
        tower = rt.inputs.tower
        key = (rt.encoder_key, tower.key, user_id)
        try:
            history = tuple(await self.store_worker.read(self.online.history, user_id, t, tower.history_items,
                                                         timeout_s=timeout_s))
        except OnlineStoreError as e:
            cached = self._users.get(key)
            reasons.append(f"{STORE_UNAVAILABLE}: the user's history is unknown; "
                           f"{'the last user embedding used' if cached else 'ranked without text features'} ({_short(e)})")
            return None if cached is None else cached[1]
        if not tower.uses_encoder:
            version = self.items.vectors_version
            cached = self._users.get(key)
            if cached is not None and cached[0] == history and cached[2] == version:
                self._hit("user_embedding", True)
                return cached[1]
            self._hit("user_embedding", False)
            emb = self.pooled_user_vectors(rt, [history])[0]
            if np.isnan(emb[0]):
                return None
            self._users.put(key, (history, emb, version))
            return emb
        titles = [x for x in map(self.items.title, history) if x]
        if not titles:
            return None
        cached = self._users.get(key)
        if cached is not None and cached[0] == history:
            self._hit("user_embedding", True)
            return cached[1]
        self._hit("user_embedding", False)
        try:
            if rt.encoder is None:
                raise EncoderUnavailable("no encoder for this bundle")
            self._encode_call(USER_TEXT, 1)
            emb = (await rt.encoder.encode([tower.user_text(titles)], timeout_s=timeout_s))[0]
        except EncoderUnavailable as e:
            if cached is not None:
                reasons.append(f"{ENCODER_UNAVAILABLE}: user embedding from an older history ({_short(e)})")
                return cached[1]
            reasons.append(f"{ENCODER_UNAVAILABLE}: ranked without text features ({_short(e)})")
            return None
        self._users.put(key, (history, emb))
        return emb

    def pooled_user_vectors(self, rt: BundleRuntime, histories: Sequence[Sequence[str]]) -> np.ndarray:
        """(len(histories), dim) pooled-tower user vectors from the item store's current vectors
        (NaN rows: no history item has one). History items without a current vector (never
        upserted, or a text not yet re-embedded) are left out and counted."""
        table, current = self.items.embeddings(rt.encoder_key)
        rows = [self.items.rows(list(h)) for h in histories]
        skipped = sum(int((r < 0).sum() + (~current[r[r >= 0]]).sum()) for r in rows)
        if skipped and self.on_history_skipped is not None:
            self.on_history_skipped(skipped)
        return rt.inputs.tower.pool_rows(rows, table, current)

    async def prefetch_user_embeddings(self, rt: BundleRuntime, user_ids: list[str]) -> int:
        """Embed the history texts of many users in one bulk encoder call and cache them as
        `user_embedding` would, so that `rank` for these users (at the same `now()`) hits the
        cache. For batch scoring with a text tower (a pooled tower needs nothing: 0); returns how
        many texts were encoded. Encoder errors propagate."""
        tower = rt.inputs.tower
        if not rt.uses_text or rt.encoder is None or not tower.uses_encoder:
            return 0
        t = self.now()
        todo: dict[str, tuple[tuple[str, ...], str]] = {}
        for user_id in dict.fromkeys(user_ids):
            history = tuple(await self.store_worker.read(self.online.history, user_id, t, tower.history_items))
            titles = [x for x in map(self.items.title, history) if x]
            if not titles:
                continue
            cached = self._users.get((rt.encoder_key, tower.key, user_id))
            if cached is None or cached[0] != history:
                todo[user_id] = (history, tower.user_text(titles))
        if not todo:
            return 0
        texts = list(dict.fromkeys(text for _, text in todo.values()))
        vectors = dict(zip(texts, await rt.encoder.encode_bulk(texts)))
        for user_id, (history, text) in todo.items():
            self._users.put((rt.encoder_key, tower.key, user_id), (history, vectors[text]))
        return len(texts)

    async def item_embeddings(self, rt: BundleRuntime, candidates: list[Candidate], rows: np.ndarray,
                              timeout_s: float | None, reasons: list[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(embeddings with NaN rows where there is none, has-embedding mask, ids with no catalog entry
        and no inline text)."""
        table, current = self.items.embeddings(rt.encoder_key)
        known = rows >= 0
        has = known.copy()
        has[known] = current[rows[known]]
        if len(table):
            emb = table[np.where(has, rows, 0)]  # one gather; rows without a current embedding: NaN below
            if not has.all():
                emb[~has] = np.nan
        else:
            emb = np.full((len(candidates), table.shape[1]), np.nan, dtype=np.float32)
        missing: list[str] = []
        todo_rows, todo_texts = [], []
        stale = 0  # known items whose text changed and is not re-embedded yet (the rest: inline, unknown ids)
        for k in np.flatnonzero(~has):
            c = candidates[k]
            text = inline_text(c) or (self.items.texts[rows[k]] if rows[k] >= 0 else None)
            if text is None:
                missing.append(c.item_id)
                continue
            hit = self._inline.get((rt.encoder_key, text))
            if hit is not None:
                emb[k], has[k] = hit, True
            else:
                todo_rows.append(k)
                todo_texts.append(text)
                stale += int(rows[k] >= 0)
        if len(todo_texts) > self.max_inline_encodes:  # bounded work per request (Limits.max_inline_encodes)
            over = len(todo_texts) - self.max_inline_encodes
            reasons.append(f"{INLINE_ITEM_LIMIT}: {over} item(s) over the {self.max_inline_encodes} this request may "
                           "embed ranked without text features (upsert them with UpsertItems)")
            todo_rows, todo_texts = todo_rows[: self.max_inline_encodes], todo_texts[: self.max_inline_encodes]
            stale = int((rows[todo_rows] >= 0).sum())
        if todo_texts:
            try:
                if rt.encoder is None:
                    raise EncoderUnavailable("no encoder for this bundle")
                if stale:
                    self._encode_call(STALE_ITEM, stale)
                if len(todo_texts) > stale:
                    self._encode_call(INLINE_ITEM, len(todo_texts) - stale)
                vectors = await rt.encoder.encode(todo_texts, timeout_s=timeout_s)
            except EncoderUnavailable as e:
                reasons.append(f"{ENCODER_UNAVAILABLE}: {len(todo_texts)} item(s) without text features ({_short(e)})")
            else:
                emb[todo_rows], has[todo_rows] = vectors, True
                for text, v in zip(todo_texts, vectors):
                    self._inline.put((rt.encoder_key, text), v)
        self._hit("item_embedding", not todo_texts)  # per request: every embedding came from a cache
        return emb, has, missing

    async def sequence_scores(self, rt: BundleRuntime, user_id: str, rows: np.ndarray, t: datetime,
                              timeout_s: float | None, reasons: list[str]) -> np.ndarray:
        """`sequence_score` of each candidate (item-store rows): the bundle's sequence model after the
        user's sequence at t (`serving.ranking.sequence_scores`); NaN where it has none."""
        if rt.sequence is None:
            rt.sequence = SequenceScorer(rt.bundle.sequence, self.items, self.user_cache_size)
        try:
            history = await self.store_worker.read(self.online.sequence, user_id, t, timeout_s=timeout_s)
        except OnlineStoreError as e:
            reasons.append(f"{STORE_UNAVAILABLE}: ranked without the sequence score ({_short(e)})")
            return np.full(len(rows), np.nan)
        user, hit = rt.sequence.user_vector(user_id, history)
        self._hit("sequence_user", hit)
        return rt.sequence.scores(user, rows)

    async def _features(self, user_id: str, ids: list[str], t: datetime, interest, timeout_s: float | None,
                        inline: dict | None = None):
        """The online features at `t`, or later: events applied while this Rank awaited the encoder
        (a LogEvents, the JetStream fold) may be newer than its start, and features are defined only
        from the latest applied event on. The read is at `t` while it is after that event (the
        instant the user's history was read at: read once for both), else at now; a fold that lands
        between that and a remote store's read gets one more try."""
        for attempt in (1, 2):
            mark = self.online.watermark
            at = t if mark is None or t > mark else self.now()  # (now() is after the watermark)
            try:
                return await self.store_worker.read(self.online.features, user_id, ids, at, interest,
                                                    inline, timeout_s=timeout_s)
            except StaleQueryError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def rank(self, rt: BundleRuntime, user_id: str, candidates: Sequence[Candidate], explain: bool = False,
                   timeout_s: float | None = None, ids: list[str] | None = None) -> RankOutcome:
        """`candidates`: anything with item_id, title, description, category and brand per item
        (`Candidate`, or the request's RankCandidate messages as they came); `ids`: their item ids,
        when the caller has read them already (validation does)."""
        if ids is None:
            ids = [c.item_id for c in candidates]
        t = self.now()
        rows = self.items.rows(ids)
        reasons: list[str] = []
        missing = [ids[k] for k in np.flatnonzero(rows < 0) if not candidates[k].title.strip()]
        user = None
        interest = None
        if rt.uses_text:
            user = await self.user_embedding(rt, user_id, t, timeout_s, reasons)
            if user is not None:
                emb, _, missing = await self.item_embeddings(rt, candidates, rows, timeout_s, reasons)
                # Pairs by einsum, never BLAS gemv: gemv woke OpenBLAS's second thread on every request,
                # which then spun (about half a core on 2 cores at 200 requests/s).
                interest = interest_scores(user[None, :], emb, (0, None))
        store_failed = False
        try:
            online = await self._features(user_id, ids, t, interest, timeout_s, inline_data(candidates, rows))
        except OnlineStoreError as e:  # answer from what is known: the text feature, behavioural ones missing
            store_failed = True
            reasons.append(f"{STORE_UNAVAILABLE}: ranked without behavioural features ({_short(e)})")
            online = np.full((len(ids), len(NAMES)), np.nan)
            if interest is not None:
                online[:, NAMES.index("interest_score")] = interest
        given = None
        if rt.inputs.given:  # sequence_score: missing when the store failed above (said once)
            given = {"sequence_score": np.full(len(ids), np.nan) if store_failed
                     else await self.sequence_scores(rt, user_id, rows, t, timeout_s, reasons)}
        if self.store_rebuilding:
            reasons.append(f"{STORE_REBUILDING}: the online store lost its data and is being refilled from the "
                           "event log; behavioural features may be incomplete")
        X = rt.inputs.matrix(online, given)
        scores = rt.bundle.score(X)
        order = np.argsort(-scores, kind="stable")
        out = RankOutcome(
            item_ids=[ids[k] for k in order.tolist()], scores=scores[order], missing_ids=missing,
            cold_start_user=user is None and not reasons, degraded_reasons=reasons,
        )
        if explain:
            contrib, bias = explain_scores(rt.bundle, X[order])
            out.contributions, out.bias = contrib, bias
        return out


def _short(e: BaseException, n: int = 120) -> str:
    s = str(e).splitlines()[0] if str(e) else type(e).__name__
    return s if len(s) <= n else s[: n - 1] + "…"
