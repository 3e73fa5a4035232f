"""A/B analysis: attribution of events to exposures, the exposure reader, and simulations on the synthetic shop.

The simulations re-use the synthetic shop's ranked lists as exposures and redraw responses from its
ground truth (training/ab/simulation.py). They check that
- under A/A the delta-method CTR test, the two-proportion test on users and Welch's t-test on revenue
  reject about 5% of the time, while a naive per-exposure z-test rejects far more often;
- a planted click lift is detected as often as the analytic power says;
- the whole pipeline (JSONL exposures + events files -> report) recovers the planted lift.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import numpy as np
import polars as pl
import pytest
from scipy import stats

from featurizer.contracts.schema import validate_events
from training.ab import stats as ab_stats
from featurizer.contracts.exposures import ExposureLogError
from training.ab.prepare import (
    attribute_events,
    parse_shares,
    parse_window,
    prepare,
    read_exposures,
    read_outcome_events,
    select_experiment,
    shares_from_experiments,
)
from training.ab.render import markdown, write_report
from training.ab.report import build_report
from training.ab.simulation import (
    click_multiplier,
    ctr_moments,
    draw_responses,
    per_user,
    population_from_shop,
    split_users,
    write_experiment,
)
from training.data.synth import SynthConfig, synthesize

T0 = datetime(2026, 12, 1, 10, 0, 0, tzinfo=timezone.utc)
WINDOW = timedelta(minutes=30)
# 2,000 users over 28 days see ~10 lists each: enough exposures per user for clustering to matter.
AB_SHOP = SynthConfig(n_users=2000, n_items=300, n_days=28)
REPS = 1000
ALPHA = 0.05


def _iso(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _exposure(rid: str, user: str, items: list[str], t: datetime, variant: str = "control",
              experiment: str = "exp") -> dict:
    return {"ts": _iso(t), "request_id": rid, "user_id": user, "experiment": experiment, "variant": variant,
            "bundle_version": f"b-{variant}", "item_ids": items}


def _write_jsonl(path, records: list[dict], tail: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def _events(rows: list[tuple]) -> pl.DataFrame:
    """(ts, user_id, item_id, event, request_id) rows in the data contract."""
    return validate_events(pl.DataFrame(rows, schema={"ts": pl.Datetime("us", "UTC"), "user_id": pl.Utf8,
                                                      "item_id": pl.Utf8, "event": pl.Utf8, "request_id": pl.Utf8},
                                        orient="row"))


def _binomial_band(n: int, p: float, level: float = 0.999) -> tuple[float, float]:
    lo, hi = stats.binom.interval(level, n, p)
    return lo / n, hi / n


# --------------------------------------------------------------------------- attribution


def _attributed(exposures: list[dict], events: pl.DataFrame, tmp_path, logged: list[dict] | None = None):
    _write_jsonl(tmp_path / "exposures-1.jsonl", exposures + (logged or []))
    df, _ = read_exposures(tmp_path)
    mine = df.filter(pl.col("experiment") == "exp").with_row_index("exposure_id")
    result = attribute_events(mine, events, WINDOW, df["request_id"])
    ids = dict(zip(mine["exposure_id"].to_list(), mine["request_id"].to_list()))
    rows = [(ids[e], ev, item, via) for e, ev, item, via in result.events.sort("exposure_id", "event", "item_id").iter_rows()]
    return rows, result.notes


def test_window_counts_events_from_the_exposure_up_to_but_excluding_its_end(tmp_path):
    exposures = [_exposure("r1", "u1", ["a", "b", "c"], T0)]
    events = _events([
        (T0 - timedelta(seconds=1), "u1", "a", "click", None),  # before the exposure
        (T0, "u1", "a", "add_to_cart", None),  # at the exposure: counts
        (T0 + WINDOW - timedelta(microseconds=1), "u1", "b", "click", None),  # last instant inside
        (T0 + WINDOW, "u1", "c", "click", None),  # at the end: outside
        (T0 + timedelta(minutes=1), "u1", "z", "click", None),  # item not in the list
        (T0 + timedelta(minutes=1), "u2", "a", "click", None),  # another user
        (T0 + timedelta(minutes=2), "u1", "a", "impression", None),  # not an outcome
    ])
    rows, _ = _attributed(exposures, events, tmp_path)
    assert rows == [("r1", "add_to_cart", "a", "window"), ("r1", "click", "b", "window")]


def test_pre_period_counts_what_each_user_did_in_the_lookback_before_their_first_exposure(tmp_path):
    from training.ab.prepare import PRE_COLUMNS, pre_period

    day = timedelta(days=1)
    events = _events([
        (T0 - 15 * day, "u1", "a", "click", None),  # before the lookback
        (T0 - 14 * day, "u1", "a", "impression", "p1"),  # its first instant: counts
        (T0 - 2 * day, "u1", "b", "impression", "p1"),  # the same list
        (T0 - 2 * day, "u1", "b", "impression", "p2"),
        (T0 - day, "u1", "b", "click", None),
        (T0 - day, "u1", "b", "purchase", None),
        (T0, "u1", "c", "click", None),  # at the first exposure: not before it
        (T0 - day, "u3", "a", "click", None),  # never exposed
    ])
    items = pl.DataFrame({"item_id": ["a", "b", "c"], "price": [1.0, 2.5, 4.0]})
    first = pl.DataFrame({"user_id": ["u1", "u2"], "first_ts": [T0, T0]},
                         schema={"user_id": pl.Utf8, "first_ts": pl.Datetime("us", "UTC")})
    pre = pre_period(first, events, items, 14 * day).sort("user_id")
    assert pre.columns == ["user_id", *PRE_COLUMNS]
    assert pre.row(0) == ("u1", 2.0, 1.0, 0.0, 1.0, 2.5, 1.0)
    assert pre.row(1) == ("u2", 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)  # no history: zeros and has_pre 0, kept


def test_an_event_counts_once_for_the_latest_exposure_that_showed_the_item(tmp_path):
    exposures = [_exposure("r1", "u1", ["a", "b"], T0), _exposure("r2", "u1", ["a"], T0 + timedelta(minutes=10))]
    events = _events([(T0 + timedelta(minutes=12), "u1", "a", "click", None),
                      (T0 + timedelta(minutes=12), "u1", "b", "click", None)])
    rows, _ = _attributed(exposures, events, tmp_path)
    assert rows == [("r1", "click", "b", "window"), ("r2", "click", "a", "window")]


def test_request_id_attributes_directly_without_window(tmp_path):
    exposures = [_exposure("r1", "u1", ["a", "b"], T0), _exposure("r2", "u1", ["a"], T0 + timedelta(minutes=10))]
    other = [_exposure("r9", "u1", ["a"], T0, experiment="other-exp")]
    events = _events([
        (T0 + timedelta(minutes=12), "u1", "a", "click", "r1"),  # the later r2 also showed a: r1 wins
        (T0 + timedelta(hours=5), "u1", "b", "purchase", "r1"),  # hours later, still r1's
        (T0 + timedelta(minutes=1), "u1", "z", "click", "r1"),  # item not in r1's list: not counted
        (T0 + timedelta(minutes=11), "u1", "a", "add_to_cart", "r-unlogged"),  # unknown id: window rule -> r2
        (T0 + timedelta(minutes=1), "u1", "b", "click", "r9"),  # another experiment's answer: not ours
    ])
    rows, notes = _attributed(exposures, events, tmp_path, logged=other)
    assert rows == [("r1", "click", "a", "request_id"), ("r1", "purchase", "b", "request_id"),
                    ("r2", "add_to_cart", "a", "window")]
    assert any("1 outcome events name a logged request_id" in n for n in notes)


def test_prepare_keeps_each_user_in_the_first_variant_and_dedupes_request_ids():
    exposures = pl.DataFrame([
        _exposure("r1", "u1", ["a"], T0, "control"), _exposure("r1", "u1", ["a"], T0, "control"),
        _exposure("r2", "u1", ["a"], T0 + timedelta(hours=1), "treatment"),
        _exposure("r3", "u2", ["a"], T0, "treatment"),
    ]).with_columns(pl.col("ts").str.to_datetime(time_zone="UTC", time_unit="us"))
    events = _events([(T0 + timedelta(hours=1, minutes=1), "u1", "a", "click", None)])
    prep = prepare(exposures, events, None, WINDOW)
    assert prep.users.select("user_id", "variant", "exposures", "click_exposures").rows() == [
        ("u1", "control", 1, 0), ("u2", "treatment", 1, 0)]
    assert any("1 users" in w and "more than one variant" in w for w in prep.warnings)
    assert any("repeated a request_id" in n for n in prep.notes)


# --------------------------------------------------------------------------- reading exposures and options


def test_read_exposures_sorts_by_ts_and_skips_torn_last_lines_of_any_file(tmp_path):
    """The reader is featurizer.contracts.exposures (tests/featurizer/contracts/test_exposures.py); here: what the analysis adds."""
    old, new = tmp_path / "exposures-2026-12-01.jsonl", tmp_path / "exposures-2026-12-02.jsonl"
    _write_jsonl(old, [_exposure("r2", "u2", ["b"], T0 + timedelta(days=1))], tail='{"ts": "2026-12-01T1')
    _write_jsonl(new, [_exposure("r1", "u1", ["a"], T0), _exposure("r1", "u1", ["a"], T0)], tail='{"ts": "2026-12-02T1')
    df, torn = read_exposures(tmp_path)
    assert df["request_id"].to_list() == ["r1", "r1", "r2"] and torn == 2  # sorted by ts; prepare dedupes
    assert df.schema["ts"] == pl.Datetime("us", "UTC") and df["item_ids"].to_list() == [["a"], ["a"], ["b"]]


def test_read_exposures_merges_the_directories_of_several_replicas(tmp_path):
    a, b = tmp_path / "replica-a", tmp_path / "replica-b"
    a.mkdir(), b.mkdir()
    # The same file name in both (two processes started in the same second): they never collide.
    _write_jsonl(a / "exposures-20261204T100000-000001.jsonl", [_exposure("r1", "u1", ["a"], T0 + timedelta(seconds=2))])
    _write_jsonl(b / "exposures-20261204T100000-000001.jsonl", [_exposure("r2", "u2", ["b"], T0 + timedelta(seconds=1)),
                                                                 _exposure("r3", "u3", ["c"], T0 + timedelta(seconds=3))])
    df, torn = read_exposures([a, b])
    assert df["request_id"].to_list() == ["r2", "r1", "r3"] and torn == 0
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: no exposures"):
        read_exposures([a, tmp_path / "empty"])  # a wrong path among several is still an error


def test_read_exposures_names_file_and_line_of_a_bad_record(tmp_path):
    rec = _exposure("r1", "u1", ["a"], T0)
    bad = dict(rec, request_id="r2")
    del bad["user_id"]
    _write_jsonl(tmp_path / "exposures-1.jsonl", [rec, bad])
    with pytest.raises(ExposureLogError, match=r"exposures-1.jsonl:2: expected exactly the keys"):
        read_exposures(tmp_path)
    (tmp_path / "exposures-1.jsonl").write_text(json.dumps(rec) + "\n{not json}\n" + json.dumps(rec) + "\n")
    with pytest.raises(ExposureLogError, match=r"exposures-1.jsonl:2: not valid JSON"):
        read_exposures(tmp_path)
    _write_jsonl(tmp_path / "exposures-1.jsonl", [dict(rec, ts="yesterday")])
    with pytest.raises(ExposureLogError, match=r"exposures-1.jsonl:1: ts must look like .*'yesterday'"):
        read_exposures(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty: no exposures-\*.jsonl files"):
        read_exposures(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no such exposure file or directory"):
        read_exposures(tmp_path / "missing")


def test_experiment_selection_and_options(tmp_path):
    df = pl.DataFrame({"experiment": ["", "a", "a", "b"]})
    assert select_experiment(df, "b") == "b"
    with pytest.raises(ValueError, match=r"several experiments: a \(2 exposures\), b \(1 exposures\)"):
        select_experiment(df, None)
    with pytest.raises(ValueError, match="'c' has no exposures"):
        select_experiment(df, "c")
    assert select_experiment(df.filter(pl.col("experiment") != "b"), None) == "a"
    assert parse_window("30m") == WINDOW and parse_window("1h30m") == timedelta(minutes=90)
    assert parse_window("2d") == timedelta(days=2) and parse_window("45s") == timedelta(seconds=45)
    for bad in ("30", "m", "-5m", "0m", "30 min"):
        with pytest.raises(ValueError, match="window"):
            parse_window(bad)
    assert parse_shares("control=0.5, treatment=0.5") == {"control": 0.5, "treatment": 0.5}
    with pytest.raises(ValueError, match="NAME=SHARE"):
        parse_shares("control:0.5")
    toml = tmp_path / "experiments.toml"
    toml.write_text('[[experiment]]\nname = "ft"\nsalt = "s"\nstart = 2026-12-01T00:00:00Z\n'
                    'end = 2026-12-15T00:00:00Z\n  [[experiment.variant]]\n  name = "holdout"\n  share = 0.2\n'
                    '  holdout = true\n  [[experiment.variant]]\n  name = "ft"\n  share = 0.8\n  bundle = "b"\n')
    assert shares_from_experiments(toml, "ft") == {"holdout": 0.2, "ft": 0.8}
    with pytest.raises(ValueError, match="no experiment named 'x'"):
        shares_from_experiments(toml, "x")


# --------------------------------------------------------------------------- sample-ratio mismatch


def test_srm_flags_a_52_48_split_of_20k_users_and_not_a_fair_one():
    shares = {"control": 0.5, "treatment": 0.5}
    skewed = ab_stats.sample_ratio_mismatch({"control": 10_400, "treatment": 9_600}, shares)
    assert skewed.flagged and skewed.p_value < 1e-6 and skewed.chi2 == pytest.approx(32.0)
    assert not ab_stats.sample_ratio_mismatch({"control": 10_000, "treatment": 10_000}, shares).flagged
    fair = np.random.default_rng(5).random(20_000) < 0.5  # a random fair assignment
    assert not ab_stats.sample_ratio_mismatch({"control": int(fair.sum()), "treatment": int((~fair).sum())},
                                              shares).flagged
    # Against the shares actually configured, 52/48 is fine.
    assert not ab_stats.sample_ratio_mismatch({"control": 10_400, "treatment": 9_600},
                                              {"control": 0.52, "treatment": 0.48}).flagged
    with pytest.raises(ValueError, match="no configured share"):
        ab_stats.sample_ratio_mismatch({"control": 5, "other": 5}, shares)


def test_srm_banner_in_the_report():
    users = pl.DataFrame({"user_id": [f"u{i}" for i in range(20_000)],
                          "variant": ["control"] * 10_400 + ["treatment"] * 9_600,
                          "exposures": 1, "click_exposures": [i % 2 for i in range(20_000)],
                          "cart_exposures": 0, "purchase_exposures": 0, "revenue": 0.0})
    from training.ab.prepare import Prepared

    prep = Prepared(users, "exp", 20_000, {}, ("a", "b"), prices=False)
    report = build_report(prep, WINDOW, shares={"control": 0.5, "treatment": 0.5}, shares_source="--shares")
    assert report["srm"]["flagged"]
    assert markdown(report).startswith("# A/B report: exp\n\n> **WARNING — SAMPLE-RATIO MISMATCH")
    assert not build_report(prep, WINDOW, shares={"control": 0.52, "treatment": 0.48})["srm"]["flagged"]


# --------------------------------------------------------------------------- simulations on the synthetic shop


@pytest.fixture(scope="module")
def population(tmp_path_factory):
    shop = tmp_path_factory.mktemp("ab_shop")
    synthesize(shop, seed=11, config=AB_SHOP)
    return population_from_shop(shop)


def _ctr(pu: dict, mask: np.ndarray) -> ab_stats.Estimate:
    return ab_stats.ratio(pu["click_exposures"][mask], pu["exposures"][mask])


def test_aa_tests_reject_at_the_nominal_rate_and_a_naive_exposure_test_does_not(population):
    rng = np.random.default_rng(20261201)
    rejected = {"ctr": 0, "users_with_purchase": 0, "revenue_per_user": 0, "naive_ctr": 0}
    diffs, ses, naive_ses = [], [], []
    for _ in range(REPS):
        variant = split_users(population.n_users, rng)
        pu = per_user(population, *draw_responses(population, rng))
        a, b = variant == 0, variant == 1
        ctr_b, ctr_a = _ctr(pu, b), _ctr(pu, a)
        ctr = ab_stats.compare(ctr_b, ctr_a)
        buyers = [ab_stats.proportion(int((pu["purchase_exposures"][m] > 0).sum()), int(m.sum())) for m in (b, a)]
        revenue = ab_stats.compare(ab_stats.mean(pu["revenue"][b]), ab_stats.mean(pu["revenue"][a]))
        # The naive test: every exposure an independent Bernoulli trial.
        z, p_naive = ab_stats.two_proportion_ztest(pu["click_exposures"][b].sum(), int(pu["exposures"][b].sum()),
                                                   pu["click_exposures"][a].sum(), int(pu["exposures"][a].sum()))
        rejected["ctr"] += ctr.p_value < ALPHA
        rejected["users_with_purchase"] += ab_stats.compare(*buyers).p_value < ALPHA
        rejected["revenue_per_user"] += revenue.p_value < ALPHA
        rejected["naive_ctr"] += p_naive < ALPHA
        diffs.append(ctr.diff)
        ses.append(np.sqrt(ctr_a.var + ctr_b.var))
        naive_ses.append(abs(ctr.diff / z) if z else np.nan)
    rates = {k: v / REPS for k, v in rejected.items()}
    lo, hi = _binomial_band(REPS, ALPHA)
    spread = float(np.std(diffs, ddof=1))
    print(f"\nA/A over {REPS} splits: rejection rates {rates}; band [{lo:.3f}, {hi:.3f}]; "
          f"delta-method SE / spread {np.mean(ses) / spread:.3f}, naive SE / spread {np.nanmean(naive_ses) / spread:.3f}")
    for key in ("ctr", "users_with_purchase", "revenue_per_user"):
        assert lo <= rates[key] <= hi, (key, rates[key], (lo, hi))
    assert rates["naive_ctr"] > hi, rates  # exposures of one user are correlated
    assert 0.9 < np.mean(ses) / spread < 1.1  # the delta-method SE is the real spread of the estimate
    assert np.nanmean(naive_ses) / spread < 0.8  # the naive SE is too small


def test_planted_click_lift_is_detected_as_often_as_the_analytic_power(population):
    lift, reps = 0.10, 300
    n_a = n_b = population.n_users / 2
    r_a, v_a = ctr_moments(population, 1.0)
    r_b, v_b = ctr_moments(population, 1.0 + lift)
    power = ab_stats.z_test_power(r_b - r_a, float(np.sqrt(v_a / n_a + v_b / n_b)))
    assert 0.6 < power < 0.95, power  # an informative setting, neither trivial nor hopeless
    rng = np.random.default_rng(7)
    detected, lifts = 0, []
    for _ in range(reps):
        variant = split_users(population.n_users, rng)
        pu = per_user(population, *draw_responses(population, rng, click_multiplier(population, variant, (0.0, lift))))
        c = ab_stats.compare(_ctr(pu, variant == 1), _ctr(pu, variant == 0))
        detected += c.p_value < ALPHA
        lifts.append(c.lift)
    observed = detected / reps
    lo, hi = _binomial_band(reps, power)
    print(f"\nplanted {lift:.0%} item-level click lift = {r_b / r_a - 1:.2%} CTR lift: analytic power {power:.3f}, "
          f"detected {observed:.3f} over {reps} runs (band [{lo:.3f}, {hi:.3f}] +- 0.02)")
    # The 0.02 allows for the normal approximation and estimated SEs behind the analytic power.
    assert lo - 0.02 <= observed <= hi + 0.02
    assert abs(np.mean(lifts) - (r_b / r_a - 1)) < 4 * np.std(lifts) / np.sqrt(reps)


def test_report_from_files_recovers_a_planted_lift(population, tmp_path):
    variant = split_users(population.n_users, np.random.default_rng(3))
    lift = 0.3
    run = write_experiment(population, tmp_path, variant, ("control", "treatment"), (0.0, lift), seed=3,
                           experiment="enc-ft")
    exposures, torn = read_exposures(run.exposures)
    events, items = read_outcome_events(run.data)
    prep = prepare(exposures, events, items, WINDOW)
    assert torn == 0 and prep.experiment == "enc-ft" and prep.prices
    # The join reproduces the simulated responses (last touch may move a rare event between lists).
    users = prep.users.join(pl.DataFrame({"user_id": population.user_ids, "sim_clicks": run.per_user["click_exposures"],
                                          "sim_revenue": run.per_user["revenue"]}), on="user_id")
    assert users.height == population.n_users
    assert (users["click_exposures"] == users["sim_clicks"]).mean() > 0.99
    assert users["revenue"].sum() == pytest.approx(users["sim_revenue"].sum(), rel=1e-3)
    report = build_report(prep, WINDOW)
    r_a, _ = ctr_moments(population, 1.0)
    r_b, _ = ctr_moments(population, 1.0 + lift)
    ctr = report["comparisons"]["treatment"]["ctr"]
    assert report["control"] == "control" and not report["srm"]["flagged"]
    assert ctr["significant"] and ctr["lift_ci"][0] < r_b / r_a - 1 < ctr["lift_ci"][1]
    assert report["variants"]["treatment"]["users"] == int((variant == 1).sum())
    paths = write_report(report, tmp_path / "report", tmp_path / "extra.json")
    assert json.loads(paths["json_out"].read_text())["experiment"] == "enc-ft"
    assert paths["png"].stat().st_size > 10_000 and "| CTR | treatment |" in paths["md"].read_text()
