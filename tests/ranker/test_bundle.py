import json

import lightgbm as lgb
import numpy as np
import pytest

from ranker.bundle import BundleError, EncoderRef, load_bundle, save_bundle

FEATURES = ["interest_score", "item_clicks_7d"]


@pytest.fixture(scope="module")
def booster():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 2)).astype(np.float32)
    y = (X[:, 0] > 0).astype(int)
    ds = lgb.Dataset(X, label=y, group=[20] * 10, feature_name=FEATURES)
    return lgb.train({"objective": "lambdarank", "verbosity": -1, "min_data_in_leaf": 5, "seed": 0}, ds, num_boost_round=5)


def test_roundtrip_scores_equal(tmp_path, booster):
    save_bundle(tmp_path, booster, FEATURES, EncoderRef(), {"metrics": {"x": 1}})
    b = load_bundle(tmp_path)
    X = np.array([[0.5, 3.0], [np.nan, 1.0]], dtype=np.float32)
    np.testing.assert_allclose(b.score(X), booster.predict(X))
    assert b.feature_names == FEATURES and b.manifest["metrics"] == {"x": 1}
    assert b.version.endswith(b.version.split("-")[-1]) and len(b.version.split("-")[-1]) == 8
    assert not list(tmp_path.glob("*.pkl"))


def test_score_checks_shape(tmp_path, booster):
    save_bundle(tmp_path, booster, FEATURES, EncoderRef(), {})
    with pytest.raises(ValueError, match=r"\(n, 2\)"):
        load_bundle(tmp_path).score(np.zeros((3, 5), dtype=np.float32))


@pytest.mark.parametrize(
    "breakage, words",
    [
        (lambda p: (p / "manifest.json").unlink(), "manifest.json: missing"),
        (lambda p: (p / "manifest.json").write_text("{not json"), "not valid JSON"),
        (lambda p: (p / "ranker.txt").write_text("garbage"), "not a LightGBM text model"),
        (lambda p: (p / "ranker.txt").unlink(), "missing LightGBM model file"),
        (lambda p: _edit(p, feature_names=["a", "b"]), "differ from the manifest"),
        (lambda p: _edit(p, format_version=99), "format_version 99"),
    ],
)
def test_broken_bundles_are_rejected_with_reason(tmp_path, booster, breakage, words):
    save_bundle(tmp_path, booster, FEATURES, EncoderRef(), {})
    breakage(tmp_path)
    with pytest.raises(BundleError, match=words):
        load_bundle(tmp_path)


def _edit(path, **changes):
    m = json.loads((path / "manifest.json").read_text())
    m.update(changes)
    (path / "manifest.json").write_text(json.dumps(m))


def test_encoder_reference_resolves_inside_the_bundle(tmp_path, booster):
    save_bundle(tmp_path, booster, FEATURES, EncoderRef(model_dir="encoder", max_length=96), {})
    b = load_bundle(tmp_path)
    assert b.encoder.resolve(b.path) == str((tmp_path / "encoder").resolve())
    assert b.encoder.max_length == 96
    assert EncoderRef().resolve(tmp_path) == "base"


@pytest.mark.parametrize("damage", ["truncated", "one character", "resized tree"])
def test_a_model_file_lightgbm_would_abort_on_is_an_error_not_a_dead_process(tmp_path, booster, damage):
    """LightGBM 4 aborts its whole process on these texts; with isolate_parse (what the server's
    registry uses) they are a BundleError naming the file, and this process lives on."""
    save_bundle(tmp_path, booster, FEATURES, EncoderRef(), {})
    model = tmp_path / "ranker.txt"
    text = model.read_text()
    at = text.index("leaf_value=") + len("leaf_value=")
    model.write_text({"truncated": text[: len(text) // 2],
                      "one character": text[:at] + "x" + text[at + 1:],
                      "resized tree": text[:at] + "-" + text[at:]}[damage])
    with pytest.raises(BundleError, match="ranker.txt: not a LightGBM text model LightGBM can read"):
        load_bundle(tmp_path, isolate_parse=True)
    save_bundle(tmp_path, booster, FEATURES, EncoderRef(), {})
    assert load_bundle(tmp_path, isolate_parse=True).version  # an intact one passes the check
