"""ranker.encoder: the one encoder fingerprint and key."""

from __future__ import annotations

import shutil

from ranker.encoder import base_model_path, encoder_fingerprint, encoder_key


def test_encoder_key_follows_content_not_path(tmp_path):
    a = tmp_path / "a"
    a.mkdir()
    (a / "config.json").write_text("{}")
    (a / "model.safetensors").write_bytes(bytes(range(256)) * 10)
    b = tmp_path / "bundle" / "encoder"
    shutil.copytree(a, b)  # a bundle's copy of the encoder shares its caches and stored embeddings
    assert encoder_key(a, 128) == encoder_key(b, 128)
    assert encoder_key(a, 128) != encoder_key(a, 64)  # the token budget changes the embeddings
    (b / "model.safetensors").write_bytes(bytes(range(256)) * 9 + bytes(reversed(range(256))))
    assert encoder_key(a, 128) != encoder_key(b, 128)
    (b / "config.json").write_text('{"hidden_size": 8}')
    assert encoder_fingerprint(b) != encoder_fingerprint(a)


def test_base_is_the_packaged_model():
    assert encoder_key("base", 128) == encoder_key(base_model_path(), 128)
    # the key state directories written since the first release are stored under (tests/fixtures/compat_v1)
    assert encoder_key("base", 128) == "2e8a342051c55cb0-L128"
