"""The cheap first stage of a two-stage ranking over the whole catalog, on a leave-one-out split.

`encoder` (cosine of user text and item text), `encoder+cooc` or `encoder+popularity`:
reciprocal-rank fusion (k = 60) of the encoder rank and the rank by item co-occurrence with
the user's recent items / by popularity, both counted over the part of the split before the
target. With a sequence model (`training.sequence.sasrec`, its next-item scores after the user's
history) two more: `sequence` alone, and `encoder+cooc+sequence`, the fusion of all three ranks
(issue 31 item 2). `semrank eval` re-orders its top K with LightGBM (`training.evaluation.rankers`);
`semrank train ranker` draws hard negatives from one of them (`--hard-from`, default `encoder+cooc`;
`training.lambdarank.leave_one_out`), so the ranker learns to order what it will be given.

`encoder+ease` and `encoder+ease+sequence` put EASE (`Ease`: Steck, "Embarrassingly Shallow
Autoencoders for Sparse Data", WWW 2019) where co-occurrence was: a linear item x item model solved in
closed form over the same interactions, which on Beauty's validation targets held 0.277 of them in its
top 200 against co-occurrence's 0.240 (docs/evaluation.md).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from featurizer.definitions import FeatureParams
from training.data.loo import LooSplit

log = logging.getLogger(__name__)

FIRST_STAGES = ("encoder", "encoder+cooc", "encoder+popularity", "sequence", "encoder+cooc+sequence",
                "encoder+ease", "encoder+ease+sequence")
SEQUENCE_STAGES = ("sequence", "encoder+cooc+sequence", "encoder+ease+sequence")  # these need a sequence model's scores
COOC_STAGES = ("encoder+cooc", "encoder+cooc+sequence")  # these need the co-occurrence source
EASE_STAGES = ("encoder+ease", "encoder+ease+sequence")  # these need the EASE source
EASE_LAMBDA = 500.0  # chosen on Beauty's validation targets (200: 0.272, 500: 0.277, 1000: 0.275)
EASE_MAX_ITEMS = 20_000  # the solve is dense: (items)^2 float64 and (items)^3 work; past it, the most frequent
DEFAULT_FIRST_STAGE = "encoder+cooc"
DEFAULT_RERANK_K = 200
RRF_K = 60
# The EASE stages' fusion constant, chosen on Beauty's validation targets with the fine-tuned encoder and
# the sequence model: recall@200 0.369 / 0.375 / 0.381 / 0.385 / 0.378 / 0.363 at k = 20 / 60 / 100 / 200 / 300 / 600
EASE_RRF_K = 200
COOC_ITEMS = FeatureParams().history_items  # recent items the co-occurrence first stage sums over


def ordinal_ranks(scores: np.ndarray) -> np.ndarray:
    """1-based rank of every entry of each row, best first; ties by item index (stable)."""
    order = np.argsort(-scores, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(1, scores.shape[1] + 1)[None, :], axis=1)
    return ranks


class FirstStage:
    """Cheap scores over the whole catalog; popularity and co-occurrence count the part before `target`."""

    def __init__(self, split: LooSplit, target: str = "test"):
        from scipy import sparse

        cut = 1 if target == "test" else 2
        seqs = [s[:-cut] for s in split.sequences] + list(split.train_only)
        n = len(split.item_ids)
        self.n_items = n
        self.popularity = np.bincount(np.concatenate(seqs), minlength=n).astype(np.float64) if seqs else np.zeros(n)
        rows = np.repeat(np.arange(len(seqs)), [s.size for s in seqs])
        x = sparse.csr_matrix((np.ones(rows.size), (rows, np.concatenate(seqs))), shape=(len(seqs), n))
        x.data[:] = 1.0
        c = (x.T @ x).tocsr()
        inv = 1.0 / np.sqrt(np.maximum(c.diagonal(), 1.0))
        c.setdiag(0.0)
        c.eliminate_zeros()
        self.cooc = (sparse.diags(inv) @ c @ sparse.diags(inv)).tocsr()  # cosine c_ij / sqrt(n_i n_j)
        self._seqs = seqs
        self._ease: Ease | None = None

    @property
    def ease(self) -> Ease:
        """The EASE model over the same interactions as the counts, solved at its first use."""
        if self._ease is None:
            self._ease = Ease(self._seqs, self.n_items)
        return self._ease

    def cooccurrence(self, recent: Sequence[np.ndarray]) -> np.ndarray:
        from scipy import sparse

        rows = np.repeat(np.arange(len(recent)), [r.size for r in recent])
        cols = np.concatenate(recent) if len(recent) else np.zeros(0, np.int64)
        h = sparse.csr_matrix((np.ones(rows.size), (rows, cols)), shape=(len(recent), self.n_items))
        return (h @ self.cooc).toarray()

    def sources(self, cos: np.ndarray, recent: Sequence[np.ndarray], sequence: np.ndarray | None = None,
                cooc: bool = True, ease: bool = False) -> dict[str, np.ndarray]:
        """Each single source over the catalog, (batch, n_items) float64: `encoder` (`cos`, its NaN rows,
        no history, as 0), `cooc` (co-occurrence with `recent`; left out when `cooc` is False), `ease`
        (EASE's scores of `recent`, when `ease` is True) and `sequence` (a sequence model's scores after
        each user's history) when given."""
        out = {"encoder": np.nan_to_num(cos.astype(np.float64), nan=0.0)}
        if cooc:
            out["cooc"] = self.cooccurrence(recent)
        if ease:
            out["ease"] = self.ease.scores(recent)
        if sequence is not None:
            out["sequence"] = sequence.astype(np.float64)
        return out

    def scores(self, kinds: Sequence[str], cos: np.ndarray, recent: Sequence[np.ndarray],
               sequence: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """kind -> (batch, n_items) float64; `cos` NaN rows (no history) count as 0. `sequence`: a
        sequence model's (batch, n_items) scores after each user's history, for `SEQUENCE_STAGES`."""
        unknown = [k for k in kinds if k not in FIRST_STAGES]
        if unknown:
            raise ValueError(f"unknown first stage {unknown[0]!r}; choose from {', '.join(FIRST_STAGES)}")
        if sequence is None and set(kinds) & set(SEQUENCE_STAGES):
            raise ValueError(f"first stages {', '.join(SEQUENCE_STAGES)} need a sequence model's scores")
        return self.fuse(kinds, self.sources(cos, recent, sequence, cooc=bool(set(kinds) & set(COOC_STAGES)),
                                             ease=bool(set(kinds) & set(EASE_STAGES))))

    def fuse(self, kinds: Sequence[str], sources: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """kind -> the first stage's (batch, n_items) scores from `FirstStage.sources`' single sources."""
        enc = sources["encoder"]
        out = {}
        ranks = {}  # source -> its ordinal ranks, computed once for every stage that fuses it

        def reciprocal(source: str, k: int) -> np.ndarray:
            if source not in ranks:
                ranks[source] = ordinal_ranks(sources[source])
            if source in ("encoder", "sequence"):
                return 1.0 / (k + ranks[source])
            return rrf(sources[source], k, ranks[source])  # count-like: 0 is none

        for kind in kinds:
            if kind == "encoder":
                out[kind] = enc
            elif kind == "sequence":
                out[kind] = sources["sequence"]
            elif kind == "encoder+popularity":
                out[kind] = reciprocal("encoder", RRF_K) + rrf(np.broadcast_to(self.popularity, enc.shape))
            else:  # encoder+cooc, encoder+ease and each + sequence
                other, k = ("ease", EASE_RRF_K) if kind in EASE_STAGES else ("cooc", RRF_K)
                out[kind] = reciprocal("encoder", k) + reciprocal(other, k)
                if kind in SEQUENCE_STAGES:
                    out[kind] = out[kind] + reciprocal("sequence", k)
        return out


class Ease:
    """EASE (Steck, WWW 2019): item x item weights B = I - P diag(1 / diag P), P = (X'X + λI)^-1,
    with a zero diagonal, X the binary user x item matrix; a history's score of item j is the sum of
    its items' B[i, j]. Solved once, in closed form (a Cholesky inverse), over the items seen in
    `seqs`, at most `max_items` of them (the most frequent; the others score 0). The solve takes
    (items)^3 work and holds one (items)^2 float64 array, factored and inverted in place, then the
    float32 weights: 1.7 GB and 51 s on one thread for Beauty's 12,053 items; 4.8 GB at 20,000."""

    def __init__(self, seqs: Sequence[np.ndarray], n_items: int, lam: float = EASE_LAMBDA,
                 max_items: int = EASE_MAX_ITEMS):
        from scipy import sparse
        from scipy.linalg import lapack

        if lam <= 0 or max_items < 1:
            raise ValueError(f"EASE needs lambda > 0 and max_items >= 1, got {lam}, {max_items}")
        self.n_items, self.lam = n_items, lam
        flat = np.concatenate(seqs) if len(seqs) else np.zeros(0, np.int64)
        counts = np.bincount(flat, minlength=n_items)
        kept = np.flatnonzero(counts)
        if kept.size > max_items:
            kept = np.sort(np.argsort(-counts, kind="stable")[:max_items])
        self.items = kept  # catalog rows of B's rows and columns
        self.column = np.full(n_items, -1, dtype=np.int64)
        self.column[kept] = np.arange(kept.size)
        t0 = time.perf_counter()
        rows = np.repeat(np.arange(len(seqs)), [s.size for s in seqs])
        cols = self.column[flat]
        keep = cols >= 0
        x = sparse.csr_matrix((np.ones(int(keep.sum())), (rows[keep], cols[keep])), shape=(len(seqs), kept.size))
        x.data[:] = 1.0  # an item twice in one sequence counts once
        g = (x.T @ x).toarray()
        g[np.diag_indices_from(g)] += lam
        if kept.size:
            # g is symmetric: its transpose is the same matrix in Fortran order, which LAPACK factors and
            # inverts in place (no copy of the (items)^2 array)
            c, info = lapack.dpotrf(g.T, lower=False, overwrite_a=True)
            if info == 0:
                c, info = lapack.dpotri(c, lower=False, overwrite_c=True)
            if info != 0:
                raise np.linalg.LinAlgError(f"EASE: the Gram matrix + {lam} I is not positive definite (LAPACK info {info})")
            g = _symmetric_from_lower(c.T)  # potri filled c's upper triangle: the lower one of its transpose
        g /= -np.diag(g).copy()[None, :]  # B = -P / diag(P) off the diagonal (I - P diag(1/diag P))
        g[np.diag_indices_from(g)] = 0.0
        self.weights = g.astype(np.float32)
        log.info("EASE: %d of %d items, lambda %g, solved in %.1f s", kept.size, n_items, lam, time.perf_counter() - t0)

    def scores(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        """(len(histories), n_items) float64: each history's items' rows of B summed (each item once)."""
        from scipy import sparse

        out = np.zeros((len(histories), self.n_items))
        cols = [self.column[h] for h in histories]
        rows = [np.unique(c[c >= 0]) for c in cols]
        r = np.repeat(np.arange(len(rows)), [x.size for x in rows])
        if r.size:
            h = sparse.csr_matrix((np.ones(r.size, np.float32), (r, np.concatenate(rows))), shape=(len(rows), self.items.size))
            out[:, self.items] = h @ self.weights
        return out


def _symmetric_from_lower(a: np.ndarray, block: int = 1024) -> np.ndarray:
    """Copy the lower triangle of the square `a` onto its upper one, in place, a block of rows at a
    time (no temporaries of `a`'s size)."""
    n = a.shape[0]
    for b in range(0, n, block):
        e = min(n, b + block)
        a[b:e, e:] = a[e:, b:e].T
        d = a[b:e, b:e]
        iu = np.triu_indices(e - b, 1)
        d[iu] = d.T[iu]
    return a


def rrf(other: np.ndarray, k: int = RRF_K, ranks: np.ndarray | None = None) -> np.ndarray:
    """Reciprocal ranks (1 / (k + rank)) of a count-like score; items it gives nothing (<= 0) get
    nothing. `ranks`: `ordinal_ranks(other)` when the caller has them."""
    return np.where(other > 0, 1.0 / (k + (ordinal_ranks(other) if ranks is None else ranks)), 0.0)


def top_k(scores: np.ndarray, masked: Sequence[np.ndarray], k: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Scores with the masked items at -inf, and per row the best min(k, unmasked) items."""
    s = scores.copy()
    for r, m in enumerate(masked):
        s[r, m] = -np.inf
    out = []
    for r in range(s.shape[0]):
        kk = min(k, int(np.isfinite(s[r]).sum()))
        out.append(np.argpartition(-s[r], kk - 1)[:kk] if kk else np.zeros(0, np.int64))
    return s, out


class SourceUnion:
    """How much of the targets the single sources hold at all, counted over batches of users (`add`):
    the recall@K of each source alone, of the union of their top K lists (up to n·K items per user),
    and of the union of their top ⌈K/n⌉ lists (at most K items: a list of the stage's own size that
    gives each source an equal share). Neither union bounds a rank fusion exactly, but a fused stage
    near the second union and far below the first is limited by its sources more than by how it
    weighs them (issue 31: tuned weights moved Beauty's 0.326 by +0.008)."""

    def __init__(self, k: int):
        self.k = k
        self.users = 0
        self.hits: dict[str, int] = {}
        self.union = {"hits": 0, "items": 0}
        self.union_short = {"hits": 0, "items": 0, "depth": 0}

    def add(self, sources: dict[str, np.ndarray], masked: Sequence[np.ndarray],
            targets: np.ndarray) -> dict[str, tuple[np.ndarray, list[np.ndarray]]]:
        """Count one batch; returns each source's `top_k(scores, masked, k)`, for a caller that also
        ranks by a source alone (the `encoder` and `sequence` stages)."""
        depth = -(-self.k // len(sources))
        full: list[list[np.ndarray]] = [[] for _ in targets]
        short: list[list[np.ndarray]] = [[] for _ in targets]
        out = {}
        for name, scores in sources.items():
            s, tops = out[name] = top_k(scores, masked, self.k)
            self.hits[name] = self.hits.get(name, 0) + sum(int(t in top) for t, top in zip(targets, tops))
            for r, top in enumerate(tops):
                full[r].append(top)
                short[r].append(top[np.argsort(-s[r, top], kind="stable")[:depth]])
        for r, t in enumerate(targets):
            u, v = np.unique(np.concatenate(full[r])), np.unique(np.concatenate(short[r]))
            self.union["hits"] += int(t in u)
            self.union["items"] += u.size
            self.union_short["hits"] += int(t in v)
            self.union_short["items"] += v.size
        self.union_short["depth"] = depth
        self.users += len(targets)
        return out

    def report(self) -> dict[str, Any]:
        n = max(self.users, 1)
        return {"k": self.k, "users": self.users,
                "recall_by_source": {name: round(h / n, 4) for name, h in self.hits.items()},
                "unions": [{"depth": d, "recall": round(u["hits"] / n, 4), "mean_items": round(u["items"] / n, 1)}
                           for d, u in ((self.k, self.union), (self.union_short["depth"], self.union_short))]}
