"""`semrank ab report`: analyse an A/B experiment from exposure logs and events.

    semrank ab report --exposures logs/ --events data/ --experiment encoder-ft-vs-frozen \
        --experiments experiments.toml --out-dir runs/ab [--window 30m] [--control control] [--fail-on-srm]

See docs/ab_testing.md for attribution and statistics.
"""

from __future__ import annotations

import argparse
import logging
import sys
from datetime import timedelta
from pathlib import Path

log = logging.getLogger(__name__)

EXIT_SRM = 3


def _iso_time(text: str):
    from datetime import datetime

    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO time such as 2026-01-20T00:00:00Z ({e})") from None


def register(sub) -> None:
    ab = sub.add_parser("ab", help="A/B experiment analysis").add_subparsers(dest="ab_cmd", required=True)
    s = ab.add_parser(
        "report", help="per-variant metrics with 95%% CIs, tests against control and a sample-ratio check",
        description="Joins Rank exposures (exposures-*.jsonl) to the clicks, add-to-carts and purchases that "
                    "follow them and compares variants with users as the unit: CTR, add-to-cart and conversion "
                    "rates per exposure (delta method), shares of users with a click / purchase (two-proportion "
                    "z-test) and revenue per user (Welch t-test). Writes OUT_DIR/ab-<experiment>.{md,json,png}.")
    s.add_argument("--exposures", required=True, type=Path, nargs="+",
                   help="exposures JSONL files or directories of exposures-*.jsonl files; several (the state "
                        "directories' exposures/ of every replica) are merged")
    s.add_argument("--events", required=True, type=Path,
                   help="events in the data contract: a parquet/CSV file or a data directory (items read too)")
    s.add_argument("--items", type=Path, default=None, help="items file with prices, for revenue per user")
    s.add_argument("--experiment", default=None, help="experiment name (default: the only one in the log)")
    s.add_argument("--window", default="30m", help="attribution window after an exposure, e.g. 30m, 2h, 1d "
                                                   "(default 30m); events carrying the exposure's request_id "
                                                   "are attributed without it")
    s.add_argument("--control", default=None, help='control variant (default "control", else the first variant)')
    shares = s.add_mutually_exclusive_group()
    shares.add_argument("--shares", default=None, metavar="NAME=SHARE,...",
                        help="configured traffic shares for the sample-ratio check, e.g. control=0.5,treatment=0.5 "
                             "(default: equal shares)")
    shares.add_argument("--experiments", type=Path, default=None, metavar="FILE",
                        help="the serving experiments file (TOML/JSON); shares are taken from it")
    s.add_argument("--correction", choices=("holm", "bh", "none"), default="holm",
                   help="adjust p-values over every non-guardrail metric x variant: holm (default; no false call in the "
                        "family with prob. >= 1 - alpha), bh (Benjamini-Hochberg: false-discovery rate), none")
    s.add_argument("--min-users", type=int, default=100, metavar="N",
                   help="no verdict until each arm has N users with an attributed event (default 100)")
    s.add_argument("--cuped-days", type=float, default=14.0, metavar="DAYS",
                   help="CUPED: adjust each comparison by what the users did in the DAYS before their first exposure "
                        "(default 14; 0 turns it off); the report says how much the variance fell")
    s.add_argument("--sequential", type=int, default=None, metavar="N_USERS",
                   help="always-valid inference: calls from confidence sequences tuned for about N_USERS users at the "
                        "end, so the report may be read every day (docs/ab_testing.md)")
    s.add_argument("--as-of", type=_iso_time, default=None, metavar="ISO",
                   help="replay the report at this past time (exposures and events up to it)")
    s.add_argument("--timeline", action="store_true",
                   help="also replay the report at the end of each day and plot the primary metric's interval "
                        "narrowing (ab-<experiment>-timeline.png; with --sequential, the sequence beside it)")
    s.add_argument("--fail-on-srm", action="store_true",
                   help=f"exit with status {EXIT_SRM} when the sample-ratio check fails (p < 0.001)")
    s.add_argument("--out-dir", required=True, type=Path, help="writes ab-<experiment>.md, .json and .png here")
    s.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the JSON report here")
    s.set_defaults(func=cmd_ab_report)


def cmd_ab_report(args) -> int:
    from training.ab.prepare import (
        parse_shares,
        parse_window,
        prepare,
        read_exposures,
        read_outcome_events,
        shares_from_experiments,
    )
    from featurizer.contracts.exposures import read_losses
    from training.ab.render import markdown, plot_timeline, report_stem, write_report
    from training.ab.report import as_of, build_report, timeline

    window = parse_window(args.window)
    exposures, torn = read_exposures(list(args.exposures))
    events, items = read_outcome_events(args.events, args.items)
    if args.as_of is not None:  # replay: what the logs held then
        exposures, events = as_of(exposures, events, args.as_of)
        if not exposures.height:
            raise ValueError(f"--as-of {args.as_of.isoformat()}: no exposures by then")
    if args.cuped_days < 0:
        raise ValueError(f"--cuped-days {args.cuped_days}: must be >= 0 (0 turns CUPED off)")
    lookback = timedelta(days=args.cuped_days) if args.cuped_days > 0 else None
    prep = prepare(exposures, events, items, window, args.experiment, lookback)
    if torn:
        prep.notes.append(f"{torn} torn last line(s) of exposure files skipped (writes cut short by a crash "
                          "or still in progress; the log names them)")
    shares, source = None, None
    if args.shares:
        shares, source = parse_shares(args.shares), f"--shares {args.shares}"
    elif args.experiments:
        shares, source = shares_from_experiments(args.experiments, prep.experiment), str(args.experiments)
    lost: dict[str, int] = {}
    for path in args.exposures:  # what each server's writer dropped, per variant of this experiment
        for (experiment, variant), n in read_losses(path).items():
            if experiment == prep.experiment:
                lost[variant] = lost.get(variant, 0) + n
    kw = {"lost": lost, "cuped_days": args.cuped_days or None, "control": args.control, "shares": shares, "shares_source": source, "correction": args.correction,
          "min_users": args.min_users, "sequential": args.sequential}
    report = build_report(prep, window, **kw)
    if args.timeline:
        looks = timeline(exposures, events, items, window, prep.experiment,
                         {k: v for k, v in kw.items() if k != "lost"},  # losses carry no time: the final report only
                         cuped_lookback=lookback)
        report["timeline"] = looks
    paths = write_report(report, args.out_dir, args.json)
    if args.timeline:
        paths["timeline"] = plot_timeline(report["timeline"], report, Path(args.out_dir) / f"{report_stem(prep.experiment)}-timeline.png")
    print(markdown(report))
    log.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    if report["srm"]["flagged"]:
        banner = "!" * 78
        print(f"{banner}\nWARNING: {report['warnings'][0]}\n{banner}", file=sys.stderr)
        if args.fail_on_srm:
            return EXIT_SRM
    return 0
