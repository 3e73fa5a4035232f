"""Two trained bundles as the rankers of the interleaving simulation (issue 17 item 6).

    orders = bundle_orders(shop, pop, [bundle_a, bundle_b])   # per bundle: exposures x K columns, best first

Each bundle re-orders every logged list of the synthetic shop by its own scores: the features of
`featurizer.definitions` at the list's time from the events strictly before it (the offline
features training used, equal to the served ones by the parity tests), the interest score from the
bundle's own encoder and user tower, the bundle's columns and constants (`ranker.feature_matrix`),
and its trees. Only lists after both bundles' training data are used (`held_out_exposures`): a bundle
never ranks a list it was fitted or early-stopped on.
"""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl

from featurizer.contracts.schema import read_dataset
from featurizer.offline.pipeline import offline_features
from ranker.bundle import Bundle
from ranker.encoder import TextEncoder
from ranker.feature_matrix import BundleInputs
from training.ab.simulation import Population
from training.lambdarank.impression_lists import impression_lists, list_interest_scores

log = logging.getLogger(__name__)


def held_out_start(bundle: Bundle) -> datetime:
    """The first instant of the bundle's held-out test lists (its manifest's training split)."""
    split = bundle.manifest.get("training_data", {}).get("split", {})
    if "test" not in split:
        raise ValueError(f"{bundle.path}: the manifest records no test split; train it with `semrank train ranker` "
                         "on impression lists")
    return datetime.fromisoformat(split["test"][0])


def restrict(pop: Population, keep: np.ndarray) -> Population:
    """The population of the exposures where `keep` holds, users without one dropped (re-indexed)."""
    rows = np.flatnonzero(keep)
    users, user = np.unique(pop.exposure_user[rows], return_inverse=True)
    return Population(
        user_ids=[pop.user_ids[u] for u in users], items=pop.items, exposure_user=user.astype(np.int64),
        exposure_ts_ms=pop.exposure_ts_ms[rows], request_ids=[pop.request_ids[r] for r in rows],
        shown=pop.shown[rows], p_click=pop.p_click[rows], p_cart=pop.p_cart[rows], p_purchase=pop.p_purchase[rows])


def held_out_exposures(pop: Population, bundles: list[Bundle]) -> Population:
    """The exposures from the latest of the bundles' test starts on."""
    start = max(held_out_start(b) for b in bundles)
    return restrict(pop, pop.exposure_ts_ms >= int(start.timestamp() * 1000))


def bundle_scores(shop: str | Path, pop: Population, bundles: list[Bundle]) -> list[np.ndarray]:
    """Each bundle's score of every shown item of `pop` (exposures x K, in the shown columns)."""
    ds = read_dataset(shop)
    rows = impression_lists(ds.events).filter(pl.col("request_id").is_in(pl.Series(pop.request_ids).implode()))
    log.info("offline features of %d shown items in %d lists", rows.height, len(pop.request_ids))
    feats = offline_features(ds.events.lazy(), ds.items.lazy(), rows.lazy()).collect()
    exposure = {r: e for e, r in enumerate(pop.request_ids)}
    column = {(e, int(i)): k for e, row in enumerate(pop.shown) for k, i in enumerate(row)}
    item_row = {i: k for k, i in enumerate(pop.items["item_id"].to_list())}
    e_idx = np.fromiter((exposure[r] for r in feats["request_id"].to_list()), dtype=np.int64, count=feats.height)
    k_idx = np.fromiter((column[(e, item_row[i])] for e, i in zip(e_idx, feats["item_id"].to_list())),
                        dtype=np.int64, count=feats.height)
    out = []
    for bundle in bundles:
        inputs = BundleInputs.of(bundle)
        frame = feats
        if "interest_score" in bundle.feature_names:  # its own encoder and tower
            encoder = TextEncoder(bundle.encoder.resolve(bundle.path), max_length=bundle.encoder.max_length)
            interest = list_interest_scores(encoder, ds.items, feats, ds.events, inputs)
            frame = feats.with_columns(pl.Series("interest_score", interest))
        scores = np.full(pop.shown.shape, np.nan)
        scores[e_idx, k_idx] = bundle.score(inputs.frame_matrix(frame))
        if np.isnan(scores).any():
            raise ValueError(f"{bundle.path}: {int(np.isnan(scores).sum())} shown items got no features")
        out.append(scores)
    return out


def bundle_orders(shop: str | Path, pop: Population, bundles: list[Bundle]) -> list[np.ndarray]:
    """Each bundle's order of every list (columns, best first; ties by the shown column)."""
    return [np.argsort(-s, axis=1, kind="stable") for s in bundle_scores(shop, pop, bundles)]

