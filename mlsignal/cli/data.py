"""`mlsignal data import|push|list|delete`: load market-data files into the database (or, with `push`, send candles to
the training service, which stores them), show what is stored, and delete a market's candles."""

from __future__ import annotations

import sys
from pathlib import Path

from mlsignal.cli.training import _target_arg, _training_client, client_errors
from shared.errors import Unavailable, one_line
from shared.timeframes import TIMEFRAME_MS

KINDS = ("candles", "funding-rate", "open-interest")
FORMATS = ("auto", "csv", "binance")
# Smaller files insert in a fraction of a second; a bar would only flicker.
PROGRESS_MIN_ROWS = 10_000
GAPS_SHOWN = 5
PUSH_BATCH = 10_000


def register(sub) -> None:
    from mlsignal.cli import DATABASE

    p = sub.add_parser("data", help="market data: import files, list what is stored")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    imp = dsub.add_parser(
        "import",
        help="validate a candle, funding-rate or open-interest file and store it (idempotent)",
        description=(
            "Validate every row of FILE and store it in MLSIGNAL_DATABASE_URL (the schema is created or migrated "
            "first). The first bad row (a still-forming candle, whose close is after now, included) rejects the "
            "whole file and nothing is stored. A row already stored with the same values counts as unchanged, so "
            "importing a file twice changes nothing; one stored with other values counts as conflicting and the "
            "stored values are kept. Gaps are reported, not rejected."
        ),
    )
    imp.add_argument("file", metavar="FILE", help="CSV file, optionally compressed (.gz, .zip, ...)")
    imp.add_argument("--symbol", required=True, help="market symbol, like BTC/USDT")
    imp.add_argument(
        "--timeframe", choices=list(TIMEFRAME_MS), metavar="TF",
        help=f"candle length, one of {' '.join(TIMEFRAME_MS)} (required for candles)",
    )  # fmt: skip
    imp.add_argument(
        "--format", choices=FORMATS, default="auto",
        help="csv: header timestamp,open,high,low,close,volume (ISO-8601 UTC or epoch ms); binance: Binance kline "
        "CSV (12 columns, ms or µs); auto (default): tell from the first line",
    )  # fmt: skip
    imp.add_argument(
        "--kind", choices=KINDS, default="candles",
        help="what the file holds (default: candles); series files have the header timestamp,value",
    )  # fmt: skip
    imp.add_argument(
        "--resample", choices=list(TIMEFRAME_MS), metavar="TF",
        help="also store candles aggregated to this longer timeframe; only buckets with every candle stored are kept",
    )  # fmt: skip
    imp.add_argument(
        "--force", action="store_true",
        help="import candles even when the most common step between them is not --timeframe",
    )  # fmt: skip
    imp.set_defaults(func=_import, needs=DATABASE)

    push = dsub.add_parser(
        "push",
        help="send a candle file to the training service, which stores it (for a database this machine cannot reach)",
        description=(
            "Validate every row of FILE as `data import` does (a still-forming candle rejects the file before "
            "anything is sent), then send the candles to the training service with ImportCandles in batches of "
            "--batch candles, and print how many were inserted, unchanged and conflicting. The service checks every "
            "batch again and stores each whole or not at all; a refused batch ends the push, the batches before it "
            "stay stored, and pushing the file again is safe (identical candles count as unchanged)."
        ),
    )
    push.add_argument("file", metavar="FILE", help="CSV file, optionally compressed (.gz, .zip, ...)")
    push.add_argument("--symbol", required=True, help="market symbol, like BTC/USDT")
    push.add_argument("--timeframe", required=True, choices=list(TIMEFRAME_MS), metavar="TF",
                      help=f"candle length, one of {' '.join(TIMEFRAME_MS)}")
    push.add_argument("--format", choices=FORMATS, default="auto",
                      help="csv, binance or auto (default), as for `data import`")
    push.add_argument("--batch", type=int, default=PUSH_BATCH, metavar="N",
                      help=f"candles per message (default: {PUSH_BATCH})")
    _target_arg(push)  # --target, TLS and token as for the other training-service commands
    push.set_defaults(func=_push)

    delete = dsub.add_parser(
        "delete",
        help="delete a market's stored candles (all of them, or those between --start and --end)",
        description=(
            "Delete the candles of one symbol and timeframe from MLSIGNAL_DATABASE_URL: every one, or those whose "
            "open time is at or after --start and before --end. Says how many will go and asks for confirmation "
            "unless --yes is given (any answer but y or yes, or none, deletes nothing and exits 1). Funding rates "
            "and open interest (per symbol, for every timeframe) and trained models are not touched."
        ),
    )
    delete.add_argument("--symbol", required=True, help="market symbol, like BTC/USDT")
    delete.add_argument("--timeframe", required=True, choices=list(TIMEFRAME_MS), metavar="TF",
                        help=f"candle length, one of {' '.join(TIMEFRAME_MS)}")
    delete.add_argument("--start", metavar="TIME", help="first open time to delete, ISO-8601 UTC (default: the first)")
    delete.add_argument("--end", metavar="TIME", help="delete open times before this, ISO-8601 UTC (default: all)")
    delete.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    delete.set_defaults(func=_delete, needs=DATABASE)

    ls = dsub.add_parser("list", help="stored candles per symbol and timeframe, and funding-rate/open-interest series")
    ls.set_defaults(func=_list, needs=DATABASE)


def _import(args) -> int:
    from shared.errors import InvalidArgument
    from shared.settings import Settings
    from shared.store.importers import ImportRejected, TimeframeMismatch
    from shared.symbols import validate_symbol
    from shared.timeframes import format_duration

    settings = Settings.from_env()
    validate_symbol(args.symbol)
    if args.kind == "candles":
        if not args.timeframe:
            raise InvalidArgument("--timeframe is required when importing candles", field="timeframe")
        if args.resample:
            _check_resample(args.timeframe, args.resample)
    else:
        for option, value in (("--timeframe", args.timeframe), ("--resample", args.resample)):
            if value:
                raise InvalidArgument(f"{option} applies to candles, not to a {args.kind} series", field=option[2:])
        if args.format == "binance":
            raise InvalidArgument(f"--format binance holds candles, not a {args.kind} series", field="format")

    try:
        if args.kind == "candles":
            from shared.store.importers import read_candles

            frame = read_candles(args.file, args.timeframe, args.format, closed_by_ms=_now_ms(),
                                 check_spacing=not args.force)
        else:
            from shared.store.importers import read_series

            frame = read_series(args.file, args.kind)
    except TimeframeMismatch as exc:
        found = format_duration(exc.spacing_ms)
        print(f"error: {args.file}: --timeframe is {exc.timeframe} but the file's candles are {found} apart (the "
              f"most common step between rows); pass --timeframe {found}, or --force to import it as "
              f"{exc.timeframe} anyway", file=sys.stderr)
        return 2
    except ImportRejected as exc:
        hint = _series_hint(args.file) if args.kind == "candles" and exc.line == 1 else ""
        print(f"error: {args.file} line {exc.line}: {exc.reason}{hint}", file=sys.stderr)
        return 2

    engine = _connect(settings.database_url, migrate=True)
    try:
        if args.kind == "candles":
            _store_candles(engine, args, frame)
        else:
            _store_series(engine, args, frame)
    finally:
        engine.dispose()
    return 0


def _series_hint(path: str) -> str:
    """`; it looks like a funding-rate series: ...` when a file refused as candles holds a series instead."""
    import pandas as pd

    try:
        head = pd.read_csv(path, nrows=50, dtype=str, keep_default_na=False, compression="infer")
    except Exception:  # the refusal already says what is wrong with the file
        return ""
    columns = {str(c).strip().lower().replace("-", "_").replace(" ", "_"): c for c in head.columns}
    if "open" in columns and "close" in columns:
        return ""
    name = Path(path).name.lower().replace("-", "_")
    kind = ""
    if any("funding" in c for c in columns) or "funding" in name:
        kind = "funding-rate"
    elif any("open_interest" in c or c in ("oi", "sum_open_interest") for c in columns) or "open_interest" in name:
        kind = "open-interest"
    elif "value" in columns:
        values = pd.to_numeric(head[columns["value"]], errors="coerce").dropna()
        if values.empty:
            return ""
        kind = "funding-rate" if (values < 0).any() or (values.abs() < 0.1).all() else "open-interest"
    if not kind:
        return ""
    layout = "" if set(columns) >= {"timestamp", "value"} else " (series files have the header timestamp,value)"
    return f"; it looks like a {kind} series: import it with --kind {kind}{layout}"


def _check_resample(timeframe: str, target: str) -> None:
    from shared.errors import InvalidArgument

    src, dst = TIMEFRAME_MS[timeframe], TIMEFRAME_MS[target]
    if dst <= src or dst % src:
        raise InvalidArgument(
            f"--resample {target} must be a longer timeframe than {timeframe} and a whole multiple of it",
            field="resample",
        )


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


def _store_candles(engine, args, frame) -> None:
    from shared.store.importers import find_gaps, resample
    from shared.store.marketdata import import_candles, load_candles

    symbol, tf = args.symbol, args.timeframe
    tf_ms = TIMEFRAME_MS[tf]
    times = frame["open_time_ms"].to_numpy()
    if len(times) >= 2 and (times[1:] - times[:-1]).min() > tf_ms:
        closest = int((times[1:] - times[:-1]).min())
        print(
            f"warning: the closest candles in {args.file} are {_span(closest)} apart, longer than the timeframe {tf}; "
            "is --timeframe right?",
            file=sys.stderr,
        )
    counts = _insert_with_progress(
        len(frame), f"{symbol} {tf}",
        lambda progress: import_candles(engine, symbol, tf, frame, closed_by_ms=_now_ms(), progress=progress),
    )  # fmt: skip
    _warn_conflicts(f"{symbol} {tf}", counts, "candles")
    print(_summary(symbol, tf, counts, times, find_gaps(times, tf_ms), tf_ms))

    if args.resample:
        # Aggregate from the store, not only from this file, so a bucket that straddles two imported files is built
        # once both halves are in.
        to_tf, to_ms = args.resample, TIMEFRAME_MS[args.resample]
        start = int(times[0]) - int(times[0]) % to_ms
        end = int(times[-1]) - int(times[-1]) % to_ms + to_ms
        stored = load_candles(engine, symbol, tf, start, end)
        coarse = resample(stored, tf, to_tf)
        if coarse.empty:
            print(f"{symbol} {to_tf}: 0 inserted, no complete {to_tf} bucket in {args.file}")
            return
        counts = import_candles(engine, symbol, to_tf, coarse, closed_by_ms=_now_ms())
        _warn_conflicts(f"{symbol} {to_tf}", counts, "candles")
        coarse_times = coarse["open_time_ms"].to_numpy()
        print(_summary(symbol, to_tf, counts, coarse_times, find_gaps(coarse_times, to_ms), to_ms))


def _store_series(engine, args, frame) -> None:
    from shared.store.marketdata import import_series
    from shared.timeframes import ms_to_iso

    counts = _insert_with_progress(
        len(frame),
        f"{args.symbol} {args.kind}",
        lambda progress: import_series(engine, args.kind, args.symbol, frame, progress=progress),
    )
    _warn_conflicts(f"{args.symbol} {args.kind}", counts, "values")
    times = frame["time_ms"].to_numpy()
    print(
        f"{args.symbol} {args.kind}: {_counts_text(counts)}, "
        f"first {ms_to_iso(int(times[0]))}, last {ms_to_iso(int(times[-1]))}"
    )


def _counts_text(counts) -> str:
    return f"{counts.inserted} inserted, {counts.unchanged} unchanged, {counts.conflicting} conflicting"


def _warn_conflicts(what: str, counts, items: str) -> None:
    """One line on stderr when stored rows differ from the ones given: how many, and the first."""
    from shared.timeframes import ms_to_iso

    if counts.conflicting:
        print(
            f"warning: {what}: {counts.conflicting} {items} differ from the ones already stored (the first at "
            f"{ms_to_iso(counts.first_conflict_ms)}); the stored values are kept",
            file=sys.stderr,
        )


def _insert_with_progress(total: int, desc: str, insert):
    """Run insert(progress) under a tqdm bar on stderr for large files; the bar hides itself when not on a TTY."""
    from tqdm import tqdm

    with tqdm(
        total=total, desc=desc, unit="rows", file=sys.stderr, leave=False,
        disable=None if total >= PROGRESS_MIN_ROWS else True,
    ) as bar:  # fmt: skip
        return insert(bar.update)


def _summary(symbol: str, tf: str, counts, times, gaps: list[tuple[int, int]], tf_ms: int) -> str:
    """The one-line result of an import; the first gaps go to stderr."""
    from shared.timeframes import ms_to_iso

    missing = sum(n for _, n in gaps)
    for start, n in gaps[:GAPS_SHOWN]:
        end = start + (n - 1) * tf_ms
        print(
            f"gap: {symbol} {tf} {ms_to_iso(start)} .. {ms_to_iso(end)}: {n} missing candle{'s' if n != 1 else ''}",
            file=sys.stderr,
        )
    if len(gaps) > GAPS_SHOWN:
        print(f"gap: ... and {len(gaps) - GAPS_SHOWN} more", file=sys.stderr)
    gap_text = (
        "0 gaps" if not gaps
        else f"{len(gaps)} gap{'s' if len(gaps) != 1 else ''} ({missing} missing candle{'s' if missing != 1 else ''})"
    )  # fmt: skip
    return (
        f"{symbol} {tf}: {_counts_text(counts)}, {gap_text}, "
        f"first {ms_to_iso(int(times[0]))}, last {ms_to_iso(int(times[-1]))}"
    )


@client_errors
def _push(args) -> int:
    from tqdm import tqdm

    from shared.errors import InvalidArgument
    from shared.store.importers import ImportRejected, read_candles
    from shared.symbols import validate_symbol
    from shared.timeframes import ms_to_iso

    validate_symbol(args.symbol)
    if args.batch < 1:
        raise InvalidArgument(f"--batch must be at least 1, got {args.batch}", field="batch")
    try:
        frame = read_candles(args.file, args.timeframe, args.format, closed_by_ms=_now_ms())
    except ImportRejected as exc:
        print(f"error: {args.file} line {exc.line}: {exc.reason}", file=sys.stderr)
        return 2
    what = f"{args.symbol} {args.timeframe}"
    with _training_client(args) as client, tqdm(
        total=len(frame), desc=what, unit="rows", file=sys.stderr, leave=False,
        disable=None if len(frame) >= PROGRESS_MIN_ROWS else True,
    ) as bar:  # fmt: skip
        result = client.import_candles(args.symbol, args.timeframe, frame, batch_size=args.batch,
                                       on_batch=bar.update)
    if result.conflicting:
        print(f"warning: {what}: {result.conflicting} candles differ from the ones already stored; the stored "
              "values are kept (the training service logs the first of each batch)", file=sys.stderr)
    print(f"{what}: {_counts_text(result)}, last {ms_to_iso(result.last_open_time_ms)}")
    return 0


def _delete(args) -> int:
    from shared.errors import InvalidArgument
    from shared.settings import Settings
    from shared.store.marketdata import count_candles, delete_candles
    from shared.symbols import validate_symbol
    from shared.timeframes import ms_to_iso, parse_time

    validate_symbol(args.symbol)
    bounds = {}
    for option in ("start", "end"):
        text = getattr(args, option)
        if text:
            try:
                bounds[option] = parse_time(text)
            except ValueError as exc:
                raise InvalidArgument(f"--{option}: {exc}", field=option) from None
    start, end = bounds.get("start"), bounds.get("end")
    if start is not None and end is not None and start >= end:
        raise InvalidArgument(f"--start {args.start} must be before --end {args.end}", field="start")
    what = f"{args.symbol} {args.timeframe}"
    if start is not None or end is not None:
        what += (f" from {ms_to_iso(start) if start is not None else 'the first'} to "
                 f"{ms_to_iso(end) + ' (excluded)' if end is not None else 'the last'}")
    engine = _connect(Settings.from_env().database_url, migrate=False)
    try:
        n = count_candles(engine, args.symbol, args.timeframe, start, end)
        if n == 0:
            print(f"{what}: no candles stored, nothing deleted")
            return 0
        if not args.yes:
            try:
                answer = input(f"delete {n} candles of {what}? [y/N] ").strip().lower()
            except EOFError:  # no answer (stdin closed): nothing is deleted
                answer = ""
            if answer not in ("y", "yes"):
                print("nothing deleted")
                return 1
        deleted = delete_candles(engine, args.symbol, args.timeframe, start, end)
    finally:
        engine.dispose()
    print(f"{what}: {deleted} candles deleted")
    return 0


def _span(ms: int) -> str:
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms} ms"


def _list(args) -> int:
    import sqlalchemy as sa

    from shared.server.startup import database_label
    from shared.settings import Settings
    from shared.store.marketdata import summarize, summarize_series
    from shared.timeframes import ms_to_iso

    url = Settings.from_env().database_url
    db = sa.engine.make_url(url).database if url.startswith("sqlite") else None
    if db and db != ":memory:" and not Path(db).exists():  # do not create an empty database just to list it
        print(f"no market data stored in {database_label(url)} (no such database file)")
        return 0
    engine = _connect(url, migrate=False)
    try:
        if not sa.inspect(engine).has_table("candles"):
            print(f"no market data stored in {database_label(url)} (no schema yet; `mlsignal data import` creates it)")
            return 0
        candle_rows = summarize(engine)
        stretches = _gap_stretches(engine) if candle_rows else {}
        series_rows = summarize_series(engine)
    finally:
        engine.dispose()
    if not candle_rows and not series_rows:
        print(f"no market data stored in {database_label(url)}")
        return 0
    if candle_rows:
        # gaps: stretches of missing candles between the first and the last; missing: the candles they lack
        _table(
            ["symbol", "timeframe", "first", "last", "rows", "gaps", "missing"],
            [
                [r["symbol"], r["timeframe"], ms_to_iso(r["first_ms"]), ms_to_iso(r["last_ms"]), r["rows"],
                 "?" if r["gaps"] is None else stretches.get((r["symbol"], r["timeframe"]), 0),
                 "?" if r["gaps"] is None else r["gaps"]]
                for r in candle_rows
            ],
        )
    if series_rows:
        if candle_rows:
            print()
        _table(
            ["symbol", "series", "first", "last", "rows"],
            [
                [r["symbol"], r["kind"], ms_to_iso(r["first_ms"]), ms_to_iso(r["last_ms"]), r["rows"]]
                for r in series_rows
            ],
        )
    return 0


def _gap_stretches(engine) -> dict[tuple[str, str], int]:
    """(symbol, timeframe) -> number of gaps, a gap being a stretch of one or more missing candles between two
    stored ones. Counted in the database from the distinct steps between neighbouring candles."""
    import sqlalchemy as sa

    from shared.store.db import candles

    c = candles.c
    following = sa.func.lead(c.open_time).over(partition_by=(c.symbol, c.timeframe), order_by=c.open_time)
    pairs = sa.select(c.symbol, c.timeframe, (following - c.open_time).label("step")).subquery()
    query = (
        sa.select(pairs.c.symbol, pairs.c.timeframe, pairs.c.step, sa.func.count())
        .where(pairs.c.step.is_not(None))
        .group_by(pairs.c.symbol, pairs.c.timeframe, pairs.c.step)
    )
    out: dict[tuple[str, str], int] = {}
    with engine.connect() as conn:
        for symbol, timeframe, step, n in conn.execute(query):
            tf_ms = TIMEFRAME_MS.get(timeframe)
            if tf_ms is not None and int(step) > tf_ms:
                out[(symbol, timeframe)] = out.get((symbol, timeframe), 0) + int(n)
    return out


def _table(header: list[str], rows: list[list]) -> None:
    """Columns padded to their widest cell; numbers right-aligned."""
    numeric = [all(isinstance(r[i], int) for r in rows) for i in range(len(header))]
    cells = [header] + [[str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for r in cells:
        padded = (v.rjust(w) if num else v.ljust(w) for v, w, num in zip(r, widths, numeric, strict=True))
        print("  ".join(padded).rstrip())


def _connect(url: str, migrate: bool):
    """An engine on the database; with migrate, the schema is created or upgraded first (idempotent)."""
    from shared.store.db import make_engine
    from shared.store.migrate import upgrade

    try:
        if migrate:
            upgrade(url)
        engine = make_engine(url)
        with engine.connect():
            pass
    except Unavailable as exc:
        raise unreachable(url, exc) from None
    return engine


def unreachable(url: str, exc: Unavailable) -> Unavailable:
    """The store's Unavailable as one line naming the database (password hidden) and the driver's reason."""
    from shared.server.startup import database_label

    reason = one_line(exc.__cause__ or exc)  # the store keeps the driver's error as the cause
    return Unavailable(f"cannot reach the database {database_label(url)}: {reason}")
