"""`mlsignal models promote|rollback|history` against the real training service: the operator's lifecycle actions
from the command line, and the history they leave."""

from __future__ import annotations

import re

from mlsignal.cli import main as cli_main
from mlsignal.client import TrainingClient
from mlsignal.v1 import common_pb2
from service_fixtures import train

MARKET = ["--symbol", "INV/USD", "--timeframe", "1h"]


def test_promote_rollback_and_history_from_the_cli(services, capsys):
    target = ["--target", f"127.0.0.1:{services.training.port}"]
    first = train(services.train_stub, symbol="INV/USD", start="2018-01-01", end="2018-09-01").model_id
    second = train(services.train_stub, symbol="INV/USD", start="2018-02-01", end="2018-10-01").model_id
    capsys.readouterr()

    # whatever the gate and the default promotion (shadow) made of the two, the operator decides: second, then
    # first (pinned), then second again; a rollback walks back to first
    assert cli_main(["models", "promote", second, *target]) == 0
    assert cli_main(["models", "promote", first, "--reason", "pinned by the desk", *target]) == 0
    assert cli_main(["models", "promote", second, *target]) == 0
    assert cli_main(["models", "rollback", *MARKET, "--reason", "live loss above the prior", *target]) == 0
    capsys.readouterr()
    with TrainingClient(f"127.0.0.1:{services.training.port}") as client:
        assert client.serving_model("INV/USD", "1h").model_id == first
        changes = client.stage_changes("INV/USD", "1h")
    # in the order they were made, also within one transaction (one millisecond)
    assert [(c.model_id, common_pb2.ModelStage.Name(c.stage), c.reason) for c in changes[-6:]] == [
        (second, "MODEL_STAGE_RETIRED", f"replaced by {first}: pinned by the desk"),
        (first, "MODEL_STAGE_SERVING", "pinned by the desk"),
        (first, "MODEL_STAGE_RETIRED", f"replaced by {second}: promoted by operator"),
        (second, "MODEL_STAGE_SERVING", "promoted by operator"),
        (second, "MODEL_STAGE_RETIRED", f"rolled back to {first}: live loss above the prior"),
        (first, "MODEL_STAGE_SERVING", f"rolled back from {second}: live loss above the prior"),
    ]
    # the next rollback walks back one step further: to second, as first was promoted over it
    assert cli_main(["models", "rollback", *MARKET, *target]) == 0
    capsys.readouterr()
    with TrainingClient(f"127.0.0.1:{services.training.port}") as client:
        assert client.serving_model("INV/USD", "1h").model_id == second
        changes = client.stage_changes("INV/USD", "1h")
    assert any(c.model_id == first and "pinned by the desk" in c.reason for c in changes)

    assert cli_main(["models", "history", *MARKET, *target]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if re.match(r"\d{4}-\d\d-\d\d", line)]
    assert len(lines) == len(changes)
    assert "rolled back by operator" in lines[-1] and second in lines[-1] and first in lines[-2]
    assert "live loss above the prior" in lines[-3]
    assert cli_main(["models", "history", *MARKET, "--limit", "2", *target]) == 0
    assert len([ln for ln in capsys.readouterr().out.splitlines() if re.match(r"\d{4}-", ln)]) == 2
