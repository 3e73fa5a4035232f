"""A/B analysis inputs: exposure logs, events, attribution and the per-user table the statistics use.

Exposures are the server's record of each Rank answer, JSON Lines files `exposures-*.jsonl` in the
format of `featurizer.contracts.exposures`, which also reads them (torn last lines skipped, any other bad line
an `ExposureLogError` naming file:line). `read_exposures` here adds what the analysis needs: a
directory without exposure files is an error, and the rows are sorted by ts.

An outcome event (click, add_to_cart, purchase of the data contract) counts for an exposure when
- its `request_id` is that exposure's, the user is the same and the item was in the list (no time
  limit: the client said which answer it acted on); or, for events without a logged request_id,
- same user, item in the exposure's `item_ids` and exposure.ts <= event.ts < exposure.ts + window;
  the latest such exposure takes it (last touch), so an event never counts twice.

`user_table` then sums per user: exposures, exposures with a click / add-to-cart / purchase and
revenue (purchases x item price). Users are the randomisation unit; training/ab/stats.py says why
the statistics work on these per-user sums.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import polars as pl

from featurizer.contracts.experiments import load_experiments
from featurizer.contracts.exposures import FILE_GLOB, read_exposures_report
from featurizer.contracts.schema import read_dataset, read_events, read_items

OUTCOMES = ("click", "add_to_cart", "purchase")
DEFAULT_WINDOW = "30m"
_WINDOW_PART = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_window(text: str) -> timedelta:
    """'30m', '2h', '1d', '90s', '1h30m' -> timedelta (positive)."""
    t = text.strip().lower()
    parts = _WINDOW_PART.findall(t)
    if not parts or "".join(n + u for n, u in parts) != t:
        raise ValueError(f"window {text!r}: use a number and a unit s/m/h/d, e.g. 30m, 2h, 1h30m")
    seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
    if seconds <= 0:
        raise ValueError(f"window {text!r} must be positive")
    return timedelta(seconds=seconds)


def format_window(window: timedelta) -> str:
    s = int(window.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s % size == 0:
            return f"{s // size}{unit}"
    return f"{s}s"


# --------------------------------------------------------------------------- exposures


def read_exposures(path: str | Path | list[str | Path]) -> tuple[pl.DataFrame, int]:
    """All exposures under `path` (a file, or a directory of exposures-*.jsonl; or a list of them:
    the exposure directories of several replicas or workers, merged), sorted by ts (file order
    within one instant), and the number of torn last lines skipped (`featurizer.contracts.exposures`).

    A directory without exposure files raises FileNotFoundError: a report on nothing is a wrong path.
    Repeated request_ids are kept here; `prepare` counts each once."""
    frames, torn = [], 0
    for p in path if isinstance(path, list) else [path]:
        read = read_exposures_report(p)
        if not read.files:
            raise FileNotFoundError(f"{p}: no {FILE_GLOB} files; pass the exposure directory of the server "
                                    "(STATE/exposures) or one exposure file")
        frames.append(read.frame)
        torn += len(read.torn_lines)
    return pl.concat(frames).sort("ts", maintain_order=True), torn


def select_experiment(exposures: pl.DataFrame, name: str | None) -> str:
    """`name`, checked; else the only experiment in the log."""
    counts = dict(exposures.filter(pl.col("experiment") != "").group_by("experiment").len().iter_rows())
    if name is not None:
        if name not in counts:
            have = ", ".join(f"{k} ({v})" for k, v in sorted(counts.items())) or "none"
            raise ValueError(f"experiment {name!r} has no exposures; experiments in the log: {have}")
        return name
    if not counts:
        raise ValueError("no exposure belongs to an experiment (experiment is '' in every record)")
    if len(counts) > 1:
        have = ", ".join(f"{k} ({v} exposures)" for k, v in sorted(counts.items()))
        raise ValueError(f"the log holds several experiments: {have}; choose one with --experiment")
    return next(iter(counts))


# --------------------------------------------------------------------------- configured shares


def parse_shares(text: str) -> dict[str, float]:
    """'control=0.5,treatment=0.5' -> {'control': 0.5, 'treatment': 0.5} (order kept)."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        try:
            share = float(value)
        except ValueError:
            share = -1.0
        if not sep or not name.strip() or not share > 0:
            raise ValueError(f"--shares {text!r}: expected NAME=SHARE pairs with positive shares, e.g. control=0.5,treatment=0.5")
        out[name.strip()] = share
    if not out:
        raise ValueError("--shares is empty")
    return out


def shares_from_experiments(path: str | Path, experiment: str) -> dict[str, float]:
    """Variant shares of one experiment in an experiments file, in file order. The file is read by the
    one parser of the format (`featurizer.contracts.experiments`), without requiring its bundles."""
    exp = load_experiments(path, check_bundles=False).named(experiment)
    return {v.name: v.share for v in exp.variants}


# --------------------------------------------------------------------------- events


def read_outcome_events(path: str | Path, items_path: str | Path | None = None) -> tuple[pl.DataFrame, pl.DataFrame | None]:
    """Events (a contract file, or a data directory) and the items table when there is one."""
    path = Path(path)
    items = None
    if path.is_dir():
        ds = read_dataset(path)
        events, items = ds.events, ds.items
    elif path.is_file():
        events = read_events(path)
    else:
        raise FileNotFoundError(f"{path}: no such events file or data directory")
    if items_path is not None:
        items = read_items(items_path)
    return events, items


# --------------------------------------------------------------------------- attribution


@dataclass
class Attribution:
    events: pl.DataFrame  # exposure_id, event, item_id, via ("request_id" | "window")
    notes: list[str] = field(default_factory=list)


def attribute_events(exposures: pl.DataFrame, events: pl.DataFrame, window: timedelta,
                     logged_request_ids: pl.Series | None = None) -> Attribution:
    """Outcome events matched to `exposures` (which need an `exposure_id`); see the module docstring.

    `logged_request_ids`: every request_id in the exposure log, also other experiments'; an event
    naming one of them is attributed by request_id only (default: the exposures' own ids)."""
    known = (logged_request_ids if logged_request_ids is not None else exposures["request_id"]).unique()
    outcomes = (events.lazy().filter(pl.col("event").cast(pl.Utf8).is_in(OUTCOMES))
                .select("ts", "user_id", "item_id", pl.col("event").cast(pl.Utf8), "request_id"))
    shown = (exposures.lazy().select("exposure_id", "request_id", "user_id", pl.col("ts").alias("exposure_ts"),
                                     pl.col("item_ids").alias("item_id"))
             .explode("item_id", empty_as_null=False).unique(["exposure_id", "item_id"]))
    by_request = pl.col("request_id").is_not_null() & pl.col("request_id").is_in(known.implode())
    direct_candidates = outcomes.filter(by_request)
    direct = direct_candidates.join(shown.select("exposure_id", "request_id", "user_id", "item_id"),
                                    on=["request_id", "user_id", "item_id"], how="inner")
    rest = outcomes.filter(~by_request)
    rest_shown = shown.join(rest.select("user_id", "item_id").unique(), on=["user_id", "item_id"], how="semi")
    windowed = (
        rest.sort("ts")
        .join_asof(rest_shown.select("exposure_id", "user_id", "item_id", "exposure_ts").sort("exposure_ts"),
                   left_on="ts", right_on="exposure_ts", by=["user_id", "item_id"], strategy="backward",
                   check_sortedness=False)
        .filter(pl.col("exposure_id").is_not_null() & (pl.col("ts") - pl.col("exposure_ts") < window))
    )
    cols = ("exposure_id", "event", "item_id")
    own = direct_candidates.filter(pl.col("request_id").is_in(exposures["request_id"].implode()))
    frames = pl.collect_all([direct.select(*cols).with_columns(pl.lit("request_id").alias("via")),
                             windowed.select(*cols).with_columns(pl.lit("window").alias("via")),
                             own.select(pl.len())])
    attributed = pl.concat(frames[:2])
    notes = []
    orphans = int(frames[2].item()) - frames[0].height
    if orphans:
        notes.append(f"{orphans} outcome events name a logged request_id but another user or an item not in "
                     "that list; they were not counted")
    return Attribution(attributed, notes)


def exposure_outcomes(exposures: pl.DataFrame, attributed: pl.DataFrame, items: pl.DataFrame | None) -> pl.DataFrame:
    """`exposures` plus clicked / carted / purchased flags and revenue (purchases x price, 0 without a price)."""
    prices = (items.select("item_id", "price") if items is not None
              else pl.DataFrame(schema={"item_id": pl.Utf8, "price": pl.Float64}))
    per = (
        attributed.lazy().join(prices.lazy(), on="item_id", how="left")
        .group_by("exposure_id")
        .agg((pl.col("event") == "click").any().alias("clicked"),
             (pl.col("event") == "add_to_cart").any().alias("carted"),
             (pl.col("event") == "purchase").any().alias("purchased"),
             pl.col("price").filter(pl.col("event") == "purchase").sum().alias("revenue"))
    )
    return (exposures.lazy().join(per, on="exposure_id", how="left")
            .with_columns(pl.col("clicked", "carted", "purchased").fill_null(False), pl.col("revenue").fill_null(0.0))
            .collect())


PRE_COLUMNS = ("pre_lists", "pre_clicks", "pre_carts", "pre_purchases", "pre_revenue", "has_pre")


def team_credit(exposures: pl.DataFrame, attributed: pl.DataFrame) -> dict[str, pl.DataFrame]:
    """Per interleaved variant (its exposures carry `teams`), per user: `a_clicks` and `b_clicks`, the
    attributed clicks on items each team put in the list. Users of the arm without a click get zeros."""
    if "teams" not in exposures.columns:
        return {}
    inter = exposures.filter(pl.col("teams").list.len() > 0)
    if not inter.height:
        return {}
    shown = (inter.select("exposure_id", "user_id", "variant", pl.col("item_ids").alias("item_id"),
                          pl.col("teams").alias("team")).explode("item_id", "team", empty_as_null=True))
    clicks = attributed.filter(pl.col("event") == "click").select("exposure_id", "item_id")
    credited = clicks.join(shown, on=["exposure_id", "item_id"], how="inner")
    users = inter.select("user_id", "variant").unique()
    per = credited.group_by("user_id").agg((pl.col("team") == "A").sum().cast(pl.Float64).alias("a_clicks"),
                                           (pl.col("team") == "B").sum().cast(pl.Float64).alias("b_clicks"))
    table = users.join(per, on="user_id", how="left").with_columns(pl.col("a_clicks", "b_clicks").fill_null(0.0))
    return {v: part.drop("variant").sort("user_id") for (v,), part in table.group_by("variant")}


def pre_period(first_exposure: pl.DataFrame, events: pl.DataFrame, items: pl.DataFrame | None,
               lookback: timedelta) -> pl.DataFrame:
    """Per user, what they did in the `lookback` before their first exposure in the experiment (CUPED's
    covariates): impression lists seen (distinct request_ids of impression events), clicks, add-to-carts,
    purchases, revenue, and `has_pre` (any event at all then). Users with nothing get zeros and
    has_pre = 0. `first_exposure`: user_id, first_ts."""
    prices = (items.select("item_id", "price") if items is not None
              else pl.DataFrame(schema={"item_id": pl.Utf8, "price": pl.Float64}))
    ev = (events.lazy().select("ts", "user_id", "item_id", pl.col("event").cast(pl.Utf8), "request_id")
          .join(first_exposure.lazy(), on="user_id", how="inner")
          .filter((pl.col("ts") < pl.col("first_ts")) & (pl.col("ts") >= pl.col("first_ts") - lookback))
          .join(prices.lazy(), on="item_id", how="left"))
    per = ev.group_by("user_id").agg(
        pl.col("request_id").filter(pl.col("event") == "impression").n_unique().cast(pl.Float64).alias("pre_lists"),
        (pl.col("event") == "click").sum().cast(pl.Float64).alias("pre_clicks"),
        (pl.col("event") == "add_to_cart").sum().cast(pl.Float64).alias("pre_carts"),
        (pl.col("event") == "purchase").sum().cast(pl.Float64).alias("pre_purchases"),
        pl.col("price").filter(pl.col("event") == "purchase").sum().fill_null(0.0).alias("pre_revenue"),
        pl.lit(1.0).alias("has_pre"))
    return (first_exposure.lazy().select("user_id").join(per, on="user_id", how="left")
            .with_columns(pl.col(*PRE_COLUMNS).fill_null(0.0)).collect())


def user_table(outcomes: pl.DataFrame) -> pl.DataFrame:
    """One row per user: variant, exposures, click_exposures, cart_exposures, purchase_exposures, revenue."""
    return (
        outcomes.lazy().group_by("user_id")
        .agg(pl.col("variant").first(), pl.len().alias("exposures"),
             pl.col("clicked").sum().alias("click_exposures"), pl.col("carted").sum().alias("cart_exposures"),
             pl.col("purchased").sum().alias("purchase_exposures"), pl.col("revenue").sum())
        .sort("user_id").collect()
    )


@dataclass
class Prepared:
    """What the report needs: the per-user table and the facts behind it."""

    users: pl.DataFrame
    experiment: str
    exposures: int
    bundle_versions: dict[str, list[str]]
    time_range: tuple[str, str]
    prices: bool
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    # interleaved arms: variant -> per user, clicks credited to team A's and team B's items (`team_credit`)
    interleaving: dict[str, pl.DataFrame] = field(default_factory=dict)


def prepare(exposures: pl.DataFrame, events: pl.DataFrame, items: pl.DataFrame | None, window: timedelta,
            experiment: str | None = None, cuped_lookback: timedelta | None = None) -> Prepared:
    """Select the experiment, dedupe, keep each user in their first variant, attribute, sum per user;
    with `cuped_lookback`, add each user's pre-period columns (`pre_period`)."""
    name = select_experiment(exposures, experiment)
    notes: list[str] = []
    warnings: list[str] = []
    exp = exposures.filter(pl.col("experiment") == name).sort("ts", maintain_order=True)
    n_raw = exp.height
    exp = exp.unique("request_id", keep="first", maintain_order=True)
    if exp.height < n_raw:
        notes.append(f"{n_raw - exp.height} exposures repeated a request_id and were counted once")
    first = exp.group_by("user_id").agg(pl.col("variant").first().alias("first_variant"),
                                        pl.col("variant").n_unique().alias("n_variants"))
    switched = first.filter(pl.col("n_variants") > 1).height
    if switched:
        exp = exp.join(first.select("user_id", "first_variant"), on="user_id")
        dropped = exp.filter(pl.col("variant") != pl.col("first_variant")).height
        exp = exp.filter(pl.col("variant") == pl.col("first_variant")).drop("first_variant")
        warnings.append(f"{switched} users ({switched / first.height:.2%}) were exposed under more than one variant "
                        f"(an assignment bug or a changed salt/shares?); each counts in their first variant, "
                        f"their {dropped} other exposures were dropped")
    exp = exp.with_row_index("exposure_id")
    attribution = attribute_events(exp, events, window, exposures["request_id"])
    notes += attribution.notes
    via = dict(attribution.events.group_by("via").len().iter_rows())
    notes.append(f"attributed outcome events: {via.get('request_id', 0)} by request_id, "
                 f"{via.get('window', 0)} by user + item within {format_window(window)} of the exposure")
    if events.height:
        last_event = events["ts"].max()
        late = exp.filter(pl.col("ts") + window > last_event).height
        if late:
            notes.append(f"{late} exposures ({late / exp.height:.1%}) are less than {format_window(window)} before "
                         f"the last event ({last_event:%Y-%m-%d %H:%M:%S} UTC); their outcomes may be incomplete")
    prices = items is not None and items["price"].null_count() < items.height
    if prices:
        bought = attribution.events.filter(pl.col("event") == "purchase").join(items.select("item_id", "price"),
                                                                                on="item_id", how="left")
        missing = bought["price"].null_count()
        if missing:
            notes.append(f"{missing} attributed purchases have no item price and add 0 to revenue")
    outcomes = exposure_outcomes(exp, attribution.events, items)
    versions = {v: sorted(s) for v, s in exp.group_by("variant").agg(pl.col("bundle_version").unique()).iter_rows()}
    users = user_table(outcomes)
    interleaving = team_credit(exp, attribution.events)
    if cuped_lookback is not None and cuped_lookback > timedelta(0):
        first = exp.group_by("user_id").agg(pl.col("ts").min().alias("first_ts"))
        users = users.join(pre_period(first, events, items, cuped_lookback), on="user_id", how="left")
    return Prepared(users=users, experiment=name, exposures=exp.height, bundle_versions=versions,
                    time_range=(f"{exp['ts'].min():%Y-%m-%dT%H:%M:%SZ}", f"{exp['ts'].max():%Y-%m-%dT%H:%M:%SZ}"),
                    prices=prices, notes=notes, warnings=warnings, interleaving=interleaving)
