"""Models for the offline leave-one-out evaluation (`training.evaluation.protocol`).

A model is anything with a `name`, a one-line `description` and
`score(histories) -> (batch, n_items)`: given a batch of users, each an array
of item indices (oldest first, the test target never included), it returns a
score for every catalog item. The protocol code then gathers the candidates
(sampled-100) or masks the history (full). Higher is better; NaN counts as -inf.

- `PopularityScorer`: interaction counts of the training part only.
- `EncoderScorer`: cosine between the user vector (a user tower,
  `ranker.user_tower`: pooled item vectors or the history text) and every
  item text's vector, from one text encoder (pretrained or fine-tuned). Item
  embeddings are computed once and cached on disk as .npy.
- `TrueInterestScorer` (synthetic shop only): the generative model's true
  interest of the user in every item on the test item's day. It needs to know
  the user, so it implements `score_users(users, histories)`, which
  `evaluate` prefers when a model has it.

LightGBM bundles do not fit the (batch, n_items) interface (too slow over a
whole catalog); `training.evaluation.rankers` scores them on candidates only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from ranker.bundle import MANIFEST, EncoderRef
from ranker.encoder import Encoder, encode_in_chunks, encoder_key
from ranker.interest import interest_scores
from ranker.user_tower import UserTower, user_vectors

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 128
ITEM_ENCODE_CHUNK = 256


@runtime_checkable
class CatalogScorer(Protocol):
    """An evaluated model: scores every catalog item for each user history (full ranking)."""

    name: str
    description: str

    def score(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        """(len(histories), n_items) scores; row k is user k's score for every catalog item."""
        ...


# --------------------------------------------------------------------------- popularity


class PopularityScorer:
    """Every user gets the same scores: the item's interaction count in the training part."""

    def __init__(self, train_item_counts: np.ndarray, name: str = "popularity"):
        self.name = name
        self.counts = np.asarray(train_item_counts, dtype=np.float32)
        self.description = (
            f"{name}: interaction counts per item over the training part only (every sequence without "
            "its test item; LooSplit.train_item_counts), so no test target contributes to its own count"
        )

    def score(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        return np.broadcast_to(self.counts, (len(histories), self.counts.size))


# --------------------------------------------------------------------------- ground truth


class TrueInterestScorer:
    """The synthetic shop's ground truth as a model: `Truth.interest(user, item, day of the test item)`.

    A reference, not a strict ceiling: which item a user clicks next also depends on what the
    logging policy showed and at which position, which a model of the logs can pick up."""

    def __init__(self, truth_dir_parent: str | Path, split, test_times_us: np.ndarray, name: str = "oracle-true-interest"):
        from training.data.synth import DAY_MS, load_truth

        truth, users, items = load_truth(truth_dir_parent)
        user_index = {u: k for k, u in enumerate(users["user_id"].to_list())}
        item_index = {i: k for k, i in enumerate(items["item_id"].to_list())}
        missing = [i for i in split.item_ids if i not in item_index][:3] + [u for u in split.users if u not in user_index][:3]
        if missing:
            raise ValueError(f"{truth_dir_parent}: the truth/ tables do not name {missing}; not the shop these events came from")
        self.truth = truth
        self.items = np.array([item_index[i] for i in split.item_ids], dtype=np.int64)
        self.users = np.array([user_index[u] for u in split.users], dtype=np.int64)
        self.days = (np.asarray(test_times_us, dtype=np.int64) // 1000 - truth.start_ms) // DAY_MS
        self.name = name
        self.description = (f"{name}: the synthetic shop's true interest (truth/, `Truth.interest`) of the user in "
                            "every item on the test item's day; clicks also depend on what was shown, so this is a "
                            "reference point rather than a strict upper bound")

    def score_users(self, users: np.ndarray, histories: Sequence[np.ndarray]) -> np.ndarray:
        """(len(users), n_items); `users` index `split.users`."""
        u = self.users[np.asarray(users, dtype=np.int64)]
        return self.truth.interest(u[:, None], self.items[None, :], self.days[np.asarray(users)][:, None]).astype(np.float32)

    def score(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        raise TypeError(f"{self.name} scores users, not histories; call score_users")


# --------------------------------------------------------------------------- text encoders


@dataclass(frozen=True)
class EncoderSpec:
    """Which encoder to load and the user tower it is scored with."""

    name: str
    model_dir: str  # "base" or a directory with config.json
    max_length: int = DEFAULT_MAX_LENGTH
    tower: UserTower = field(default_factory=UserTower.pooled)
    source: str = "base"  # what the user gave (a repo-relative path or "base"), for the report


def parse_named_path(arg: str, flag: str, example: str, what: str = "DIR") -> tuple[str, Path]:
    """`NAME=PATH` of a repeatable model flag (`--encoder`, `--ranker`, `--sequence`) -> (NAME, PATH)."""
    name, sep, path = arg.partition("=")
    name, path = name.strip(), path.strip()
    if not sep or not name or not path:
        raise ValueError(f"{flag} expects NAME={what} (e.g. {example}), got {arg!r}")
    return name, Path(path)


def parse_encoder_arg(arg: str) -> tuple[str, Path]:
    """`NAME=DIR` -> (NAME, DIR)."""
    return parse_named_path(arg, "--encoder", "encoder-finetuned=runs/beauty/bundle/encoder")


def resolve_encoder_spec(name: str, path: str | Path, tower: UserTower | None = None,
                         max_length: int = DEFAULT_MAX_LENGTH) -> EncoderSpec:
    """A transformers model directory, or a bundle directory whose manifest names its encoder.

    A bundle's own `max_length` and user tower are used, since that is how its encoder is served;
    a plain model directory gets the tower it was fine-tuned with (`encoder_tower`), else `tower`
    (None: the pooled default), and the given `max_length`.
    """
    from training.encoder.tower import encoder_tower

    path = Path(path)
    manifest = path / MANIFEST
    if manifest.is_file():
        try:
            data = json.loads(manifest.read_text())
            entry = data["encoder"]
            known = {f.name for f in dataclasses.fields(EncoderRef)}
            ref = EncoderRef(**{k: v for k, v in entry.items() if k in known})
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{manifest}: no usable 'encoder' entry ({e}); expected a semrank bundle manifest") from e
        model_dir = ref.resolve(path)
        if model_dir != "base" and not (Path(model_dir) / "config.json").is_file():
            raise FileNotFoundError(
                f"{manifest}: encoder.model_dir {ref.model_dir!r} resolves to {model_dir}, which has no config.json"
            )
        return EncoderSpec(name, model_dir, ref.max_length, UserTower.from_manifest(data, path), source=display_path(path))
    if (path / "config.json").is_file():
        own = encoder_tower(path)
        return EncoderSpec(name, str(path), max_length, own or tower or UserTower.pooled(), source=display_path(path))
    raise FileNotFoundError(
        f"--encoder {name}={path}: neither a bundle ({MANIFEST}) nor a transformers model directory (config.json)"
    )


def display_path(path: str | Path) -> str:
    """The path relative to the working directory when it lies below it (reports carry no machine paths)."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def embedding_cache_path(cache_dir: str | Path, dataset: str, spec: EncoderSpec, model_key: str,
                         item_texts: Sequence[str]) -> Path:
    """`CACHE/<dataset>__<model>__<hash>.npy`; the hash covers the encoder key (`ranker.encoder.encoder_key`: weights
    and max_length) and the item texts."""
    h = hashlib.sha256()
    h.update(f"{model_key}\n{spec.max_length}\n{len(item_texts)}\n".encode())
    for t in item_texts:
        h.update(t.encode())
        h.update(b"\x00")
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{dataset}__{spec.name}")
    return Path(cache_dir) / f"{safe}__{h.hexdigest()[:16]}.npy"


def cached_item_embeddings(encoder: Encoder, item_texts: Sequence[str], cache_path: Path | None,
                           progress: bool = True, desc: str = "item texts") -> np.ndarray:
    """Load `cache_path` if it holds (len(item_texts), dim) float32, else encode and save it there."""
    if cache_path is not None and cache_path.is_file():
        emb = np.load(cache_path, allow_pickle=False)
        if emb.ndim == 2 and emb.shape[0] == len(item_texts) and emb.dtype == np.float32:
            log.info("%s: embeddings from cache %s", desc, cache_path)
            return emb
        log.warning("ignoring cache %s: shape %s / dtype %s do not match %d texts", cache_path, emb.shape,
                    emb.dtype, len(item_texts))
    log.info("encoding %d %s", len(item_texts), desc)
    emb = encode_in_chunks(encoder, item_texts, desc, ITEM_ENCODE_CHUNK, progress)
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_suffix(".tmp.npy")
        np.save(tmp, emb, allow_pickle=False)
        tmp.replace(cache_path)
    return emb


class EncoderScorer:
    """score = cosine(user vector by `tower`, item text's vector) = dot product of unit vectors."""

    def __init__(self, name: str, encoder: Encoder, item_embeddings: np.ndarray, titles: Sequence[str],
                 tower: UserTower | None = None, description: str = ""):
        if item_embeddings.shape[0] != len(titles):
            raise ValueError(f"{name}: {item_embeddings.shape[0]} item embeddings for {len(titles)} catalog items")
        self.name = name
        self.encoder = encoder
        self.item_embeddings = np.ascontiguousarray(item_embeddings, dtype=np.float32)
        self.titles = list(titles)
        self.tower = tower or UserTower.pooled()
        self.description = description or f"{name}: cosine of the user vector ({self.tower.describe()}) and the item text's"

    def user_vectors(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        """The tower's user vectors of histories given oldest first (the protocol's order)."""
        return user_vectors(self.tower, [np.asarray(h)[::-1] for h in histories], self.item_embeddings, self.titles,
                            self.encoder.encode)

    def score(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        return interest_scores(self.user_vectors(histories), self.item_embeddings)


def load_encoder_scorer(spec: EncoderSpec, item_texts: Sequence[str], titles: Sequence[str], dataset: str,
                        cache_dir: str | Path | None, progress: bool = True,
                        encoder_factory: Callable[[EncoderSpec], Encoder] | None = None,
                        loaded: dict[tuple[str, int], EncoderScorer] | None = None) -> EncoderScorer:
    """Load the encoder, get (cached) item embeddings, return the scorer. `loaded` (kept by the
    caller) shares one encoder and its item embeddings among specs that differ only in the tower;
    the pretrained model's embeddings are cached under the name "encoder-frozen" whatever the
    model is called, so `semrank train ranker --embedding-cache` and the evaluation share them."""
    from ranker.encoder import TextEncoder

    what = "pretrained all-MiniLM-L6-v2" if spec.model_dir == "base" else f"encoder from {spec.source}"
    description = (
        f"{spec.name}: {what}; user side = {spec.tower.describe()}; item text = item_text_expr; score = cosine; "
        f"max_length {spec.max_length}"
    )
    same = None if loaded is None else loaded.get((spec.model_dir, spec.max_length))
    if same is not None:
        return EncoderScorer(spec.name, same.encoder, same.item_embeddings, titles, spec.tower, description)
    if encoder_factory is None:
        def encoder_factory(s: EncoderSpec) -> Encoder:
            return TextEncoder(s.model_dir, max_length=s.max_length)

    encoder = encoder_factory(spec)
    cache = None
    if cache_dir is not None:
        named = dataclasses.replace(spec, name="encoder-frozen") if spec.model_dir == "base" else spec
        cache = embedding_cache_path(cache_dir, dataset, named, encoder_key(spec.model_dir, spec.max_length),
                                     item_texts)
    emb = cached_item_embeddings(encoder, item_texts, cache, progress=progress, desc=f"{spec.name} items")
    scorer = EncoderScorer(spec.name, encoder, emb, titles, spec.tower, description)
    if loaded is not None:
        loaded[(spec.model_dir, spec.max_length)] = scorer
    return scorer
