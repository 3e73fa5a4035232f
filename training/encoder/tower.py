"""The user tower an encoder was fine-tuned with, recorded beside its weights.

`semrank train encoder` trains the item tower through a user tower (`ranker.user_tower`) and
writes it into the encoder directory: `training.json` "user_tower" (the manifest entry) and,
for a pooled tower, `user_tower.safetensors`. `encoder_tower(dir)` reads it back, so a ranker
trained on that encoder, and an evaluation of it, use the tower it was trained with.
"""

from __future__ import annotations

import json
from pathlib import Path

from ranker.user_tower import UserTower

TRAINING_JSON = "training.json"


def encoder_tower(encoder_dir: str | Path) -> UserTower | None:
    """The tower recorded in `encoder_dir` (None: none recorded, e.g. the pretrained model or an
    encoder fine-tuned before towers were recorded, which trained the text tower)."""
    if str(encoder_dir) == "base":
        return None
    path = Path(encoder_dir) / TRAINING_JSON
    if not path.is_file():
        return None
    entry = json.loads(path.read_text()).get("user_tower")
    if entry is None:
        return None
    return UserTower.from_manifest({"user_tower": entry}, encoder_dir)


def record_tower(encoder_dir: str | Path, tower: UserTower) -> dict:
    """Write the tower's weights into `encoder_dir`; returns the entry for training.json."""
    return tower.save(encoder_dir)
