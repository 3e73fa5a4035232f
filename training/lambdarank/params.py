"""Settings of ranker training: the feature sets and the configs of both training modes.

- `VARIANTS`: `full` (every feature) and `behavioural` (no text family, so no encoder in the model);
- `LightGBMParams`: the booster's settings, shared by both modes;
- `RankerTrainConfig`: training on shown impression lists (`training.lambdarank.impression_lists`);
- `LooRankerConfig`: training on leave-one-out targets with sampled negatives
  (`training.lambdarank.leave_one_out`, groups from `training.lambdarank.negatives`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from featurizer.definitions import FAMILY, NAMES
from featurizer.errors import ConfigError
from ranker.user_tower import DEFAULT_DECAY, KINDS, UserTower
from training.lambdarank.first_stage import FIRST_STAGES, SEQUENCE_STAGES

FEATURE_CHUNK_ROWS = 250_000  # example rows featurized at once (both modes): peak memory follows it

# Feature sets: `full` is every feature, `behavioural` leaves out the text family (no encoder in the model).
VARIANTS: dict[str, tuple[str, ...]] = {
    "full": NAMES,
    "behavioural": tuple(n for n in NAMES if FAMILY[n] != "text"),
}


@dataclass(frozen=True)
class LightGBMParams:
    """The booster's settings, shared by both training modes (this one and `training.lambdarank.leave_one_out`)."""

    seed: int = 0
    num_boost_round: int = 400
    early_stopping_rounds: int = 40
    learning_rate: float = 0.05
    num_leaves: int = 31
    min_data_in_leaf: int = 50
    num_threads: int = 2
    # "local": one process; "ray": LightGBM's data-parallel mode on Ray workers, whole query groups
    # per worker (training.lambdarank.distributed); ray_address None: the running Ray, else a local one.
    engine: str = "local"
    ray_workers: int = 2
    ray_address: str | None = None

    def __post_init__(self) -> None:
        if self.engine not in ("local", "ray") or self.ray_workers < 1:
            raise ConfigError(f"engine must be local or ray and ray_workers >= 1, got {self.engine!r}, {self.ray_workers}")

    def lightgbm_params(self) -> "LightGBMParams":
        """Just these fields (a subclass config carries more)."""
        return LightGBMParams(**{f.name: getattr(self, f.name) for f in fields(LightGBMParams)})


@dataclass(frozen=True)
class TowerParams:
    """The user tower of a bundle trained without one given (`ranker.user_tower`): `tower` pooled
    or text, `history_items` None for the kind's default (10 pooled, 5 text), `tower_decay` the
    pooled tower's recency weight. A tower the encoder was fine-tuned with is passed instead
    (`training.encoder.tower.encoder_tower`)."""

    tower: str = "pooled"
    history_items: int | None = None
    tower_decay: float = DEFAULT_DECAY

    def user_tower(self) -> UserTower:
        if self.tower not in KINDS:
            raise ConfigError(f"tower must be one of {', '.join(KINDS)}, got {self.tower!r}")
        try:
            if self.tower == "text":
                return UserTower.text(self.history_items or 5)
            return UserTower.pooled(self.history_items or 10, self.tower_decay)
        except ValueError as e:
            raise ConfigError(str(e)) from e


@dataclass(frozen=True)
class RankerTrainConfig(TowerParams, LightGBMParams):
    test_days: float = 4.0
    valid_days: float = 3.0
    max_length: int = 128
    variant: str = "full"  # a key of VARIANTS
    feature_chunk_rows: int = FEATURE_CHUNK_ROWS  # rows featurized at once (whole lists)
    # "base" (pretrained MiniLM) or a directory relative to the bundle, e.g. "encoder" as
    # written there by `semrank train encoder`.
    encoder_dir: str = "base"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.feature_chunk_rows < 1:
            raise ConfigError(f"feature_chunk_rows must be >= 1, got {self.feature_chunk_rows}")


@dataclass(frozen=True)
class LooRankerConfig(TowerParams, LightGBMParams):
    variant: str = "full"
    max_users: int | None = 20_000  # None: every user with a validation target
    positions_per_user: int = 3
    recency_decay: float = 0.7  # P(position k) ∝ decay ** (last training position - k)
    negatives: int = 16  # popularity-weighted and uniform
    popularity_share: float = 0.5
    hard_negatives: int = 16  # from the first stage's top `hard_k` (0: none, and no encoder needed for them)
    hard_k: int = 200
    hard_from: str = "encoder+cooc"  # the first stage hard negatives come from: the one the ranker will re-order
    feature_chunk_rows: int = FEATURE_CHUNK_ROWS  # rows featurized at once (whole groups)
    max_length: int = 128
    encoder_dir: str = "base"  # "base" or a directory relative to the bundle
    # The bundle's sequence model (`ranker.sequence`), a directory relative to the bundle, or None. With
    # one, `sequence_score` is a feature and the training targets are the last `held_out_targets`
    # positions of seq[:-2], the items that model was trained without (its `hold_out`), so the score
    # a target gets in training is one the model never fitted, as at the test. `held_out_targets`
    # without a model takes the same targets (a control: the same groups without the feature).
    sequence_dir: str | None = None
    held_out_targets: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hard_from not in FIRST_STAGES or (self.hard_from in SEQUENCE_STAGES and self.sequence_dir is None):
            raise ConfigError(f"hard_from must be one of {', '.join(FIRST_STAGES)} (the sequence ones with a sequence "
                              f"model), got {self.hard_from!r}")
        if (self.sequence_dir is not None and self.held_out_targets < 1) or self.held_out_targets < 0:
            raise ConfigError("a sequence model needs held_out_targets >= 1: trained on every item before the "
                              "validation item, its score of the ranker's training targets would be fitted, not "
                              "predicted; train it with `semrank train sequence --hold-out 1` (got "
                              f"{self.sequence_dir!r}, {self.held_out_targets})")
        if self.variant not in VARIANTS:
            raise ConfigError(f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if self.max_users is not None and self.max_users < 1:
            raise ConfigError(f"max_users must be >= 1 (or None for all), got {self.max_users}")
        if self.positions_per_user < 1 or self.negatives < 0 or self.hard_negatives < 0:
            raise ConfigError(f"positions_per_user must be >= 1, negatives >= 0: {self}")
        self.user_tower()  # a ConfigError now rather than after the features
        if self.negatives + self.hard_negatives < 1 or self.hard_k < 1 or self.feature_chunk_rows < 1:
            raise ConfigError(f"a group needs >= 1 negative, and hard_k and feature_chunk_rows must be >= 1: {self}")
        if not 0.0 <= self.popularity_share <= 1.0 or not 0.0 < self.recency_decay <= 1.0:
            raise ConfigError(f"popularity_share must be in [0, 1] and recency_decay in (0, 1]: {self}")

    @property
    def feature_names(self) -> list[str]:
        return list(VARIANTS[self.variant]) + (["sequence_score"] if self.sequence_dir else [])

    @property
    def n_popular(self) -> int:
        return int(round(self.negatives * self.popularity_share))

    @property
    def needs_encoder(self) -> bool:
        return "interest_score" in self.feature_names or self.hard_negatives > 0
