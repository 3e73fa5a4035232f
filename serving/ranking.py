"""The request path: gather features, get embeddings, score with the bundle.

`RankingEngine` holds what one bundle needs to rank: the item catalog with its
embeddings (computed once at start-up through Triton), the online feature
snapshot and the user-embedding cache. Feature gathering and LightGBM
scoring are vectorised over all candidates of a request.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from featurizer.features import BEHAVIOURAL_FEATURES, OnlineSnapshot
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
    snapshot: OnlineSnapshot
    encode: EncodeFn
    _user_cache: dict[str, tuple[str, np.ndarray]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = self.bundle.feature_names
        constants = self.bundle.manifest.get("inference_constants", {})
        known = {"interest_score", *BEHAVIOURAL_FEATURES, *constants}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"bundle {self.bundle.version} needs features this server cannot compute: {unknown}")
        self._interest_col = names.index("interest_score") if "interest_score" in names else None
        # Column k of the behavioural block goes to column _beh_dst[k] of the model matrix.
        self._beh_src = [BEHAVIOURAL_FEATURES.index(n) for n in names if n in BEHAVIOURAL_FEATURES]
        self._beh_dst = [names.index(n) for n in names if n in BEHAVIOURAL_FEATURES]
        # Training-only context (e.g. position): every candidate gets the bundle's constant.
        self._const_cols = [names.index(n) for n in constants if n in names]
        self._const_vals = np.array([constants[n] for n in constants if n in names], dtype=np.float32)

    async def user_embedding(self, user_id: str) -> np.ndarray | None:
        """Embedding of the user's recent-history text; None for a user with no history."""
        history = self.snapshot.histories.get(user_id)
        if not history:
            return None
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
        X = np.full((len(ids), len(self.bundle.feature_names)), np.nan, dtype=np.float32)
        X[:, self._beh_dst] = self.snapshot.gather(user_id, ids)[:, self._beh_src]
        X[:, self._const_cols] = self._const_vals
        user = await self.user_embedding(user_id) if self._interest_col is not None else None
        missing: list[str] = []
        if self._interest_col is not None:
            emb, has, missing = await self.item_embeddings(candidates)
            if user is not None:
                interest = emb @ user
                interest[~has] = np.nan
                X[:, self._interest_col] = interest
        scores = self.bundle.score(X)
        order = np.argsort(-scores, kind="stable")
        return RankResult(
            item_ids=[ids[k] for k in order],
            scores=scores[order],
            missing_ids=missing,
            cold_start_user=user is None,
        )
