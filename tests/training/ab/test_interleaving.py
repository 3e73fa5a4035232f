"""Team-draft interleaving: the merge is a fair draft, deterministic per request, and the preference
test behind it; the simulations comparing it with an A/B split are in training/ab/interleaving_sim.py."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from featurizer.contracts.interleaving import TEAM_A, TEAM_B, coin, team_draft
from training.ab import stats as ab_stats


def test_the_draft_alternates_fairly_and_is_deterministic_per_request():
    a = ["a1", "a2", "a3", "s1", "a4"]
    b = ["b1", "s1", "b2", "b3", "b4"]
    items, teams = team_draft(a, b, "salt", "req-1")
    assert items == team_draft(a, b, "salt", "req-1")[0]  # same request, same list
    assert len(items) == len(set(items)) == len(set(a) | set(b))
    for k in range(0, len(teams) - 1, 2):  # each round: one pick per team while both have items
        assert {teams[k], teams[k + 1]} == {TEAM_A, TEAM_B}
    for team, ranking in ((TEAM_A, a), (TEAM_B, b)):  # each team's items keep its own order
        mine = [i for i, t in zip(items, teams) if t == team]
        assert mine == [i for i in ranking if i in mine]
    assert team_draft(a, b, "salt", "req-1", k=3)[0] == items[:3]


def test_first_picks_are_even_over_requests_and_differ_by_salt():
    firsts = [coin("s", f"r{i}", 0) for i in range(4000)]
    assert abs(np.mean(firsts) - 0.5) < 0.03
    assert [coin("s", f"r{i}", 0) for i in range(50)] != [coin("t", f"r{i}", 0) for i in range(50)]


def test_identical_rankers_split_their_items_evenly():
    ranking = [f"i{k}" for k in range(10)]
    top = [team_draft(ranking, ranking, "s", f"r{i}")[1][0] for i in range(2000)]
    assert abs(top.count(TEAM_A) / 2000 - 0.5) < 0.04


def test_preference_counts_wins_losses_ties_and_tests_them():
    pref = ab_stats.preference(np.array([3, 0, 1, 0, 2, 0]), np.array([1, 0, 1, 2, 0, 0]))
    assert (pref.wins, pref.losses, pref.ties, pref.users) == (2, 1, 3, 6)
    assert pref.delta == pytest.approx(1 / 6) and pref.ci[0] < pref.delta < pref.ci[1]
    assert pref.p_value == pytest.approx(1.0)
    strong = ab_stats.preference(np.ones(100), np.zeros(100))
    assert strong.significant and strong.delta == 1.0
    with pytest.raises(ValueError):
        ab_stats.preference(np.ones(1), np.zeros(1))


def test_users_for_power_interpolates_on_log_users():
    from training.ab.interleaving_sim import users_for_power

    grid = [10, 100, 1000]
    assert users_for_power(grid, np.array([0.5, 0.8, 1.0])) == pytest.approx(100)
    assert users_for_power(grid, np.array([0.6, 1.0, 1.0])) == pytest.approx(10 ** 1.5)  # halfway in log users
    assert users_for_power(grid, np.array([0.1, 0.2, 0.3])) == float("inf")


@pytest.fixture(scope="module")
def small_population(tmp_path_factory):
    from training.ab.simulation import population_from_shop
    from training.data.synth import SynthConfig, synthesize

    shop = tmp_path_factory.mktemp("il_shop")
    synthesize(shop, seed=5, config=SynthConfig(n_users=800, n_items=200, n_days=21))
    return population_from_shop(shop)


def test_interleaving_detects_a_planted_difference_with_fewer_users_and_holds_alpha_on_aa(small_population):
    """The full tables (300 replicates, 1,000 A/A runs) come from `python -m training.ab.interleaving_sim`;
    this is the same code at a size a test can afford."""
    from training.ab.interleaving_sim import run

    res = run(small_population, [20, 80, 320, 799], reps=40, noise_a=1.0, noise_b=2.0, aa_runs=200, boot=200)
    ab, il = np.array(res["power"]["ab"]), np.array(res["power"]["interleaving"])
    assert (il >= ab - 0.1).all() and il[-1] >= 0.8  # never clearly worse; enough users to find it
    assert res["users_for_80pct_power"]["interleaving"] < res["users_for_80pct_power"]["ab"]
    from tests.training.ab.test_prepare import _binomial_band

    lo, hi = _binomial_band(200, 0.05)
    assert lo <= res["aa_interleaving_false_positive_rate"] <= hi


def test_trained_bundles_rank_the_held_out_lists_by_their_own_scores(small_shop, small_bundle, encoder):
    """Issue 17 item 6 with real bundles: `bundle_rankers` scores each held-out list of the shop with a
    bundle exactly as training's evaluation scores it (the same features, interest score and trees,
    placed in the list's columns), and the simulation runs on those orders."""
    from featurizer.contracts.schema import read_dataset
    from ranker.bundle import load_bundle
    from ranker.feature_matrix import BundleInputs
    from training.ab.bundle_rankers import bundle_scores, held_out_exposures, held_out_start
    from training.ab.interleaving_sim import run
    from training.ab.simulation import population_from_shop
    from training.lambdarank.impression_lists import build_examples

    bundle = load_bundle(small_bundle[0])
    pop = population_from_shop(small_shop)
    held_out = held_out_exposures(pop, [bundle, bundle])
    assert 0 < held_out.shown.shape[0] < pop.shown.shape[0]
    assert held_out.exposure_ts_ms.min() >= held_out_start(bundle).timestamp() * 1000
    a, b = bundle_scores(small_shop, held_out, [bundle, bundle])
    np.testing.assert_array_equal(a, b)

    inputs = BundleInputs.of(bundle)
    rows = build_examples(read_dataset(small_shop), encoder, inputs).filter(
        pl.col("request_id").is_in(pl.Series(held_out.request_ids[:50]).implode()))
    want = dict(zip(zip(rows["request_id"].to_list(), rows["item_id"].to_list()),
                    bundle.score(inputs.frame_matrix(rows))))
    item_ids = held_out.items["item_id"].to_list()
    got = {(held_out.request_ids[e], item_ids[held_out.shown[e, k]]): a[e, k]
           for e in range(50) for k in range(held_out.shown.shape[1])}
    assert got.keys() == want.keys()
    np.testing.assert_allclose([got[k] for k in want], list(want.values()), rtol=1e-6, atol=1e-6)

    logged = np.broadcast_to(np.arange(held_out.shown.shape[1]), held_out.shown.shape).copy()
    res = run(held_out, [10, 40], reps=5, noise_a=0, noise_b=None, aa_runs=10, boot=20,
              orders=(np.argsort(-a, axis=1, kind="stable"), logged), rankers={"a": "bundle", "b": "logged"})
    assert res["rankers"] == {"a": "bundle", "b": "logged"} and res["lists"] == held_out.shown.shape[0]
    assert 0 < res["true_ctr"]["a"] < 1 and 0 < res["true_ctr"]["b"] < 1
