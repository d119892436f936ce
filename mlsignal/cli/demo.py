"""`mlsignal demo`: the whole product on the bundled sample (what `make demo` runs)."""

from __future__ import annotations

import sys
from pathlib import Path


def register(sub) -> None:
    from mlsignal.cli import SERVICES
    from mlsignal.demo import DemoOptions  # light: the demo imports numpy and pandas only when it runs

    d = DemoOptions()
    p = sub.add_parser("demo", help="run the end-to-end demo on the bundled BTC/USD sample")
    p.add_argument("--var-dir", type=Path, default=d.var_dir, help=f"working directory (default {d.var_dir})")
    p.add_argument("--train-start", default=d.train_start)
    p.add_argument("--split", default=d.split, help="first out-of-sample candle (default %(default)s)")
    p.add_argument("--end", default=d.end, help="end of the streamed and walk-forward period (default %(default)s)")
    p.add_argument("--trees", type=int, default=d.trees, help="trees of the main model (default %(default)s)")
    p.add_argument("--train-window", default=d.train_window, help="walk-forward training window (default %(default)s)")
    p.add_argument("--step", default=d.step, help="walk-forward step (default %(default)s)")
    p.add_argument("--walk-trees", type=int, default=d.walk_trees,
                   help="trees of each walk-forward model (default %(default)s)")
    p.set_defaults(func=_run, needs=(*SERVICES, "matplotlib"))


def _run(args) -> int:
    from mlsignal.cli import EXTRA_MODULES
    from mlsignal.demo import DemoError, DemoOptions, run_demo

    opts = DemoOptions(var_dir=args.var_dir, train_start=args.train_start, split=args.split, end=args.end,
                       trees=args.trees, train_window=args.train_window, step=args.step, walk_trees=args.walk_trees)
    try:
        run_demo(opts)
    except DemoError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        if isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] in EXTRA_MODULES:
            raise  # the CLI names the extra to install
        print(f"demo failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print("demo finished")
    return 0
