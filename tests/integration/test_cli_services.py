"""The operator CLI `mlsignal train|jobs|models|cancel|predict` against the real services of the `services` fixture.

Commands find the services through MLSIGNAL_TRAINING_ADDR / MLSIGNAL_INFERENCE_ADDR, as an operator's shell would set
them, or through --target. Trainings use CLI/USD, a market this module adds to the shared database, so no model it
trains replaces one that another module is served.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from mlsignal import client as mc
from mlsignal.cli import main as cli_main
from mlsignal.v1 import common_pb2, inference_pb2, training_pb2
from service_fixtures import inverted, ms

TF = "1h"
SMALL = ["--start", "2018-03-01", "--end", "2018-10-01", "--trees", "20"]  # a training of a few seconds
CLI = "CLI/USD"


@pytest.fixture(scope="module")
def cli_market(services, sample_frame) -> None:
    """CLI/USD candles in the shared database: the sample's reciprocal (as INV/USD), 2018-01-01 .. 2019-03-01."""
    from shared.store.db import make_engine
    from shared.store.marketdata import insert_candles

    frame = sample_frame[(sample_frame.open_time_ms >= ms("2018-01-01")) &
                         (sample_frame.open_time_ms < ms("2019-03-01"))]
    engine = make_engine(services.url)
    try:
        insert_candles(engine, CLI, TF, inverted(frame.reset_index(drop=True)))  # rows already stored are skipped
    finally:
        engine.dispose()


@pytest.fixture
def env(services, cli_market, monkeypatch):
    """The real services as the CLI's default targets."""
    monkeypatch.setenv("MLSIGNAL_TRAINING_ADDR", f"127.0.0.1:{services.training.port}")
    monkeypatch.setenv("MLSIGNAL_INFERENCE_ADDR", f"127.0.0.1:{services.inference.port}")
    return services


def get_job(services, job_id: str) -> training_pb2.TrainingJob:
    return services.train_stub.GetTrainingJob(training_pb2.GetTrainingJobRequest(job_id=job_id), timeout=10)


def candle_csv(frame: pd.DataFrame) -> pd.DataFrame:
    """Sample rows as a candle CSV: ISO-8601 UTC timestamps, then the candle columns."""
    out = frame[["open", "high", "low", "close", "volume"]].copy()
    times = pd.to_datetime(frame["open_time_ms"].to_numpy(), unit="ms", utc=True)
    out.insert(0, "timestamp", times.strftime("%Y-%m-%dT%H:%M:%SZ"))
    return out.reset_index(drop=True)


def raw_predict(services, csv: pd.DataFrame, symbol: str = "BTC/USD") -> inference_pb2.PredictResponse:
    """One Predict through the plain stub over the CSV's rows."""
    stamps = csv["timestamp"]
    if pd.api.types.is_integer_dtype(stamps):
        times = pd.to_datetime(stamps, unit="ms", utc=True)
    else:
        times = pd.to_datetime(stamps, format="ISO8601", utc=True)
    candles = []
    for t, r in zip(times, csv.itertuples(index=False), strict=True):
        c = common_pb2.Candle(open_time_ms=int(t.value // 1_000_000), open=r.open, high=r.high, low=r.low,
                              close=r.close, volume=r.volume)
        if not np.isnan(getattr(r, "funding_rate", np.nan)):
            c.funding_rate = r.funding_rate
        candles.append(c)
    return services.infer_stub.Predict(inference_pb2.PredictRequest(symbol=symbol, timeframe=TF, candles=candles),
                                       timeout=60)


def column(resp, field: str) -> np.ndarray:
    return np.array([getattr(p, field) for p in resp.predictions])


# ======================================================================================================================
# train, models, jobs, cancel


def test_train_prints_metrics_against_the_prior_then_models_jobs_and_cancel_see_it(env, capsys):
    rc = cli_main(["train", "--symbol", CLI, "--timeframe", TF, *SMALL])
    out, err = capsys.readouterr()
    assert rc == 0, err
    job_id = re.search(r"^job +(\S+)$", out, re.M).group(1)
    model_id = re.search(r"^model +(\S+)$", out, re.M).group(1)
    job = get_job(env, job_id)
    assert job.state == training_pb2.JOB_STATE_SUCCEEDED and job.model_id == model_id
    stage = re.search(r"^stage +(\w+): (.+)$", out, re.M)  # what the new model became, and why
    assert stage is not None and stage.group(1) in ("SERVING", "SHADOW", "REJECTED"), out
    assert "log loss" in stage.group(2)
    assert job.request.params.n_estimators == 20
    assert job.request.start_time.ToMilliseconds() == ms("2018-03-01")
    assert job.request.end_time.ToMilliseconds() == ms("2018-10-01")
    assert "100%" in err  # the progress bar reached the end
    # the metrics table: the model next to the class-prior baseline, as the job reports them
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("metric (test)"))
    assert lines[header].split()[-2:] == ["model", "prior"]
    m = job.metrics
    for label, model_key, prior_key in (("log_loss", "log_loss", "prior_log_loss"), ("brier", "brier", "prior_brier"),
                                        ("balanced_accuracy", "balanced_accuracy", "prior_balanced_accuracy")):
        row = next(line for line in lines[header:] if line.startswith(label + " "))
        assert row.split()[1:] == [f"{m[model_key]:.4f}", f"{m[prior_key]:.4f}"], row
    for key in ("log_loss_ratio", "shrink_weight"):
        assert re.search(rf"^{key} +{m[key]:.4f} ", out, re.M), key
    balance = " ".join(f"{c} {m[f'test_class_{c}'] * 100:.1f}%" for c in ("down", "range", "up"))
    assert balance in out

    assert cli_main(["models", "--symbol", CLI, "--timeframe", TF]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith(model_id))
    assert CLI in row and "2018-03-01 00:00 .. 2018-09-30 23:00" in row
    assert f"{m['log_loss']:.4f} vs {m['prior_log_loss']:.4f}" in row
    assert cli_main(["models", "--symbol", "BTC/USD"]) == 0
    assert model_id not in capsys.readouterr().out

    assert cli_main(["jobs", "--symbol", CLI]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["job", "id", "state"]
    row = next(line for line in out.splitlines() if line.startswith(job_id))
    assert row.split()[1:4] == ["SUCCEEDED", "done", "100"] and model_id in row

    rc = cli_main(["cancel", job_id])
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == ""
    assert captured.err.startswith("error: FAILED_PRECONDITION: ") and job_id in captured.err


def test_train_no_wait_then_cancel(env, capsys):
    assert cli_main(["train", "--symbol", CLI, "--timeframe", TF, "--trees", "3000", "--no-wait"]) == 0
    out = capsys.readouterr().out.strip()
    job_id = re.fullmatch(r"job (\S+) queued", out).group(1)
    assert get_job(env, job_id).request.params.n_estimators == 3000
    assert cli_main(["cancel", job_id, "--target", f"127.0.0.1:{env.training.port}"]) == 0
    assert capsys.readouterr().out.strip() == f"job {job_id} CANCELLED"
    assert get_job(env, job_id).state == training_pb2.JOB_STATE_CANCELLED
    assert cli_main(["jobs", "--symbol", CLI, "--limit", "1"]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert len(rows) == 1 and rows[0].split()[:2] == [job_id, "CANCELLED"]


def test_train_failed_job_exits_1(env, capsys):
    # with a 90 % threshold no candle is labelled up or down, so the worker fails the job
    rc = cli_main(["train", "--symbol", CLI, "--timeframe", TF, *SMALL, "--threshold", "0.9"])
    out, err = capsys.readouterr()
    assert rc == 1 and out == ""
    match = re.search(r"^job (\S+) FAILED: (.*)$", err, re.M)
    assert match and "label.threshold" in match.group(2)
    assert get_job(env, match.group(1)).state == training_pb2.JOB_STATE_FAILED


def test_refused_requests_exit_2_with_the_status(env, capsys):
    rc = cli_main(["train", "--symbol", "BTC/USD", "--timeframe", "2h"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: INVALID_ARGUMENT: ") and "timeframe" in err
    rc = cli_main(["cancel", "no-such-job"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: NOT_FOUND: ") and "no-such-job" in err
    rc = cli_main(["train", "--symbol", "NONE/USD", "--timeframe", TF])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: FAILED_PRECONDITION: ") and "no candles" in err


def test_unreachable_service_exits_2_unavailable(monkeypatch, capsys):
    monkeypatch.setenv("MLSIGNAL_TRAINING_ADDR", "127.0.0.1:1")
    assert cli_main(["jobs"]) == 2
    assert capsys.readouterr().err.startswith("error: UNAVAILABLE: ")


@pytest.mark.parametrize("argv", [
    ["db", "upgrade"],
    ["data", "list"],
    ["data", "import", "--symbol", "BTC/USDT", "--timeframe", "5m", "BINANCE_CSV"],
    ["loadtest", "--symbol", "BTC/USD", "--timeframe", TF, "--requests", "1", "--target", "127.0.0.1:1"],
])
def test_unreachable_database_is_one_line_without_the_password(argv, binance_csv, monkeypatch, capsys):
    pytest.importorskip("psycopg")
    argv = [str(binance_csv) if a == "BINANCE_CSV" else a for a in argv]
    monkeypatch.setenv("MLSIGNAL_DATABASE_URL", "postgresql+psycopg://mlsignal:s3cret@127.0.0.1:1/mlsignal")
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "s3cret" not in err, err
    if argv[0] == "loadtest":
        assert err.startswith("error: cannot read candles from the database: "), err
    else:
        assert err.startswith("error: cannot reach the database postgresql+psycopg://mlsignal:***@127.0.0.1:1/"), err
    assert "connection" in err.lower(), err


def test_bad_date_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        cli_main(["train", "--symbol", "BTC/USD", "--timeframe", TF, "--start", "soon"])
    assert info.value.code == 2 and "ISO-8601" in capsys.readouterr().err


@pytest.fixture
def empty_training(sqlite_url, tmp_path):
    """The real training service on a fresh, migrated, empty SQLite database; stopped after the test."""
    from shared.settings import Settings
    from training_service.server import start

    running = start(Settings(database_url=sqlite_url, model_dir=tmp_path / "models"), "127.0.0.1:0")
    try:
        yield f"127.0.0.1:{running.port}"
    finally:
        running.stop(0.5)


def test_lists_on_an_empty_database(empty_training, capsys):
    assert cli_main(["jobs", "--target", empty_training]) == 0
    assert capsys.readouterr().out.strip() == "no training jobs"
    assert cli_main(["models", "--symbol", "BTC/USD", "--timeframe", TF, "--target", empty_training]) == 0
    assert capsys.readouterr().out.strip() == "no models"


# ======================================================================================================================
# predict


def test_predict_writes_the_ml_columns(env, sample_frame, tmp_path, capsys):
    frame = sample_frame[(sample_frame.open_time_ms >= ms("2018-12-20")) &
                         (sample_frame.open_time_ms < ms("2019-01-20"))]
    csv = candle_csv(frame)
    csv["funding_rate"] = np.where(np.arange(len(csv)) % 3 == 0, np.nan, 0.0001)  # empty fields: absent
    path = tmp_path / "candles.csv.gz"
    csv.to_csv(path, index=False)
    out_path = tmp_path / "out.csv"
    rc = cli_main(["predict", "--symbol", "BTC/USD", "--timeframe", TF, "--csv", str(path), "--out", str(out_path)])
    err = capsys.readouterr().err
    assert rc == 0, err
    out = pd.read_csv(out_path)
    assert list(out.columns) == [*csv.columns, *mc.ML_COLUMNS]
    assert out["timestamp"].tolist() == csv["timestamp"].tolist()
    sent = pd.read_csv(path)  # the values as the file holds them
    resp = raw_predict(env, sent)
    for col, field in (("ML_UP_PROB", "ml_up_prob"), ("ML_DOWN_PROB", "ml_down_prob"),
                       ("ML_RANGE_PROB", "ml_range_prob")):
        assert np.array_equal(out[col].to_numpy(), column(resp, field), equal_nan=True), col  # exact
    assert out["ML_READY"].tolist() == column(resp, "ready").tolist()
    assert out["ML_IN_SAMPLE"].tolist() == column(resp, "in_sample").tolist()
    assert (out["ML_MODEL_ID"] == resp.model_id).all()
    ready, in_sample = int(out["ML_READY"].sum()), int(out["ML_IN_SAMPLE"].sum())
    assert 0 < ready < len(out) and 0 < in_sample < len(out)
    assert out.loc[~out.ML_READY, ["ML_UP_PROB", "ML_DOWN_PROB", "ML_RANGE_PROB"]].isna().all().all()
    assert f"{len(out)} rows, {ready} ready, model {resp.model_id}, {in_sample} in-sample" in err


def test_predict_epoch_ms_to_stdout_with_target(services, sample_frame, tmp_path, capsys):
    frame = sample_frame[(sample_frame.open_time_ms >= ms("2019-03-01"))].iloc[:120]
    csv = candle_csv(frame)
    csv["timestamp"] = frame["open_time_ms"].to_numpy()
    path = tmp_path / "c.csv"
    csv.to_csv(path, index=False)
    rc = cli_main(["predict", "--symbol", "BTC/USD", "--timeframe", TF, "--csv", str(path), "--target",
                   f"127.0.0.1:{services.inference.port}"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    lines = captured.out.strip().splitlines()
    assert lines[0] == "timestamp,open,high,low,close,volume," + ",".join(mc.ML_COLUMNS)
    assert len(lines) == 121 and lines[1].startswith(f"{frame['open_time_ms'].iat[0]},")
    from io import StringIO

    out = pd.read_csv(StringIO(captured.out))
    resp = raw_predict(services, pd.read_csv(path))
    assert np.array_equal(out["ML_UP_PROB"].to_numpy(), column(resp, "ml_up_prob"), equal_nan=True)
    assert int(out["ML_READY"].sum()) == 120 - 99 and not out["ML_IN_SAMPLE"].any()


def test_predict_refusals_exit_2_with_the_status(env, sample_frame, tmp_path, capsys):
    path = tmp_path / "c.csv"
    candle_csv(sample_frame.iloc[:10]).to_csv(path, index=False)
    rc = cli_main(["predict", "--symbol", "ETH/USD", "--timeframe", TF, "--csv", str(path)])
    assert rc == 2 and capsys.readouterr().err.startswith("error: NOT_FOUND: ")
    rc = cli_main(["predict", "--symbol", "BTC/USD", "--timeframe", TF, "--csv", str(path), "--model-id", "nope"])
    assert rc == 2 and capsys.readouterr().err.startswith("error: NOT_FOUND: model_id")


@pytest.mark.parametrize("content,message", [
    ("timestamp,open,high,low,close\n2019-01-01T00:00:00Z,1,1,1,1\n", "header lacks volume"),
    ("timestamp,open,high,low,close,volume\n2019-01-01T00:00:00Z,1,1,1,1,1\nnope,1,1,1,1,1\n",
     "line 3: cannot parse timestamp 'nope'"),
    ("timestamp,open,high,low,close,volume\n2019-01-01T01:00:00Z,1,1,1,1,1\n2019-01-01T00:00:00Z,1,1,1,1,1\n",
     "line 3: timestamp 2019-01-01T00:00:00Z does not come after"),
    ("timestamp,open,high,low,close,volume\n2019-01-01T00:00:00Z,1,1,1,x,1\n", "line 2: close 'x' is not a number"),
    ("timestamp,open,high,low,close,volume\n1546300800,1,1,1,1,1\n", "epoch seconds"),
])
def test_predict_rejects_bad_csv_naming_the_line(tmp_path, capsys, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    rc = cli_main(["predict", "--symbol", "BTC/USD", "--timeframe", TF, "--csv", str(path), "--target",
                   "127.0.0.1:1"])
    assert rc == 2
    assert message in capsys.readouterr().err
