import json
from pathlib import Path

import polars as pl
import pytest

from featurizer.contracts.schema import read_dataset
from training.data.importers import (
    DATASETS,
    SHARED_DATA_ENV,
    default_shared_data_dir,
    import_dataset,
)

SHARED = default_shared_data_dir()
# (events, users, items) from shared/data/README.md
EXPECTED = {
    "amazon-beauty-2014": (198_215, 22_332, 12_086),
    "amazon-toys-2014": (165_247, 19_124, 11_758),
    "movielens-1m": (999_611, 6_040, 3_416),
    "movielens-latest-small": (100_836, 610, 9_742),
}
HTML_ENTITY = r"&(?:amp|quot|lt|gt|apos|#\d+|#x[0-9a-fA-F]+);"


@pytest.fixture(scope="module")
def importer(tmp_path_factory):
    """`importer(name) -> (out_dir, summary)`, importing each dataset once per module."""
    if not SHARED.is_dir():
        pytest.skip(f"shared data folder absent: {SHARED}")
    done: dict[str, tuple[Path, dict]] = {}

    def run(name: str) -> tuple[Path, dict]:
        if name not in done:
            out = tmp_path_factory.mktemp(name)
            done[name] = (out, import_dataset(name, out))
        return done[name]

    return run


@pytest.fixture(params=DATASETS)
def imported(request, importer) -> tuple[str, Path, dict]:
    return request.param, *importer(request.param)


def test_counts_match_the_readme(imported):
    name, out, summary = imported
    n_events, n_users, n_items = EXPECTED[name]
    ds = read_dataset(out)
    assert ds.events.height == n_events == summary["events"]["purchase"]
    assert ds.events["user_id"].n_unique() == n_users == summary["users"]
    assert ds.items.height == n_items == summary["items"]
    assert ds.report.events_unknown_item == 0
    assert (ds.events["event"] == "purchase").all()
    assert ds.events["request_id"].null_count() == ds.events.height
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["source"] == f"shared/data/{name}"  # repo-relative, no machine paths


def test_events_are_sorted_and_per_user_order_follows_seq_pos(imported):
    _, out, _ = imported
    events = pl.read_parquet(out / "events.parquet")
    assert events["seq_pos"].dtype == pl.Int64
    assert events["ts"].is_sorted()
    per_user = events.group_by("user_id", maintain_order=True).agg("seq_pos", "ts")
    assert (per_user["seq_pos"].list.first() == 0).all()
    assert (per_user["seq_pos"].list.diff(null_behavior="drop").list.eval(pl.element() == 1).list.all()).all()


@pytest.mark.parametrize("name", [d for d in DATASETS if d != "movielens-latest-small"])
def test_seq_pos_is_the_upstream_order(importer, name):
    out, _ = importer(name)
    source = pl.read_csv(SHARED / name / "interactions.csv.gz", schema_overrides={"user_id": pl.Utf8, "item_id": pl.Utf8})
    events = pl.read_parquet(out / "events.parquet", columns=["user_id", "item_id", "seq_pos"])
    ours = events.group_by("user_id").agg(pl.col("item_id").alias("ours"))
    theirs = source.sort("user_id", "seq_pos").group_by("user_id").agg(pl.col("item_id").alias("theirs"))
    both = ours.join(theirs, on="user_id")
    assert both.height == ours.height == theirs.height
    assert (both["ours"] == both["theirs"]).all()


def test_html_entities_are_unescaped(imported):
    name, out, _ = imported
    titles = pl.read_parquet(out / "items.parquet")["title"]
    assert not titles.str.contains(HTML_ENTITY).any()
    if name == "amazon-toys-2014":
        assert "Wrath of Ashardalon: A D&D Boardgame" in titles.to_list()


def test_movielens_latest_small_text(importer):
    out, _ = importer("movielens-latest-small")
    items = pl.read_parquet(out / "items.parquet")
    toy_story = items.filter(pl.col("item_id") == "1").row(0, named=True)
    assert toy_story["title"] == "Toy Story (1995)"
    assert toy_story["category"] == "Adventure, Animation, Children, Comedy, Fantasy"
    assert toy_story["description"].startswith("Genres: Adventure, Animation, Children, Comedy, Fantasy; Tags: ")
    assert "pixar" in toy_story["description"]
    assert items["category"].null_count() == 34  # "(no genres listed)"
    tagged = items.filter(pl.col("description").str.contains("Tags: "))
    assert tagged.height > 1000
    tag_lists = tagged["description"].str.extract(r"Tags: (.*)$").str.split(", ")
    assert (tag_lists.list.len() <= 20).all()
    assert all(t == sorted(t) for t in tag_lists.to_list())
    events = pl.read_parquet(out / "events.parquet")
    assert events["rating"].min() >= 0.5 and events["rating"].max() <= 5.0


def test_unknown_dataset_names_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match="movielens-1m"):
        import_dataset("netflix-prize", tmp_path)


def test_missing_source_file_is_named(tmp_path):
    (tmp_path / "src" / "amazon-beauty-2014").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="interactions.csv.gz"):
        import_dataset("amazon-beauty-2014", tmp_path / "out", shared_data_dir=tmp_path / "src")


def test_shared_data_dir_override(monkeypatch, tmp_path):
    monkeypatch.setenv(SHARED_DATA_ENV, str(tmp_path))
    assert default_shared_data_dir() == tmp_path
    monkeypatch.delenv(SHARED_DATA_ENV)
    assert default_shared_data_dir().parts[-2:] == ("shared", "data")
