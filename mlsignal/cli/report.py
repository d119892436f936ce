"""`mlsignal report MODEL_ID --out DIR`: a model's evaluation as a self-contained HTML page."""

from __future__ import annotations

import sys
from pathlib import Path

from mlsignal.cli.training import client_errors


def register(sub) -> None:
    from mlsignal.cli.security import add_security_arguments

    p = sub.add_parser(
        "report",
        help="write a model's evaluation report (HTML with embedded charts)",
        description=(
            "Fetch the model's ModelInfo from the training service and write report-MODEL_ID.html into --out: "
            "reliability per class and log loss against the class prior per cross-validation fold and on the "
            "held-back test part (all out of sample), class balance, permutation importance, the label definition "
            "and the training window with its gap and dropped-label counts. The page embeds its charts, so it can "
            "be mailed or archived as one file. Exit status 0 on success, 2 when the model is unknown or the "
            "service refuses the call."
        ),
    )
    p.add_argument("model_id", metavar="MODEL_ID")
    p.add_argument("--out", type=Path, default=Path("."), metavar="DIR",
                   help="directory to write the report into (default: the current directory)")
    p.add_argument("--target", metavar="ADDR",
                   help="training service address (default: MLSIGNAL_TRAINING_ADDR, 127.0.0.1:50051)")
    add_security_arguments(p)
    p.set_defaults(func=_report, needs=("matplotlib",))


@client_errors
def _report(args) -> int:
    from mlsignal.cli.training import _training_client
    from mlsignal.report import find_model, write_report

    with _training_client(args) as client:
        info = find_model(client.list_models(), args.model_id)
    if info is None:
        print(f"error: NOT_FOUND: model_id: no model {args.model_id!r} is registered", file=sys.stderr)
        return 2
    path = write_report(info, args.out)
    print(path)
    return 0
