"""The request path: gather features, get embeddings, score with the bundle.

`RankingEngine` holds what one bundle needs to rank: the item catalog with its
embeddings (computed once at start-up through Triton), the online features
(`featurizer.online_features`, the same definitions as training) and the
user-embedding cache. Feature gathering and LightGBM scoring are vectorised
over all candidates of a request.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import numpy as np
import polars as pl

from featurizer.definitions import NAMES
from featurizer.online_features import OnlineFeatures
from featurizer.text import history_text, item_text, item_text_expr
from ranker.bundle import Bundle

log = logging.getLogger(__name__)

EncodeFn = Callable[[list[str]], Awaitable[np.ndarray]]


@dataclass(frozen=True)
class Candidate:
    item_id: str
    title: str = ""
    description: str = ""
    category: str = ""
    brand: str = ""
    price: float | None = None

    def inline_text(self) -> str | None:
        if not self.title.strip():
            return None
        return item_text(self.title, self.category or None, self.brand or None, self.description or None)


@dataclass
class RankResult:
    item_ids: list[str]
    scores: np.ndarray
    missing_ids: list[str]
    cold_start_user: bool


@dataclass
class Catalog:
    item_ids: list[str]
    index: dict[str, int]
    titles: list[str]
    embeddings: np.ndarray  # (n_items, dim), unit rows

    @classmethod
    async def build(cls, items: pl.DataFrame, encode: EncodeFn) -> Catalog:
        texts = items.select("item_id", "title", item_text_expr())
        ids = texts["item_id"].to_list()
        emb = await encode(texts["item_text"].to_list())
        return cls(item_ids=ids, index={i: k for k, i in enumerate(ids)}, titles=texts["title"].to_list(), embeddings=emb)

    def title(self, item_id: str) -> str | None:
        k = self.index.get(item_id)
        return None if k is None else self.titles[k]


@dataclass
class RankingEngine:
    bundle: Bundle
    catalog: Catalog
    online: OnlineFeatures
    encode: EncodeFn
    _user_cache: dict[str, tuple[str, np.ndarray]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = self.bundle.feature_names
        constants = self.bundle.manifest.get("inference_constants", {})
        unknown = [n for n in names if n not in NAMES and n not in constants]
        if unknown:
            raise ValueError(f"bundle {self.bundle.version} needs features this server cannot compute: {unknown}")
        self._uses_text = "interest_score" in names
        # Model column k takes online column _src[k]; training-only context gets the bundle's constant.
        self._dst = [k for k, n in enumerate(names) if n in NAMES]
        self._src = [NAMES.index(names[k]) for k in self._dst]
        self._const_cols = [names.index(n) for n in constants if n in names]
        self._const_vals = np.array([constants[n] for n in constants if n in names], dtype=np.float32)

    def now(self) -> datetime:
        """Features are read strictly before this instant (never before the latest applied event)."""
        now = datetime.now(timezone.utc)
        mark = self.online.watermark
        return now if mark is None or now > mark else mark + timedelta(microseconds=1)

    async def user_embedding(self, user_id: str, t: datetime) -> np.ndarray | None:
        """Embedding of the user's recent-history text; None for a user with no history."""
        history = self.online.history(user_id, t, self.bundle.encoder.history_items)
        text = history_text([t for t in map(self.catalog.title, history) if t], self.bundle.encoder.history_items)
        if not text:
            return None
        cached = self._user_cache.get(user_id)
        if cached and cached[0] == text:
            return cached[1]
        emb = (await self.encode([text]))[0]
        self._user_cache[user_id] = (text, emb)
        return emb

    async def item_embeddings(self, candidates: list[Candidate]) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(embeddings, has_embedding mask, ids with no catalog entry and no inline text)."""
        n = len(candidates)
        idx = np.fromiter((self.catalog.index.get(c.item_id, -1) for c in candidates), dtype=np.int64, count=n)
        emb = np.zeros((n, self.catalog.embeddings.shape[1]), dtype=np.float32)
        known = idx >= 0
        emb[known] = self.catalog.embeddings[idx[known]]
        has = known.copy()
        missing: list[str] = []
        new_rows, new_texts = [], []
        for k in np.flatnonzero(~known):
            text = candidates[k].inline_text()
            if text is None:
                missing.append(candidates[k].item_id)
            else:
                new_rows.append(k)
                new_texts.append(text)
        if new_texts:
            emb[new_rows] = await self.encode(new_texts)
            has[new_rows] = True
        return emb, has, missing

    async def rank(self, user_id: str, candidates: list[Candidate]) -> RankResult:
        ids = [c.item_id for c in candidates]
        t = self.now()
        user = await self.user_embedding(user_id, t) if self._uses_text else None
        missing: list[str] = []
        interest = None
        if self._uses_text:
            emb, has, missing = await self.item_embeddings(candidates)
            if user is not None:
                interest = (emb @ user).astype(np.float64)
                interest[~has] = np.nan
        online = self.online.features(user_id, ids, t, interest_score=interest)
        X = np.empty((len(ids), len(self.bundle.feature_names)), dtype=np.float32)
        X[:, self._dst] = online[:, self._src]
        X[:, self._const_cols] = self._const_vals
        scores = self.bundle.score(X)
        order = np.argsort(-scores, kind="stable")
        return RankResult(
            item_ids=[ids[k] for k in order],
            scores=scores[order],
            missing_ids=missing,
            cold_start_user=user is None,
        )
