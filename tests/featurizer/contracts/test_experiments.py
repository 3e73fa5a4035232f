import hashlib
import json
import math
import os
import subprocess
import sys
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from featurizer.contracts.experiments import (
    ExperimentConfigError,
    Experiments,
    assignment_unit,
    load_experiments,
)

UTC = timezone.utc
T0 = datetime(2026, 12, 1, tzinfo=UTC)
T1 = datetime(2026, 12, 15, tzinfo=UTC)
REPO = Path(__file__).resolve().parents[3]

EXAMPLE_TOML = """
[[experiment]]
name = "encoder-ft-vs-frozen"
salt = "2026-12-ft"
start = 2026-12-01T00:00:00Z
end = 2026-12-15T00:00:00Z
  [[experiment.variant]]
  name = "control"
  share = 0.45
  bundle = "bundles/frozen"
  [[experiment.variant]]
  name = "treatment"
  share = 0.45
  bundle = "bundles/finetuned"
  [[experiment.variant]]
  name = "holdout"
  share = 0.10
  holdout = true
"""


def experiment(name="exp", salt="salt-1", start="2026-12-01T00:00:00Z", end="2026-12-15T00:00:00Z", shares=(0.5, 0.5)):
    variants = [{"name": f"v{i}", "share": s, "bundle": "bundles/a"} for i, s in enumerate(shares)]
    return {"name": name, "salt": salt, "start": start, "end": end, "variant": variants}


@pytest.fixture
def root(tmp_path):
    for b in ("a", "frozen", "finetuned"):
        (tmp_path / "bundles" / b).mkdir(parents=True)
    return tmp_path


def write_json(root, doc, name="experiments.json"):
    p = root / name
    p.write_text(json.dumps(doc))
    return p


def load(root, *experiments):
    return load_experiments(write_json(root, {"experiment": list(experiments)}))


def test_example_toml_loads(root):
    (root / "experiments.toml").write_text(EXAMPLE_TOML)
    exps = load_experiments(root / "experiments.toml")
    (e,) = exps.experiments
    assert (e.name, e.salt, e.start, e.end) == ("encoder-ft-vs-frozen", "2026-12-ft", T0, T1)
    assert [(v.name, v.share, v.holdout) for v in e.variants] == [
        ("control", 0.45, False), ("treatment", 0.45, False), ("holdout", 0.10, True)
    ]
    assert e.variants[0].bundle == (root / "bundles" / "frozen").resolve()
    assert e.variants[2].bundle is None
    assert exps.bundles() == {(root / "bundles" / "frozen").resolve(), (root / "bundles" / "finetuned").resolve()}
    a = exps.assign("user-1", T0 + timedelta(days=1))
    assert a.experiment == "encoder-ft-vs-frozen" and a.variant in {"control", "treatment", "holdout"}
    assert (a.bundle is None) == a.holdout == (a.variant == "holdout")


def test_iso_strings_with_offsets_are_normalised_to_utc(root):
    exps = load(root, experiment(start="2026-12-01T01:00:00+01:00", end="2026-12-15T00:00:00+00:00"))
    assert exps.experiments[0].start == T0 and exps.experiments[0].start.tzinfo == UTC


def test_window_is_start_inclusive_end_exclusive(root):
    exps = load(root, experiment())
    assert exps.assign("u", T0) is not None
    assert exps.assign("u", T1 - timedelta(microseconds=1)) is not None
    assert exps.assign("u", T1) is None
    assert exps.assign("u", T0 - timedelta(microseconds=1)) is None
    assert exps.active(T1) is None and exps.active(T0).name == "exp"
    assert Experiments().assign("u", T0) is None
    with pytest.raises(ValueError, match="timezone-aware"):
        exps.assign("u", datetime(2026, 12, 2))


def test_assignment_follows_the_documented_formula(root):
    exps = load(root, experiment(shares=(0.45, 0.45, 0.10)))
    for i in range(200):
        user = f"user-{i}"
        u = int.from_bytes(hashlib.sha256(f"salt-1:{user}".encode()).digest()[:8], "big") / 2**64
        assert assignment_unit("salt-1", user) == u
        expected = "v0" if u < 0.45 else "v1" if u < 0.90 else "v2"
        assert exps.assign(user, T0).variant == expected


def test_assignment_is_identical_in_another_process(root):
    path = write_json(root, {"experiment": [experiment(shares=(0.45, 0.45, 0.10))]})
    users = [f"user-{i}" for i in range(1000)]
    script = (
        "import json, sys\nfrom datetime import datetime, timezone\nfrom featurizer.contracts.experiments import load_experiments\n"
        "e = load_experiments(sys.argv[1]); now = datetime(2026, 12, 2, tzinfo=timezone.utc)\n"
        "print(json.dumps([e.assign(f'user-{i}', now).variant for i in range(1000)]))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, env=env, check=True)
    here = load_experiments(path)
    assert json.loads(out.stdout) == [here.assign(u, T0 + timedelta(days=1)).variant for u in users]


@pytest.mark.parametrize("shares", [(0.45, 0.45, 0.10), (0.5, 0.5)])
def test_shares_within_binomial_tolerance(root, shares):
    exps = load(root, experiment(shares=shares))
    n = 100_000
    counts = Counter(exps.assign(f"u{i}", T0).variant for i in range(n))
    for i, share in enumerate(shares):
        assert abs(counts[f"v{i}"] - share * n) <= 4.5 * math.sqrt(n * share * (1 - share)), (counts, shares)


def test_experiments_with_different_salts_are_independent(root):
    later = dict(start="2026-12-15T00:00:00Z", end="2026-12-31T00:00:00Z")
    exps = load(root, experiment(name="a", salt="salt-a"), experiment(name="b", salt="salt-b", **later))
    t_b = datetime(2026, 12, 20, tzinfo=UTC)
    table = Counter((exps.assign(f"u{i}", T0).variant, exps.assign(f"u{i}", t_b).variant) for i in range(20_000))
    obs = [[table[("v0", "v0")], table[("v0", "v1")]], [table[("v1", "v0")], table[("v1", "v1")]]]
    n = sum(map(sum, obs))
    rows, cols = [sum(r) for r in obs], [sum(c) for c in zip(*obs)]
    chi2 = sum((obs[i][j] - rows[i] * cols[j] / n) ** 2 / (rows[i] * cols[j] / n) for i in range(2) for j in range(2))
    p = math.erfc(math.sqrt(chi2 / 2))  # chi-square survival function, 1 degree of freedom
    assert p > 0.001, (obs, chi2, p)


def test_adjacent_windows_do_not_overlap(root):
    b = experiment(name="b", start="2026-12-15T00:00:00Z", end="2027-01-01T00:00:00Z")
    exps = load(root, experiment(name="a"), b)
    assert exps.active(T1).name == "b" and exps.active(T1 - timedelta(seconds=1)).name == "a"


def mutate(fn):
    doc = {"experiment": [experiment()]}
    fn(doc)
    return doc


E0, V0, V1 = "experiment[0]", "experiment[0].variant[0]", "experiment[0].variant[1]"


def _set(path, value):
    def fn(doc):
        target = doc
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return fn


def _del(path):
    def fn(doc):
        target = doc
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
    return fn


def _holdout_with_bundle(doc):
    doc["experiment"][0]["variant"][1]["holdout"] = True


def _neither_bundle_nor_holdout(doc):
    del doc["experiment"][0]["variant"][1]["bundle"]


def _duplicate_experiment(doc):
    doc["experiment"].append(experiment(start="2027-01-01T00:00:00Z", end="2027-02-01T00:00:00Z"))


def _overlap(doc):
    doc["experiment"].append(experiment(name="other", start="2026-12-14T00:00:00Z", end="2027-01-01T00:00:00Z"))


def _shares(*shares):
    def fn(doc):
        doc["experiment"][0] = experiment(shares=shares)
    return fn


@pytest.mark.parametrize(
    "change, field, words",
    [
        (_set(["experimnt"], []), "experimnt", "unknown key"),
        (_set(["experiment", 0, "sat"], "x"), f"{E0}.sat", "unknown key"),
        (_set(["experiment", 0, "variant", 1, "shares"], 0.5), f"{V1}.shares", "unknown key"),
        (_set(["experiment", 0, "salt"], ""), f"{E0}.salt", "non-empty"),
        (_del(["experiment", 0, "salt"]), f"{E0}.salt", "required"),
        (_set(["experiment", 0, "name"], ""), f"{E0}.name", "non-empty"),
        (_shares(0.5, 0.4), f"{E0}.variant", "sum to 1"),
        (_shares(0.5, 0.5 + 1e-6), f"{E0}.variant", "sum to 1"),
        (_shares(1.5, -0.5), f"{V0}.share", "(0, 1]"),
        (_shares(1.0, 0.0), f"{V1}.share", "(0, 1]"),
        (_set(["experiment", 0, "variant", 0, "share"], "0.5"), f"{V0}.share", "a number"),
        (_set(["experiment", 0, "variant", 1, "name"], "v0"), f"{V1}.name", "duplicate variant"),
        (_duplicate_experiment, "experiment[1].name", "duplicate experiment"),
        (_holdout_with_bundle, V1, "exactly one of `bundle`"),
        (_neither_bundle_nor_holdout, V1, "exactly one of `bundle`"),
        (_set(["experiment", 0, "variant", 0, "bundle"], "bundles/missing"), f"{V0}.bundle", "does not exist"),
        (_set(["experiment", 0, "variant", 0, "holdout"], "yes"), f"{V0}.holdout", "true or false"),
        (_set(["experiment", 0, "end"], "2026-12-01T00:00:00Z"), f"{E0}.end", "after start"),
        (_set(["experiment", 0, "start"], "2026-12-01T00:00:00"), f"{E0}.start", "no timezone"),
        (_set(["experiment", 0, "end"], "2026-12-15"), f"{E0}.end", "no timezone"),
        (_set(["experiment", 0, "start"], "soon"), f"{E0}.start", "ISO-8601"),
        (_set(["experiment", 0, "variant"], []), f"{E0}.variant", "at least one"),
        (_overlap, "experiment[1].start", "only one experiment may run"),
    ],
)
def test_validation_errors_name_file_and_field(root, change, field, words):
    path = write_json(root, mutate(change))
    with pytest.raises(ExperimentConfigError) as e:
        load_experiments(path)
    msg = str(e.value)
    assert f"{path}: {field}: " in msg and words in msg, msg


def test_toml_errors_name_file_and_field(root):
    path = root / "experiments.toml"
    toml = EXAMPLE_TOML.replace("share = 0.10", "share = 0.0").replace("2026-12-01T00:00:00Z", "2026-12-01T00:00:00")
    path.write_text(toml)
    with pytest.raises(ExperimentConfigError) as e:
        load_experiments(path)
    assert f"{path}: experiment[0].variant[2].share: must be in (0, 1]" in str(e.value)
    assert f"{path}: experiment[0].start: " in str(e.value) and "no timezone" in str(e.value)


def test_unparseable_and_unsupported_files(root):
    bad = root / "experiments.toml"
    bad.write_text("[[experiment]\n")
    with pytest.raises(ExperimentConfigError, match="not valid TOML"):
        load_experiments(bad)
    with pytest.raises(ExperimentConfigError, match="use .toml or .json"):
        load_experiments(write_json(root, {}, name="experiments.yaml"))


def test_all_violations_are_reported_at_once(root):
    def two_bad(doc):
        doc["experiment"][0]["salt"] = ""
        doc["experiment"][0]["variant"][0]["colour"] = "red"

    with pytest.raises(ExperimentConfigError) as e:
        load_experiments(write_json(root, mutate(two_bad)))
    assert [v.split(":")[0] for v in e.value.violations] == [f"{E0}.salt", f"{V0}.colour"]


def test_absolute_bundle_paths_are_kept(root, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    def absolute(doc):
        doc["experiment"][0]["variant"][0]["bundle"] = str(elsewhere)
    exps = load_experiments(write_json(root, mutate(absolute)))
    assert exps.bundles() == {elsewhere.resolve(), (root / "bundles" / "a").resolve()}


def test_cross_experiment_errors_keep_file_indices_when_another_experiment_is_invalid(root):
    bad = experiment(name="bad", salt="", start="2027-03-01T00:00:00Z", end="2027-04-01T00:00:00Z")
    overlapping = experiment(name="b", start="2026-12-10T00:00:00Z", end="2026-12-20T00:00:00Z")
    with pytest.raises(ExperimentConfigError) as e:
        load(root, experiment(name="a"), bad, overlapping)
    fields = [v.split(":")[0] for v in e.value.violations]
    assert fields == ["experiment[1].salt", "experiment[2].start"], e.value.violations
