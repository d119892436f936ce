"""`mlsignal train --timeout` stops following a job without leaving the operator waiting forever, and
`mlsignal jobs show` prints one job whole, error included."""

from __future__ import annotations

import re

from mlsignal.cli import main as cli_main


def test_train_timeout_then_jobs_show_prints_the_job_in_full(services, capsys):
    target = ["--target", f"127.0.0.1:{services.training.port}"]
    code = cli_main(["train", "--symbol", "BTC/USD", "--timeframe", "1h", "--start", "2018-03-01",
                     "--end", "2018-10-01", "--trees", "20", "--timeout", "0.001", *target])
    err = capsys.readouterr().err
    assert code == 1
    m = re.search(r"job (\S+) did not finish within 0.001 s; it keeps running", err)
    assert m, err
    job_id = m.group(1)
    assert cli_main(["cancel", job_id, *target]) in (0, 2)  # 2: it finished in between
    capsys.readouterr()

    assert cli_main(["jobs", "show", job_id, *target]) == 0
    out = capsys.readouterr().out
    fields = dict(re.findall(r"^(\w[\w ]*?)\s{2,}(.*)$", out, re.M))
    assert fields["job id"] == job_id
    assert fields["market"] == "BTC/USD 1h"
    assert fields["window"] == "2018-03-01 00:00 .. 2018-10-01 00:00"
    assert '"n_estimators": 20' in fields["params"]
    assert fields["state"] in ("CANCELLED", "SUCCEEDED")
    if fields["state"] == "CANCELLED":
        assert fields["error"]  # the whole text, not cut to a column


def test_jobs_show_of_an_unknown_job_is_not_found(services, capsys):
    assert cli_main(["jobs", "show", "no-such-job", "--target", f"127.0.0.1:{services.training.port}"]) == 2
    assert "NOT_FOUND" in capsys.readouterr().err
