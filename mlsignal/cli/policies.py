"""`mlsignal policies set|list|delete`: the retrain policies of the training service, which retrain a market on a
schedule as ordinary production jobs."""

from __future__ import annotations

import argparse
from datetime import timedelta

from mlsignal.cli.training import LABEL_CHOICES, _target_arg, _training_client, _ts, client_errors, table
from shared.timeframes import TIMEFRAME_MS, format_duration, parse_duration


def register(sub) -> None:
    policies = sub.add_parser(
        "policies",
        help="retrain policies: retrain a market every so often on its latest candles (`policies set|list|delete`)",
        description=(
            "A retrain policy makes the training service train a production model of one market every EVERY on the "
            "last WINDOW of closed candles; each model goes through the promotion gate like any other. A policy is "
            "skipped while no candle arrived after its market's last model, and a failed job is retried at the next "
            "due time."
        ),
    )
    actions = policies.add_subparsers(dest="policies_command", metavar="set|list|delete", required=True)

    put = actions.add_parser(
        "set", help="create or replace the retrain policy of a market (a new policy is due at once)")
    put.add_argument("symbol", metavar="SYMBOL", help="market symbol as stored, like BTC/USDT")
    put.add_argument("timeframe", metavar="TIMEFRAME", help=f"one of {' '.join(TIMEFRAME_MS)}")
    put.add_argument("--every", required=True, type=_duration, metavar="DURATION",
                     help="how often to retrain, like 12h, 1d or 7d (at least one candle)")
    put.add_argument("--window", required=True, type=_duration, metavar="DURATION",
                     help="how much history each model is trained on, ending at the last closed candle, like 365d")
    put.add_argument("--horizon", type=int, default=0, metavar="BARS",
                     help="label horizon in candles (default: the service default, 24)")
    put.add_argument("--threshold", type=float, default=0.0,
                     help="label threshold as a fraction, 0.02 means 2%% (default: the service default, 0.02)")
    put.add_argument("--label-kind", choices=LABEL_CHOICES, default=None,
                     help="fixed-horizon or triple-barrier labels (default: fixed-horizon)")
    put.add_argument("--trees", type=int, default=0, metavar="N", help="number of trees (default: 200)")
    put.add_argument("--max-depth", type=int, default=0, metavar="N", help="tree depth, -1 for unlimited (default: 6)")
    put.add_argument("--min-samples-leaf", type=int, default=0, metavar="N",
                     help="minimum samples per leaf (default: 25)")
    put.add_argument("--class-weight", choices=("none", "balanced"), help="class weighting (default: none)")
    put.add_argument("--seed", type=int, help="random seed of the forest (default: 42)")
    put.add_argument("--paused", action="store_true", help="keep the policy but never run it (set it again without "
                                                           "--paused to resume)")
    put.add_argument("--cross-validate", action="store_true",
                     help="also run the purged k-fold cross-validation on every retrain (five more forest fits; the "
                          "gate decides on the held-back test slice either way)")
    _target_arg(put)
    put.set_defaults(func=_set)

    show = actions.add_parser("list", help="the retrain policies, their next due time and last outcome")
    show.add_argument("--symbol", default="", help="only this symbol")
    show.add_argument("--timeframe", default="", metavar="TF", help="only this timeframe")
    _target_arg(show)
    show.set_defaults(func=_list)

    drop = actions.add_parser("delete", help="delete the retrain policy of a market (a job it started keeps running)")
    drop.add_argument("symbol", metavar="SYMBOL", help="market symbol, like BTC/USDT")
    drop.add_argument("timeframe", metavar="TIMEFRAME", help=f"one of {' '.join(TIMEFRAME_MS)}")
    _target_arg(drop)
    drop.set_defaults(func=_delete)


def _duration(text: str) -> timedelta:
    try:
        return timedelta(milliseconds=parse_duration(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _summary(p, due: bool = True) -> str:
    state = ", paused" if p.paused else f", next due {_ts(p, 'next_run_at')} UTC" if due else ""
    cv = ", cross-validated" if p.cross_validate else ""
    return (f"{p.symbol} {p.timeframe}: every {format_duration(p.every.ToMilliseconds())} on the last "
            f"{format_duration(p.window.ToMilliseconds())}{cv}{state}")


@client_errors
def _set(args) -> int:
    with _training_client(args) as client:
        policy = client.set_policy(
            args.symbol, args.timeframe, args.every, args.window,
            horizon_bars=args.horizon, threshold=args.threshold, label_kind=args.label_kind,
            n_estimators=args.trees, max_depth=args.max_depth, min_samples_leaf=args.min_samples_leaf,
            class_weight=args.class_weight, random_state=args.seed, paused=args.paused,
            cross_validate=args.cross_validate,
        )
    print(f"policy {_summary(policy)}")
    return 0


@client_errors
def _list(args) -> int:
    from mlsignal.v1 import common_pb2

    with _training_client(args) as client:
        found = client.list_policies(args.symbol, args.timeframe)
    if not found:
        print("no retrain policies")
        return 0
    rows = []
    for p in found:
        label = "triple-barrier" if p.label.kind == common_pb2.LABEL_KIND_TRIPLE_BARRIER else "fixed-horizon"
        rows.append((p.symbol, p.timeframe, format_duration(p.every.ToMilliseconds()),
                     format_duration(p.window.ToMilliseconds()), f"{p.label.horizon_bars}", f"{p.label.threshold:g}",
                     label, f"{p.params.n_estimators}", "yes" if p.cross_validate else "no",
                     "yes" if p.paused else "no", _ts(p, "next_run_at"),
                     p.last_job_id or "-", p.last_outcome or "-"))
    print(table(("symbol", "tf", "every", "window", "horizon", "threshold", "label", "trees", "cv", "paused",
                 "next due (UTC)", "last job", "last outcome"), rows))
    return 0


@client_errors
def _delete(args) -> int:
    with _training_client(args) as client:
        policy = client.delete_policy(args.symbol, args.timeframe)
    print(f"deleted policy {_summary(policy, due=False)}")
    return 0
