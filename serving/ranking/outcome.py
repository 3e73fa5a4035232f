"""What a Rank takes and gives, apart from how it is computed (`serving.ranking.engine`): the
candidates as given (`Candidate`, or the wire's RankCandidate as it came) with their inline data,
the outcome (the order, the scores, and why it is degraded, by code), and why a Rank called the
encoder, by cause."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from featurizer.text import item_text


@dataclass(frozen=True)
class Candidate:
    item_id: str
    title: str = ""
    description: str = ""
    category: str = ""
    brand: str = ""
    price: float | None = None

    def inline_text(self) -> str | None:
        return inline_text(self)


def inline_data(candidates, rows: np.ndarray) -> dict | None:
    """The inline price, category and brand of the candidates the item store does not know (rows < 0),
    one entry per candidate, for their price and affinity features; None when none carries any."""
    unknown = np.flatnonzero(rows < 0)
    if not unknown.size:
        return None
    n = len(rows)
    price = np.full(n, np.nan)
    category: list[str | None] = [None] * n
    brand: list[str | None] = [None] * n
    for k in unknown.tolist():
        c = candidates[k]
        has_price = c.HasField("price") if hasattr(c, "HasField") else c.price is not None
        if has_price:
            price[k] = c.price
        category[k], brand[k] = c.category or None, c.brand or None
    if np.isnan(price).all() and not any(category) and not any(brand):
        return None
    return {"price": price, "category": category, "brand": brand}


def inline_text(c) -> str | None:
    """The item text of a candidate's inline fields (a `Candidate`, or the wire's RankCandidate,
    which the Rank handler passes as it is: no object per candidate), None without a title."""
    if not c.title.strip():
        return None
    return item_text(c.title, c.category or None, c.brand or None, c.description or None)


@dataclass
class RankOutcome:
    item_ids: list[str]  # best first
    scores: np.ndarray
    missing_ids: list[str]
    cold_start_user: bool
    degraded_reasons: list[str] = field(default_factory=list)
    contributions: np.ndarray | None = None  # (n, len(FAMILIES)) in item_ids order, with explain
    bias: np.ndarray | None = None

    @property
    def degraded(self) -> bool:
        return bool(self.degraded_reasons)


# Why an answer is degraded: each reason starts with one of these codes and a colon (then free
# text for people); metrics label by the code, so their label values stay a small fixed set.
ENCODER_UNAVAILABLE = "encoder_unavailable"
INLINE_ITEM_LIMIT = "inline_item_limit"
STORE_UNAVAILABLE = "online_store_unavailable"
STORE_REBUILDING = "online_store_rebuilding"
STALE_FEATURES = "stale_features"  # a Rank's min_sequence was not applied within its wait
DEGRADED_CODES = (ENCODER_UNAVAILABLE, INLINE_ITEM_LIMIT, STORE_UNAVAILABLE, STORE_REBUILDING, STALE_FEATURES)


# Why a Rank calls the encoder (the label of semrank_rank_encoder_calls_total). With a pooled user
# tower only the item causes remain, and only for text the item store has no current vector of.
USER_TEXT = "user_text"  # a text tower's user side, after the user's history changed
INLINE_ITEM = "inline_item"  # an inline candidate the item store does not know
STALE_ITEM = "stale_item"  # a known item whose text changed and is not re-embedded yet
ENCODE_CAUSES = (USER_TEXT, INLINE_ITEM, STALE_ITEM)


def degraded_code(reason: str) -> str:
    """The code a degraded reason starts with ("other" for one that does not)."""
    code = reason.split(":", 1)[0]
    return code if code in DEGRADED_CODES else "other"


def holdout(candidates: list[Candidate]) -> RankOutcome:
    """A holdout variant's answer: the caller's order, unscored."""
    ids = [c.item_id for c in candidates]
    return RankOutcome(item_ids=ids, scores=np.zeros(len(ids)), missing_ids=[], cold_start_user=False)
