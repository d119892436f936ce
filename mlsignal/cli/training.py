"""`mlsignal train|jobs|models|cancel`: start and follow training jobs, list jobs and registered models, and change
or show which model serves (`models promote|rollback|history`)."""

from __future__ import annotations

import argparse
import functools
import sys

from shared.labels import CLASSES
from shared.timeframes import TIMEFRAME_MS, ms_to_datetime, parse_time

ERROR_WIDTH = 60
REASON_WIDTH = 60
# Rows of the metrics table: (label, model metric, prior metric).
METRIC_ROWS = (
    ("log_loss", "log_loss", "prior_log_loss"),
    ("brier", "brier", "prior_brier"),
    ("balanced_accuracy", "balanced_accuracy", "prior_balanced_accuracy"),
)
LABEL_CHOICES = ("fixed-horizon", "triple-barrier")


def register(sub) -> None:
    tr = sub.add_parser(
        "train",
        help="train a model on stored candles and follow the job to its end",
        description=(
            "Start a training job on the training service and follow it with a progress bar. At the end print the "
            "job id, the model id and the out-of-sample metrics of the model next to the class-prior baseline. "
            "Exit status 0 when the job succeeded, 1 when it failed or was cancelled, 2 when the request was refused."
        ),
    )
    tr.add_argument("--symbol", required=True, help="market symbol as stored, like BTC/USDT")
    tr.add_argument("--timeframe", required=True, metavar="TF", help=f"one of {' '.join(TIMEFRAME_MS)}")
    tr.add_argument("--start", type=_time_arg, help="first candle open time, ISO-8601 UTC (default: first stored)")
    tr.add_argument("--end", type=_time_arg,
                    help="end of the window, exclusive, ISO-8601 UTC (default: after the last)")
    tr.add_argument("--horizon", type=int, default=0, metavar="BARS",
                    help="label horizon in candles (default: the service default, 24)")
    tr.add_argument("--threshold", type=float, default=0.0,
                    help="label threshold as a fraction, 0.02 means 2%% (default: the service default, 0.02)")
    tr.add_argument("--label", choices=LABEL_CHOICES, default=None,
                    help="fixed-horizon: the return to the close --horizon candles later decides; triple-barrier: "
                         "whichever of +-threshold the closes cross first within --horizon candles "
                         "(default: fixed-horizon)")
    tr.add_argument("--volatility-bars", type=int, default=0, metavar="BARS",
                    help="volatility-scaled barrier instead of --threshold: the standard deviation of the last BARS "
                         "1-bar returns (with --volatility-multiple; research models only, see --research)")
    tr.add_argument("--volatility-multiple", type=float, default=0.0, metavar="K",
                    help="the barrier is K x that volatility x sqrt(horizon)")
    tr.add_argument("--feature-set", default="", metavar="NAME",
                    help="ohlcv-v1 (default, 100 candles of warm-up) or ohlcv-v2 (adds context over 168 and 720 "
                         "candles; predictions need 720 candles of history)")
    tr.add_argument("--research", action="store_true",
                    help="register a RESEARCH model: it never serves unless a request pins it by model id")
    tr.add_argument("--trees", type=int, default=0, metavar="N", help="number of trees (default: 200)")
    tr.add_argument("--max-depth", type=int, default=0, metavar="N", help="tree depth, -1 for unlimited (default: 6)")
    tr.add_argument("--min-samples-leaf", type=int, default=0, metavar="N",
                    help="minimum samples per leaf (default: 25; each tree sees about 1/horizon of the rows)")
    tr.add_argument("--class-weight", choices=("none", "balanced"), help="class weighting (default: none)")
    tr.add_argument("--seed", type=int, help="random seed of the forest (default: 42)")
    _target_arg(tr)
    tr.add_argument("--no-wait", action="store_true", help="print the job id and return without following the job")
    tr.add_argument("--timeout", type=float, metavar="SECONDS",
                    help="stop following after this long and exit 1; the job keeps running (default: no limit)")
    tr.set_defaults(func=_train)

    jobs = sub.add_parser("jobs", help="list training jobs, newest first (`jobs show JOB_ID`: one job in full)")
    jobs_sub = jobs.add_subparsers(dest="jobs_command", metavar="show")
    show = jobs_sub.add_parser("show", help="one job in full: request, state, timings, the whole error, metrics")
    show.add_argument("job_id", metavar="JOB_ID")
    _target_arg(show)
    show.set_defaults(func=_job_show)
    jobs.add_argument("--symbol", default="", help="only this symbol")
    jobs.add_argument("--timeframe", default="", metavar="TF", help="only this timeframe")
    jobs.add_argument("--limit", type=int, default=0, help="most jobs to show (default: 100)")
    _target_arg(jobs)
    jobs.set_defaults(func=_jobs)


    models = sub.add_parser(
        "models",
        help="list registered models, newest first, with their stage (`SERVING *` marks the one serving) "
             "(`models promote|rollback|history`: change or show which model serves)",
    )
    models_sub = models.add_subparsers(dest="models_command", metavar="promote|rollback|history|compare")
    promote = models_sub.add_parser(
        "promote", help="make a model (any stage) the one serving its symbol and timeframe; the one serving before "
                        "is retired")
    promote.add_argument("model_id", metavar="MODEL_ID")
    promote.add_argument("--reason", default="", help="why, kept in the stage history (default: promoted by operator)")
    _target_arg(promote)
    promote.set_defaults(func=_models_promote)
    rollback = models_sub.add_parser(
        "rollback", help="retire the serving model and bring back the one that served before it")
    rollback.add_argument("--symbol", required=True, help="market symbol, like BTC/USDT")
    rollback.add_argument("--timeframe", required=True, metavar="TF", help=f"one of {' '.join(TIMEFRAME_MS)}")
    rollback.add_argument("--reason", default="",
                          help="why, kept in the stage history (default: rolled back by operator)")
    _target_arg(rollback)
    rollback.set_defaults(func=_models_rollback)
    history = models_sub.add_parser(
        "history", help="every stage change of a market's models, oldest first, with its time and reason "
                        "(reads MLSIGNAL_DATABASE_URL)")
    history.add_argument("--symbol", required=True, help="market symbol, like BTC/USDT")
    history.add_argument("--timeframe", required=True, metavar="TF", help=f"one of {' '.join(TIMEFRAME_MS)}")
    history.add_argument("--limit", type=int, default=0, help="only the newest N changes (default: all)")
    _target_arg(history)
    history.set_defaults(func=_models_history)
    compare = models_sub.add_parser(
        "compare", help="the live test of a model against a baseline on the candles both have scored (what promotes "
                        "or rejects a shadow)")
    compare.add_argument("model_id", metavar="MODEL", nargs="?", default="",
                         help="the challenger (empty or '': the baseline's class prior)")
    compare.add_argument("baseline", metavar="BASELINE", nargs="?", default="",
                         help="the baseline (default: the model serving the market)")
    compare.add_argument("--symbol", required=True, help="market symbol, like BTC/USDT")
    compare.add_argument("--timeframe", required=True, metavar="TF", help=f"one of {' '.join(TIMEFRAME_MS)}")
    compare.add_argument("--target", metavar="ADDR",
                         help="inference service address (default: MLSIGNAL_INFERENCE_ADDR, 127.0.0.1:50052)")
    from mlsignal.cli.security import add_security_arguments

    add_security_arguments(compare)
    compare.set_defaults(func=_models_compare)
    models.add_argument("--symbol", default="", help="only this symbol")
    models.add_argument("--timeframe", default="", metavar="TF", help="only this timeframe")
    _target_arg(models)
    models.set_defaults(func=_models)

    cancel = sub.add_parser("cancel", help="cancel a queued or running training job")
    cancel.add_argument("job_id", metavar="JOB_ID")
    _target_arg(cancel)
    cancel.set_defaults(func=_cancel)


def _target_arg(p: argparse.ArgumentParser) -> None:
    from mlsignal.cli.security import add_security_arguments

    p.add_argument("--target", metavar="ADDR",
                   help="training service address (default: MLSIGNAL_TRAINING_ADDR, 127.0.0.1:50051)")
    add_security_arguments(p)


def _time_arg(text: str) -> int:
    try:
        return parse_time(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def client_errors(fn):
    """Report a refused call as `error: <STATUS>: <details>` on stderr with exit status 2."""

    @functools.wraps(fn)
    def wrapper(args) -> int:
        from mlsignal.client import MlsignalClientError

        try:
            return fn(args)
        except MlsignalClientError as exc:
            status = exc.code.name if exc.code is not None else "ERROR"
            note = f" ({exc.note})" if exc.note else ""
            print(f"error: {status}: {exc.details}{note}", file=sys.stderr)
            return 2
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    return wrapper


def _training_client(args):
    from mlsignal.cli.security import security_kwargs
    from mlsignal.client import TrainingClient
    from shared.settings import Settings

    target = args.target or Settings.from_env().training_addr
    return TrainingClient(target, **security_kwargs(args))


@client_errors
def _train(args) -> int:
    from tqdm import tqdm

    from mlsignal.client import DeadlineExceededError, TrainingFailedError
    from mlsignal.v1 import training_pb2

    with _training_client(args) as client:
        handle = client.train(
            args.symbol,
            args.timeframe,
            args.start,
            args.end,
            horizon_bars=args.horizon,
            threshold=args.threshold,
            n_estimators=args.trees,
            max_depth=args.max_depth,
            min_samples_leaf=args.min_samples_leaf,
            class_weight=args.class_weight,
            random_state=args.seed,
            label_kind=args.label,
            volatility_bars=args.volatility_bars,
            volatility_multiple=args.volatility_multiple,
            purpose="research" if args.research else "production",
            feature_set=args.feature_set,
        )
        if args.no_wait:
            print(f"job {handle.job_id} queued")
            return 0
        bar = tqdm(total=100, desc=handle.state.stage or "queued", unit="%", file=sys.stderr,
                   bar_format="{desc:<12} {percentage:3.0f}%|{bar}| [{elapsed}]")

        def on_progress(job) -> None:
            bar.n = min(100.0, max(0.0, round(job.progress * 100, 1)))
            bar.set_description(job.stage or "", refresh=False)
            bar.refresh()

        try:
            job = handle.wait(on_progress, timeout=args.timeout)
        except DeadlineExceededError:
            bar.close()
            print(f"job {handle.job_id} did not finish within {args.timeout:g} s; it keeps running on the service "
                  f"(mlsignal jobs show {handle.job_id}; mlsignal cancel {handle.job_id} stops it)", file=sys.stderr)
            return 1
        except TrainingFailedError as exc:
            bar.close()
            job = exc.job
            state = "FAILED" if job.state == training_pb2.JOB_STATE_FAILED else "CANCELLED"
            print(f"job {job.job_id} {state}: {job.error or '(no message)'}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            bar.close()
            print(f"stopped following job {handle.job_id}; it keeps running on the service "
                  f"(mlsignal cancel {handle.job_id} stops it)", file=sys.stderr)
            return 130
        except BaseException:
            bar.close()
            raise
        bar.close()
        from mlsignal.client import model_stage_name

        info = next((m for m in client.list_models(args.symbol, args.timeframe) if m.model_id == job.model_id), None)
    print(f"job    {job.job_id}")
    print(f"model  {job.model_id}")
    if info is not None:  # what the model became: SERVING, SHADOW (until the live test decides), REJECTED, ...
        print(f"stage  {model_stage_name(info.stage)}: {info.stage_reason}")
    print()
    print(metrics_table(job.metrics))
    return 0


def metrics_table(metrics) -> str:
    """The out-of-sample metrics of a job or model: model against the class-prior baseline, then the rest."""
    rows = [(label, _num(metrics.get(m)), _num(metrics.get(p))) for label, m, p in METRIC_ROWS]
    lines = [table(("metric (test)", "model", "prior"), rows)]
    lines.append("")
    extra = [
        ("log_loss_ratio", _num(metrics.get("log_loss_ratio")), "model / prior log loss; below 1 beats the prior"),
        ("shrink_weight", _num(metrics.get("shrink_weight")), "weight on the forest against the prior"),
    ]
    if metrics.get("cv_folds"):
        extra.append(("cv log_loss_ratio", f"{_num(metrics.get('cv_log_loss_ratio_mean'))} ± "
                      f"{_num(metrics.get('cv_log_loss_ratio_std'))}",
                      f"purged {int(metrics['cv_folds'])}-fold cross-validation: mean ± std"))
    if metrics.get("dropped_gap_labels"):
        extra.append(("dropped labels", f"{int(metrics['dropped_gap_labels'])}",
                      f"horizon spans missing candles ({int(metrics.get('window_missing_candles', 0))} missing)"))
    balance = " ".join(f"{name} {_pct(metrics.get(f'test_class_{name}'))}" for name in CLASSES)
    extra.append(("test classes", balance, "class balance of the test part"))
    lines.append(table(("", "value", "meaning"), extra))
    if metrics.get("beats_prior") == 0.0:
        lines.append("")
        lines.append("warning: on its test part this model did not beat the class prior; its probabilities add no "
                     "information there (see README, Probability quality)")
    return "\n".join(lines)


@client_errors
def _jobs(args) -> int:
    from mlsignal.client import job_state_name

    with _training_client(args) as client:
        jobs = client.list_jobs(args.symbol, args.timeframe, args.limit)
    if not jobs:
        print("no training jobs")
        return 0
    rows = []
    for j in jobs:
        rows.append((
            j.job_id,
            job_state_name(j.state),
            j.stage,
            f"{j.progress * 100:.0f}",
            j.request.symbol,
            j.request.timeframe,
            _ts(j, "created_at"),
            j.model_id or "-",
            _truncate(j.error, ERROR_WIDTH) or "-",  # `mlsignal jobs show JOB_ID` prints it whole
        ))
    print(table(("job id", "state", "stage", "%", "symbol", "tf", "created", "model id", "error"), rows))
    return 0


@client_errors
def _job_show(args) -> int:
    from google.protobuf import json_format

    from mlsignal.client import job_state_name

    with _training_client(args) as client:
        job = client.get_job(args.job_id)
    req = job.request
    rows = [
        ("job id", job.job_id),
        ("state", job_state_name(job.state)),
        ("stage", job.stage or "-"),
        ("progress", f"{job.progress * 100:.0f}%"),
        ("market", f"{req.symbol} {req.timeframe}"),
        ("window", f"{_ts(req, 'start_time')} .. {_ts(req, 'end_time')}"),
        ("label", f"horizon {req.label.horizon_bars}, threshold {req.label.threshold:g}"),
        ("params", json_format.MessageToJson(req.params, indent=None, preserving_proto_field_name=True)),
        ("created", _ts(job, "created_at")),
        ("started", _ts(job, "started_at")),
        ("finished", _ts(job, "finished_at")),
        ("model id", job.model_id or "-"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    if job.error:
        print(f"{'error':<{width}}  {job.error}")
    if job.metrics:
        print()
        print(metrics_table(job.metrics))
    return 0


@client_errors
def _models(args) -> int:
    from mlsignal.client import model_stage_name
    from mlsignal.v1 import common_pb2

    with _training_client(args) as client:
        models = client.list_models(args.symbol, args.timeframe)
    if not models:
        print("no models")
        return 0
    rows = []
    for m in models:
        window = f"{_ts(m, 'train_start')} .. {_ts(m, 'train_end')}"
        loss = f"{_num(m.metrics.get('log_loss'))} vs {_num(m.metrics.get('prior_log_loss'))}"
        stage = model_stage_name(m.stage) + (" *" if m.stage == common_pb2.MODEL_STAGE_SERVING else "")
        rows.append((m.model_id, m.symbol, m.timeframe, stage, _ts(m, "created_at"), window,
                     str(m.label.horizon_bars), f"{m.label.threshold:g}", loss,
                     _truncate(m.stage_reason, REASON_WIDTH)))
    print(table(("model id", "symbol", "tf", "stage", "created", "train window", "horizon", "threshold",
                 "log_loss vs prior", "stage reason"), rows))
    return 0


@client_errors
def _models_promote(args) -> int:
    from mlsignal.client import model_stage_name

    with _training_client(args) as client:
        m = client.promote(args.model_id, args.reason)
    print(f"model {m.model_id} is now {model_stage_name(m.stage)} for {m.symbol} {m.timeframe}: {m.stage_reason}")
    return 0


@client_errors
def _models_rollback(args) -> int:
    from mlsignal.client import model_stage_name

    with _training_client(args) as client:
        m = client.rollback(args.symbol, args.timeframe, args.reason)
    print(f"model {m.model_id} is {model_stage_name(m.stage)} again for {m.symbol} {m.timeframe}: {m.stage_reason}")
    return 0


@client_errors
def _models_history(args) -> int:
    from mlsignal.client import model_stage_name

    with _training_client(args) as client:
        changes = client.stage_changes(args.symbol, args.timeframe, limit=max(args.limit, 0))
    if not changes:
        print(f"no stage changes for {args.symbol} {args.timeframe}")
        return 0
    rows = [(_ts(c, "changed_at"), c.model_id, model_stage_name(c.stage), c.reason) for c in changes]
    print(table(("changed (UTC)", "model id", "stage", "reason"), rows))
    return 0


@client_errors
def _models_compare(args) -> int:
    from mlsignal.cli.security import security_kwargs
    from mlsignal.client import InferenceClient
    from shared.settings import Settings

    target = args.target or Settings.from_env().inference_addr
    with InferenceClient(target, **security_kwargs(args)) as client:
        c = client.compare(args.symbol, args.timeframe, args.model_id, args.baseline)
    model = c.model_id or "the class prior"
    print(f"{model} against {c.baseline_model_id} on {c.paired} paired candles: mean log-loss gain "
          f"{c.mean_log_loss_difference:+.5f} \u00b1 {c.standard_error:.5f} (z {c.statistic:+.2f})")
    print(f"decision: {c.decision}")
    print(c.reason)
    return 0


@client_errors
def _cancel(args) -> int:
    from mlsignal.client import job_state_name

    with _training_client(args) as client:
        job = client.cancel(args.job_id)
    print(f"job {job.job_id} {job_state_name(job.state)}")
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# formatting


def table(headers, rows) -> str:
    """Left-aligned columns separated by two spaces, with a header line."""
    rows = [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h)) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*headers).rstrip(), fmt.format(*("-" * w for w in widths)).rstrip()]
    out.extend(fmt.format(*r).rstrip() for r in rows)
    return "\n".join(out)


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _pct(value) -> str:
    return "n/a" if value is None else f"{value * 100:.1f}%"


def _ts(msg, field: str) -> str:
    if not msg.HasField(field):
        return "-"
    return ms_to_datetime(getattr(msg, field).ToMilliseconds()).strftime("%Y-%m-%d %H:%M")


def _truncate(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"
