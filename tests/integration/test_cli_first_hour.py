"""What a new operator meets in the first hour with the CLI, against the real services of the `services` fixture:
`mlsignal stream` replaying a candle file, refusals named by file line and time, warnings about history and gaps,
targets that point at the wrong place, `health --service`, `--verbose` anywhere and `data import` checks."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pandas as pd
import pytest

from mlsignal.cli import main as cli_main

REPO = Path(__file__).resolve().parents[2]
CANDLES = REPO / "data" / "candles.csv"  # 2019-09-01T00:00:00Z .. 2019-09-14T23:00:00Z, 1h
WARMUP = 100  # warmup_bars of the fixture's model
LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ up=(-|0\.\d{4}|1\.0000) down=(-|[01]\.\d{4}) "
                  r"range=(-|[01]\.\d{4}) ready=(yes|no) in_sample=(yes|no) model=\S+( ood_score=\S+ ood=(yes|no))?$")


def rows(n: int) -> pd.DataFrame:
    return pd.read_csv(CANDLES).iloc[:n].copy()


def write(frame: pd.DataFrame, path: Path) -> Path:
    frame.to_csv(path, index=False)
    return path


def misaligned(tmp_path: Path, n: int = 110, at: int = 50) -> Path:
    """n rows whose row `at` (file line at + 2) opens half an hour late: in order, so only the service refuses it."""
    frame = rows(n)
    t = pd.Timestamp(frame.loc[at, "timestamp"]) + pd.Timedelta(minutes=30)
    frame.loc[at, "timestamp"] = t.strftime("%Y-%m-%dT%H:%M:%SZ")
    return write(frame, tmp_path / "misaligned.csv")


def target(services) -> list[str]:
    return ["--target", f"127.0.0.1:{services.inference.port}"]


def args(services, path: Path, *extra: str) -> list[str]:
    return ["--symbol", "BTC/USD", "--timeframe", "1h", "--csv", str(path), *target(services), *extra]


# 1. stream


def test_stream_prints_one_line_per_candle(services, tmp_path, capsys):
    path = write(rows(WARMUP + 10), tmp_path / "c.csv")
    assert cli_main(["stream", *args(services, path)]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == WARMUP + 10
    assert all(LINE.match(line) for line in lines), lines[:3]
    assert lines[0].startswith("2019-09-01T00:00:00Z up=- down=- range=- ready=no")
    assert sum("ready=yes" in line for line in lines) == 11
    assert lines[-1].startswith("2019-09-05T13:00:00Z up=0.")
    assert "110 candles answered, 11 ready, 0 refused" in err


def test_stream_reports_a_refused_candle_by_line_and_time_and_goes_on(services, tmp_path, capsys):
    path = misaligned(tmp_path)
    assert cli_main(["stream", *args(services, path)]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 109
    assert "line 52 (2019-09-03T02:30:00Z): open_time_ms 1567477800000 is not aligned to the timeframe" in err
    assert "candles[0]" not in err
    assert "109 candles answered" not in err and "110 candles answered, 10 ready, 1 refused" in err


def test_stream_follow_reads_lines_appended_to_the_file(services, tmp_path, capsys):
    frame = rows(WARMUP + 5)
    path = write(frame.iloc[:WARMUP], tmp_path / "live.csv")
    tail = frame.iloc[WARMUP:].to_csv(index=False, header=False)
    appended = threading.Event()

    def append() -> None:
        with path.open("a") as f:  # a line in two writes: the half line is not read until it is complete
            f.write(tail[:20])
            f.flush()
            f.write(tail[20:])
        appended.set()

    writer = threading.Thread(target=append)
    writer.start()
    try:
        rc = cli_main(["stream", *args(services, path, "--follow", "--poll", "0.05", "--max-candles",
                                       str(WARMUP + 5))])
    finally:
        writer.join()
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert appended.is_set()
    lines = out.splitlines()
    assert [line.split()[0] for line in lines[-5:]] == frame["timestamp"].iloc[WARMUP:].tolist()
    assert sum("ready=yes" in line for line in lines) == 6


def test_stream_follow_stops_cleanly_on_ctrl_c(services, tmp_path):
    import signal
    import subprocess
    import sys

    path = write(rows(WARMUP + 2), tmp_path / "live.csv")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlsignal.cli", "stream", *args(services, path, "--follow", "--poll", "0.05")],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        printed = [proc.stdout.readline() for _ in range(WARMUP + 2)]  # every candle of the file answered
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert all(LINE.match(line.strip()) for line in printed)
    assert rest == ""
    assert "stopped: 102 candles answered, 3 ready, 0 refused" in err
    assert "Traceback" not in err


def test_stream_follow_refuses_a_compressed_file(services, tmp_path, capsys):
    path = tmp_path / "c.csv.gz"
    rows(3).to_csv(path, index=False)
    assert cli_main(["stream", *args(services, path, "--follow")]) == 2
    assert "a compressed file cannot grow line by line" in capsys.readouterr().err


# 2. predict: refusals by line and time, history and gaps


def test_predict_names_the_file_line_and_time_of_a_refused_candle(services, tmp_path, capsys):
    path = misaligned(tmp_path)
    assert cli_main(["predict", *args(services, path)]) == 2
    err = capsys.readouterr().err
    assert f"error: INVALID_ARGUMENT: {path} line 52 (2019-09-03T02:30:00Z): open_time_ms 1567477800000 is not " \
           "aligned" in err
    assert "candles[50]" not in err


def test_predict_and_stream_warn_when_no_row_is_ready(services, tmp_path, capsys):
    path = write(rows(40), tmp_path / "short.csv")
    warning = "warning: no row is ready: the model needs 100 candles of history, the file has 40"
    assert cli_main(["predict", *args(services, path), "--out", str(tmp_path / "o.csv")]) == 0
    assert warning in capsys.readouterr().err
    assert cli_main(["stream", *args(services, path)]) == 0
    assert warning in capsys.readouterr().err


def test_predict_and_stream_warn_about_gaps(services, tmp_path, capsys):
    frame = rows(WARMUP + 20)
    path = write(frame.drop(index=range(60, 65)), tmp_path / "gaps.csv")
    warning = ("warning: the input has gaps: 5 1h candles missing in 1 gap, the first at "
               f"{frame.loc[60, 'timestamp']}")
    assert cli_main(["predict", *args(services, path), "--out", str(tmp_path / "o.csv")]) == 0
    assert warning in capsys.readouterr().err
    assert cli_main(["stream", *args(services, path)]) == 0
    assert warning in capsys.readouterr().err


# 3. targets


def test_an_http_target_is_refused_with_the_form_to_use(services, tmp_path, capsys):
    path = write(rows(5), tmp_path / "c.csv")
    port = services.inference.port
    assert cli_main(["predict", *args(services, path), "--target", f"http://127.0.0.1:{port}"]) == 2
    assert f"error: http://127.0.0.1:{port}: use host:port (no http:// prefix)" in capsys.readouterr().err
    assert cli_main(["health", "--target", f"https://127.0.0.1:{port}"]) == 1
    assert "use host:port (no https:// prefix)" in capsys.readouterr().err


def test_a_call_to_the_other_service_says_which_service_answered(services, tmp_path, capsys):
    assert cli_main(["jobs", "--target", f"127.0.0.1:{services.inference.port}"]) == 2
    err = capsys.readouterr().err
    assert "UNIMPLEMENTED" in err
    assert ("this is the inference service; training listens on MLSIGNAL_TRAINING_ADDR (default 127.0.0.1:50051)"
            in err)
    path = write(rows(5), tmp_path / "c.csv")
    for command in ("predict", "stream"):
        assert cli_main([command, *args(services, path), "--target", f"127.0.0.1:{services.training.port}"]) == 2
        err = capsys.readouterr().err
        assert ("this is the training service; inference listens on MLSIGNAL_INFERENCE_ADDR (default "
                "127.0.0.1:50052)") in err, command


def test_a_stream_to_the_other_service_names_both_addresses(services, tmp_path, capsys):
    path = write(rows(5), tmp_path / "c.csv")
    assert cli_main(["data", "push", str(path), "--symbol", "BTC/USD", "--timeframe", "1h", "--target",
                     f"127.0.0.1:{services.inference.port}"]) == 2
    err = capsys.readouterr().err
    assert ("is the target the other service's address? training listens on MLSIGNAL_TRAINING_ADDR (default "
            "127.0.0.1:50051), inference on MLSIGNAL_INFERENCE_ADDR (default 127.0.0.1:50052)") in err


# 4. health --service


def test_health_lists_the_names_this_server_knows(services, capsys):
    rc = cli_main(["health", "--target", f"127.0.0.1:{services.inference.port}", "--service",
                   "mlsignal.v1.TrainingService"])
    assert rc == 1
    err = capsys.readouterr().err
    known = err.split("this server knows ", 1)[1]
    assert "mlsignal.v1.InferenceService" in known
    assert "mlsignal.v1.TrainingService" not in known
    assert "mlsignal.staleness" not in known  # MLSIGNAL_MODEL_MAX_AGE is unset: nothing watches the age


def test_staleness_is_reported_only_where_the_server_watches_model_age(services, capsys):
    from dataclasses import replace

    from inference_service.server import start as start_inference

    unset = ["--target", f"127.0.0.1:{services.inference.port}"]
    assert cli_main(["health", *unset, "--service", "mlsignal.staleness"]) == 1
    err = capsys.readouterr().err
    assert "only when MLSIGNAL_MODEL_MAX_AGE is set on the server" in err
    assert cli_main(["monitor", *unset, "--symbol", "BTC/USD", "--timeframe", "1h"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("model ") and "staleness" not in out

    watched = start_inference(replace(services.settings, model_max_age="3650d"), "127.0.0.1:0")
    try:
        at = ["--target", f"127.0.0.1:{watched.port}"]
        assert cli_main(["health", *at, "--service", "mlsignal.staleness"]) == 0
        assert capsys.readouterr().out.strip() == "SERVING"
        assert cli_main(["monitor", *at, "--symbol", "BTC/USD", "--timeframe", "1h"]) == 0
        out = capsys.readouterr().out
        assert "staleness   SERVING (no serving model older than MLSIGNAL_MODEL_MAX_AGE)" in out
        assert cli_main(["health", *at, "--service", "nope"]) == 1
        assert "mlsignal.staleness" in capsys.readouterr().err.split("this server knows ", 1)[1]
    finally:
        watched.stop(0.5)


# 5. --verbose anywhere


@pytest.mark.parametrize("where", ["before", "after"])
def test_verbose_anywhere_shows_the_traceback_of_a_refused_call(services, tmp_path, capsys, where):
    path = misaligned(tmp_path)
    line = ["predict", *args(services, path)]
    line = ["--verbose", *line] if where == "before" else [*line, "--verbose"]
    assert cli_main(line) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "InvalidArgumentError" in err
    assert "line 52 (2019-09-03T02:30:00Z)" in err.splitlines()[-1]
    assert cli_main(["predict", *args(services, path)]) == 2
    assert "Traceback" not in capsys.readouterr().err


# 6. data import: the timeframe against the file's spacing, series files without --kind


def four_hourly(n: int = 12) -> str:
    start = pd.Timestamp("2024-01-01", tz="UTC")
    body = [f"{(start + pd.Timedelta(hours=4 * i)).strftime('%Y-%m-%dT%H:%M:%SZ')},100,110,90,105,1"
            for i in range(n)]
    return "timestamp,open,high,low,close,volume\n" + "\n".join(body) + "\n"


def test_import_refuses_a_timeframe_that_does_not_match_the_spacing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLSIGNAL_DATABASE_URL", f"sqlite:///{tmp_path}/m.db")
    path = tmp_path / "four_hourly.csv"
    path.write_text(four_hourly())
    for given in ("1h", "1d"):
        assert cli_main(["data", "import", str(path), "--symbol", "BTC/USDT", "--timeframe", given]) == 2
        err = capsys.readouterr().err
        assert (f"error: {path}: --timeframe is {given} but the file's candles are 4h apart (the most common step "
                f"between rows); pass --timeframe 4h, or --force to import it as {given} anyway") in err
    assert cli_main(["data", "import", str(path), "--symbol", "BTC/USDT", "--timeframe", "1h", "--force"]) == 0
    assert "12 inserted" in capsys.readouterr().out
    assert cli_main(["data", "import", str(path), "--symbol", "BTC/USDT", "--timeframe", "4h"]) == 0
    capsys.readouterr()


@pytest.mark.parametrize(("name", "values", "kind"), [
    ("rates.csv", ["0.0001", "-0.00005", "0.0002"], "funding-rate"),
    ("oi.csv", ["152000.5", "153100", "151900.25"], "open-interest"),
])
def test_import_of_a_series_without_kind_suggests_the_kind(tmp_path, monkeypatch, capsys, name, values, kind):
    monkeypatch.setenv("MLSIGNAL_DATABASE_URL", f"sqlite:///{tmp_path}/m.db")
    path = tmp_path / name
    path.write_text("timestamp,value\n" + "".join(f"2024-01-01T0{i}:00:00Z,{v}\n" for i, v in enumerate(values)))
    assert cli_main(["data", "import", str(path), "--symbol", "BTC/USDT", "--timeframe", "1h"]) == 2
    err = capsys.readouterr().err
    assert "line 1: header lacks column(s)" in err
    assert f"; it looks like a {kind} series: import it with --kind {kind}" in err
    assert cli_main(["data", "import", str(path), "--symbol", "BTC/USDT", "--kind", kind]) == 0
    capsys.readouterr()


# 7. data delete


def test_data_delete_removes_a_markets_candles_after_confirmation(tmp_path, monkeypatch, capsys):
    import io

    monkeypatch.setenv("MLSIGNAL_DATABASE_URL", f"sqlite:///{tmp_path}/m.db")
    path = tmp_path / "four_hourly.csv"
    path.write_text(four_hourly())  # 2024-01-01T00:00Z .. 2024-01-02T20:00Z, 4h
    assert cli_main(["data", "import", str(path), "--symbol", "BTC/USDT", "--timeframe", "4h"]) == 0
    assert cli_main(["data", "import", str(path), "--symbol", "ETH/USDT", "--timeframe", "4h"]) == 0
    capsys.readouterr()
    delete = ["data", "delete", "--symbol", "BTC/USDT", "--timeframe", "4h"]

    monkeypatch.setattr("sys.stdin", io.StringIO("n\n"))
    assert cli_main([*delete, "--start", "2024-01-02", "--end", "2024-01-02T08:00:00Z"]) == 1
    out = capsys.readouterr().out
    assert "delete 2 candles of BTC/USDT 4h from 2024-01-02T00:00:00Z to 2024-01-02T08:00:00Z (excluded)? [y/N]" in out
    assert "nothing deleted" in out

    monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))
    assert cli_main([*delete, "--start", "2024-01-02", "--end", "2024-01-02T08:00:00Z"]) == 0
    assert "BTC/USDT 4h from 2024-01-02T00:00:00Z to 2024-01-02T08:00:00Z (excluded): 2 candles deleted" in \
        capsys.readouterr().out

    assert cli_main([*delete, "--yes"]) == 0
    assert "BTC/USDT 4h: 10 candles deleted" in capsys.readouterr().out
    assert cli_main([*delete, "--yes"]) == 0
    assert "BTC/USDT 4h: no candles stored, nothing deleted" in capsys.readouterr().out

    from shared.store.db import make_engine
    from shared.store.marketdata import count_candles

    engine = make_engine(f"sqlite:///{tmp_path}/m.db")
    try:
        assert count_candles(engine, "ETH/USDT", "4h") == 12  # other markets stay
    finally:
        engine.dispose()


# 6. the SDK reads a plain pd.read_csv, and predict and stream refuse the same times alike


def test_sdk_predict_and_stream_take_the_same_times_and_refuse_them_alike(services):
    from mlsignal.client import InferenceClient

    frame = rows(WARMUP + 5)  # pd.read_csv: `timestamp` is text like 2019-09-01T00:00:00Z
    with InferenceClient(f"127.0.0.1:{services.inference.port}") as ml:
        out = ml.predict(frame, "BTC/USD", "1h")
        live = list(ml.stream(frame.to_dict("records"), "BTC/USD", "1h"))
        assert int(out.ML_READY.sum()) == 6 == sum(p.ready for p in live)
        assert [p.up for p in live if p.ready] == out.ML_UP_PROB[out.ML_READY].tolist()

        for bad, says in (("2019-09-01T05:00:00", "has no time zone"), ("5 Sept", "is not an ISO-8601"),
                          ("2019-09-01T05:00:00.0001Z", "has sub-millisecond")):
            broken = frame.copy()
            broken.loc[5, "timestamp"] = bad
            with pytest.raises(ValueError) as by_predict:
                ml.predict(broken, "BTC/USD", "1h")
            with pytest.raises(ValueError) as by_stream:
                list(ml.stream(broken.to_dict("records"), "BTC/USD", "1h"))
            assert str(by_predict.value) == str(by_stream.value), bad
            assert str(by_predict.value).startswith(f"candle time {bad!r} {says}")
