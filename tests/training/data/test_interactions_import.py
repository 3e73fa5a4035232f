"""`semrank data import --format interactions` (issue 32 item 4): any interaction log in, the data
contract out; the same dataset as a named importer from that importer's files; bad rows counted,
never a crash."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import polars as pl
import pytest

from featurizer.contracts.schema import read_dataset
from semrank.cli import main
from training.data.importers import SHARED_DATA_ENV, default_shared_data_dir, import_dataset
from training.data.interactions import InteractionFormat, InteractionImportError, import_interactions

UPSTREAM = InteractionFormat(order="seq_pos", unescape_html=True)  # the named sequence importers' files


def write_csv_gz(path: Path, header: str, rows: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        f.write(header + "\n" + "".join(r + "\n" for r in rows))


def upstream_files(root: Path, seed: int = 0) -> Path:
    """A small dataset in the layout of shared/data's Amazon and MovieLens-1M folders
    (interactions.csv.gz: user_id,item_id,timestamp,seq_pos; items.csv.gz: item_id,title), with
    same-timestamp ties whose order only seq_pos knows, rows shuffled, and HTML entities in titles."""
    rng = random.Random(seed)
    folder = root / "amazon-beauty-2014"
    rows = []
    for u in range(40):
        t = 1_388_534_400 + rng.randrange(86_400 * 30)
        for pos in range(rng.randrange(3, 12)):
            t += rng.choice([0, 0, 3600, 86_400])  # ties: the same second, in upstream order
            rows.append(f"u{u},i{rng.randrange(60)},{t},{pos}")
    rng.shuffle(rows)
    write_csv_gz(folder / "interactions.csv.gz", "user_id,item_id,timestamp,seq_pos", rows)
    titles = [f'i{k},"Lip balm &amp; gloss no. {k} &quot;{rng.choice(["rose", "mint"])}&quot;"' for k in range(60)]
    write_csv_gz(folder / "items.csv.gz", "item_id,title", titles)
    return folder


def test_the_files_behind_a_named_importer_give_the_same_dataset(tmp_path):
    folder = upstream_files(tmp_path / "shared")
    named = import_dataset("amazon-beauty-2014", tmp_path / "named", tmp_path / "shared")
    got = import_interactions(folder / "interactions.csv.gz", folder / "items.csv.gz", tmp_path / "generic", UPSTREAM)
    a, b = read_dataset(tmp_path / "named"), read_dataset(tmp_path / "generic")
    assert a.items.equals(b.items)
    assert a.events.equals(b.events)  # same rows, same order, same-timestamp ties included
    raw = lambda p: pl.read_parquet(p / "events.parquet")  # noqa: E731 - seq_pos is an extra column
    assert raw(tmp_path / "named").equals(raw(tmp_path / "generic"))
    assert got["users"] == named["users"] and got["events"] == named["events"] and got["items"] == named["items"]
    assert got["bad_rows"]["interactions"]["dropped"] == got["bad_rows"]["items"]["dropped"] == 0


def test_without_an_order_column_ties_keep_the_file_order(tmp_path):
    log = tmp_path / "log.csv"
    log.write_text("user_id,item_id,timestamp\nu1,b,100\nu1,a,100\nu1,c,50\nu2,a,100\n")
    (tmp_path / "items.csv").write_text("item_id,title\na,A\nb,B\nc,C\n")
    import_interactions(log, tmp_path / "items.csv", tmp_path / "out")
    events = pl.read_parquet(tmp_path / "out" / "events.parquet").filter(pl.col("user_id") == "u1").sort("seq_pos")
    assert events["item_id"].to_list() == ["c", "b", "a"] and events["seq_pos"].to_list() == [0, 1, 2]


def test_bad_rows_are_dropped_and_counted_by_reason(tmp_path):
    log = tmp_path / "log.csv"
    log.write_text(
        "user,sku,time,kind\n"
        "u1,a,2024-01-01T10:00:00Z,view\n"  # 0: fine (view -> click)
        ",a,2024-01-01T10:00:00Z,view\n"  # 1: no user
        "u2,,2024-01-01T10:00:00Z,view\n"  # 2: no item
        "u2,a,,view\n"  # 3: no timestamp
        "u2,a,yesterday,view\n"  # 4: unparsable timestamp
        "u2,b,2024-01-01T11:00:00Z,wishlist\n"  # 5: an event type the contract lacks
        "u2,b,2024-01-01T11:00:00Z,order\n"  # 6: fine (order -> purchase)
        "u3,zz,2024-01-02T00:00:00Z,cart\n"  # 7: fine, an item the catalog lacks (kept, counted)
    )
    items = tmp_path / "items.csv"
    items.write_text("id,name,cost\na,Alpha,3.5\nb,Beta,cheap\n,Nameless,1\nc,,2\na,Alpha again,9\n")
    fmt = InteractionFormat(user="user", item="sku", ts="time", event="kind", item_id="id", title="name", price="cost",
                            event_map={"view": "click", "order": "purchase", "cart": "add_to_cart"})
    summary = import_interactions(log, items, tmp_path / "out", fmt)
    bad = summary["bad_rows"]["interactions"]
    assert bad["by_reason"] == {"event type unknown": 1, "item id missing": 1, "timestamp missing": 1,
                                "timestamp unparsable": 1, "user id missing": 1}
    assert bad["dropped"] == 5 and bad["example_rows"]["timestamp unparsable"] == [4]
    assert summary["bad_rows"]["items"]["by_reason"] == {
        "item id missing": 1, "item id repeated (the first row kept)": 1, "price unparsable (kept without a price)": 1,
        "title missing": 1}
    ds = read_dataset(tmp_path / "out")
    assert ds.events["event"].to_list() == ["click", "purchase", "add_to_cart"]
    assert ds.items.select("item_id", "title", "price").rows() == [("a", "Alpha", 3.5), ("b", "Beta", None)]
    assert summary["events_unknown_item"] == 1 == ds.report.events_unknown_item
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == summary


def test_parquet_epoch_units_and_a_price_from_the_log(tmp_path):
    base_s = 1_700_000_000
    for unit, scale in (("s", 1), ("ms", 1_000), ("us", 1_000_000)):
        pl.DataFrame({"user_id": ["u1", "u1", "u2"], "item_id": ["a", "b", "a"],
                      "timestamp": [base_s * scale, (base_s + 60) * scale, (base_s + 5) * scale],
                      "price": [2.0, 4.0, 2.5]}).write_parquet(tmp_path / f"log-{unit}.parquet")
    pl.DataFrame({"item_id": ["a", "b"], "title": ["A", "B"]}).write_parquet(tmp_path / "items.parquet")
    outs = []
    for unit in ("s", "ms", "us"):
        import_interactions(tmp_path / f"log-{unit}.parquet", tmp_path / "items.parquet", tmp_path / unit,
                            InteractionFormat(price="price"))  # unit read from the magnitude
        outs.append(read_dataset(tmp_path / unit))
    assert outs[0].events.equals(outs[1].events) and outs[0].events.equals(outs[2].events)
    assert outs[0].events["ts"].dt.epoch("s").to_list() == [base_s, base_s + 5, base_s + 60]
    assert outs[0].items["price"].to_list() == [2.5, 4.0]  # each item's latest price in the log


def test_what_cannot_be_imported_is_a_clear_error(tmp_path):
    (tmp_path / "log.csv").write_text("who,item_id,timestamp\nu1,a,1\n")
    (tmp_path / "items.csv").write_text("item_id,title\na,A\n")
    with pytest.raises(InteractionImportError, match=r"no column 'user_id' \(set by --user-column\); the file has: who"):
        import_interactions(tmp_path / "log.csv", tmp_path / "items.csv", tmp_path / "out")
    (tmp_path / "empty.csv").write_text("user_id,item_id,timestamp\nu1,a,never\n")
    with pytest.raises(InteractionImportError, match="no valid interaction.*timestamp unparsable"):
        import_interactions(tmp_path / "empty.csv", tmp_path / "items.csv", tmp_path / "out")
    with pytest.raises(InteractionImportError, match="event-map"):
        InteractionFormat(event_map={"view": "glance"})


def test_the_cli(tmp_path, capsys):
    folder = upstream_files(tmp_path / "shared", seed=1)
    args = ["data", "import", "--format", "interactions", "--interactions", str(folder / "interactions.csv.gz"),
            "--items", str(folder / "items.csv.gz"), "--order-column", "seq_pos", "--unescape-html",
            "--out", str(tmp_path / "out")]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["format"] == "interactions" and summary["events"]["purchase"] > 0
    assert main([*args[:-2], "--user-column", "shopper", "--out", str(tmp_path / "bad")]) == 2
    assert "no column 'shopper' (set by --user-column)" in capsys.readouterr().err


@pytest.mark.skipif(not default_shared_data_dir().is_dir(), reason=f"shared data absent (${SHARED_DATA_ENV})")
def test_the_real_amazon_beauty_files_give_the_named_importers_dataset(tmp_path):
    folder = default_shared_data_dir() / "amazon-beauty-2014"
    import_dataset("amazon-beauty-2014", tmp_path / "named")
    import_interactions(folder / "interactions.csv.gz", folder / "items.csv.gz", tmp_path / "generic", UPSTREAM)
    for table in ("events", "items"):
        a, b = (pl.read_parquet(tmp_path / d / f"{table}.parquet") for d in ("named", "generic"))
        assert a.equals(b), table
