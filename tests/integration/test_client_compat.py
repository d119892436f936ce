"""The client on the oldest and on the newest supported gRPC stack gets the same answers from the real services.

The services run in this interpreter (the full install, newest grpcio and protobuf). The same client script
(compat_client.py) runs in a subprocess under this interpreter and under `.venv-client`, the client-only install
(no extras) on grpcio OLDEST_GRPC and protobuf OLDEST_PROTOBUF; every probability must be identical. The `mlsignal`
CLI of `.venv-client` must run its client-side commands against the same services, and name the extra to install
for the commands that need one.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from client_venv import CLIENT_VENV, REPO, require_client_python
from mlsignal.protogen import OLDEST_GRPC, OLDEST_PROTOBUF
from service_fixtures import ms

SCRIPT = Path(__file__).with_name("compat_client.py")
SYMBOL, TF = "BTC/USD", "1h"
STREAM_ROWS = 300
# Imported by the services and the research tools only: the base install must not bring them.
EXTRA_ONLY = ("sklearn", "onnxruntime", "sqlalchemy", "alembic", "skl2onnx", "matplotlib", "dask")
STACK = """
import json, sys
import google.protobuf, grpc
import mlsignal.client, mlsignal.v1.inference_pb2_grpc, mlsignal.v1.training_pb2_grpc
missing = []
for name in sys.argv[1:]:
    try:
        __import__(name)
    except ModuleNotFoundError as exc:
        missing.append(exc.name)
print(json.dumps({"grpcio": grpc.__version__, "protobuf": google.protobuf.__version__, "missing": missing,
                  "packages": {p: __import__(p).__path__[0] for p in ("mlsignal", "shared")}}))
"""

# The services on one database: the client stack, not the store, is under test here.
on_sqlite = pytest.mark.parametrize("services", ["sqlite"], indirect=True)


def run(cmd: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    """Run a command outside the checkout (so only installed code is imported), with a clean environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLSIGNAL_", "PYTHON"))}
    env["MLSIGNAL_DATABASE_URL"] = f"sqlite:///{cwd}/absent.db"
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, **kw)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _stale_files(installed: Path, checkout: Path) -> list[str]:
    """Source files of one package whose installed copy differs from the checkout (or is missing)."""
    stale = []
    for src in sorted(checkout.rglob("*.py*")):
        if "__pycache__" in src.parts or src.suffix not in (".py", ".pyi"):
            continue
        rel = src.relative_to(checkout)
        copy = installed / rel
        if not copy.is_file() or _digest(copy) != _digest(src):
            stale.append(f"{checkout.name}/{rel}")
    return stale


@pytest.fixture(scope="module")
def client_stack(tmp_path_factory) -> dict:
    """The oldest stack in .venv-client: its versions and missing modules, checked to hold the checkout's code."""
    python = require_client_python()
    cwd = tmp_path_factory.mktemp("client-stack")
    res = run([str(python), "-W", "error", "-c", STACK, *EXTRA_ONLY], cwd)
    assert res.returncode == 0, res.stderr
    stack = json.loads(res.stdout)
    stale = []
    for name, path in stack["packages"].items():
        installed = Path(path)
        assert CLIENT_VENV in installed.parents, f"{name} is imported from {installed}, not from the install"
        stale += _stale_files(installed, REPO / name)
    if stale:
        msg = (f"{CLIENT_VENV} holds an older copy of {', '.join(stale[:5])}{' ...' if len(stale) > 5 else ''}; "
               "`make client-venv` (or `make test`) reinstalls it")
        pytest.skip(msg)
    stack["python"] = python
    return stack


@pytest.fixture(scope="module")
def candle_csv(sample_frame, tmp_path_factory) -> Path:
    """BTC/USD candles 2018-12-01 .. 2019-02-01 (after the fixture model's 2018 training window ends) as a CSV."""
    f = sample_frame[(sample_frame.open_time_ms >= ms("2018-12-01")) & (sample_frame.open_time_ms < ms("2019-02-01"))]
    out = f[["open", "high", "low", "close", "volume"]].copy()
    out.insert(0, "timestamp", f["open_time_ms"].to_numpy())
    path = tmp_path_factory.mktemp("compat") / "candles.csv"
    out.to_csv(path, index=False)
    return path


def client_results(python: Path, services, candle_csv: Path, cwd: Path) -> dict:
    target = f"127.0.0.1:{services.inference.port}"
    res = run([str(python), str(SCRIPT), target, SYMBOL, TF, str(candle_csv), services.btc_job.model_id,
               str(STREAM_ROWS)], cwd)
    assert res.returncode == 0, f"{python}: {res.stderr}"
    return json.loads(res.stdout)


def same(a: list[float], b: list[float]) -> bool:
    """Equal float for float; NaN (not ready) equals NaN."""
    return len(a) == len(b) and all(x == y or (math.isnan(x) and math.isnan(y)) for x, y in zip(a, b, strict=True))


def test_oldest_stack_is_the_pinned_one_without_extras(client_stack, capsys):
    assert client_stack["grpcio"] == OLDEST_GRPC
    assert client_stack["protobuf"] == OLDEST_PROTOBUF
    assert client_stack["missing"] == list(EXTRA_ONLY), "the client-only install brings modules only extras need"
    import google.protobuf
    import grpc

    with capsys.disabled():
        print(f"\nclient stacks: oldest grpcio {client_stack['grpcio']} protobuf {client_stack['protobuf']} "
              f"({client_stack['python']}); newest grpcio {grpc.__version__} protobuf {google.protobuf.__version__} "
              f"({sys.executable})")


@on_sqlite
def test_both_stacks_get_identical_probabilities(client_stack, services, candle_csv, tmp_path, capsys):
    oldest = client_results(client_stack["python"], services, candle_csv, tmp_path)
    newest = client_results(Path(sys.executable), services, candle_csv, tmp_path)
    with capsys.disabled():
        print(f"\ncompared: oldest {oldest['versions']} vs newest {newest['versions']}")
    assert oldest["versions"]["grpcio"] == OLDEST_GRPC and oldest["versions"]["protobuf"] == OLDEST_PROTOBUF
    assert CLIENT_VENV in Path(oldest["client_module"]).parents

    model_id = services.btc_job.model_id
    for results in (oldest, newest):
        for key in ("predict", "predict_batched"):
            got = results[key]
            assert got["ML_MODEL_ID"] == [model_id]
            assert sum(got["ML_READY"]) > len(got["ML_READY"]) // 2, "most candles should be ready"
            assert not any(got["ML_IN_SAMPLE"][got["open_time_ms"].index(ms("2019-01-01")):])
        # The batched and the single-request predictions agree within one stack too.
        for col in ("ML_UP_PROB", "ML_DOWN_PROB", "ML_RANGE_PROB"):
            assert same(results["predict"][col], results["predict_batched"][col]), col
        assert len(results["stream"]) == STREAM_ROWS

    for key in ("predict", "predict_batched"):
        assert oldest[key]["open_time_ms"] == newest[key]["open_time_ms"]
        assert oldest[key]["ML_READY"] == newest[key]["ML_READY"]
        assert oldest[key]["ML_IN_SAMPLE"] == newest[key]["ML_IN_SAMPLE"]
        for col in ("ML_UP_PROB", "ML_DOWN_PROB", "ML_RANGE_PROB"):
            assert same(oldest[key][col], newest[key][col]), f"{key} {col} differs between the stacks"
    assert [row[0] for row in oldest["stream"]] == [row[0] for row in newest["stream"]]
    for old_row, new_row in zip(oldest["stream"], newest["stream"], strict=True):
        assert old_row[4:] == new_row[4:]
        assert same(old_row[1:4], new_row[1:4]), f"stream differs at {old_row[0]}"


@on_sqlite
def test_cli_predict_and_health_on_the_oldest_stack(client_stack, services, candle_csv, tmp_path):
    mlsignal = str(CLIENT_VENV / "bin" / "mlsignal")
    target = f"127.0.0.1:{services.inference.port}"
    out = tmp_path / "with_signals.csv"
    res = run([mlsignal, "predict", "--symbol", SYMBOL, "--timeframe", TF, "--csv", str(candle_csv),
               "--target", target, "--model-id", services.btc_job.model_id, "--out", str(out)], tmp_path)
    assert res.returncode == 0, res.stderr
    assert f"model {services.btc_job.model_id}" in res.stderr

    expected = client_results(client_stack["python"], services, candle_csv, tmp_path)["predict"]
    with out.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["timestamp"]) for r in rows] == expected["open_time_ms"]
    for col in ("ML_UP_PROB", "ML_DOWN_PROB", "ML_RANGE_PROB"):
        got = [float(r[col]) if r[col] else math.nan for r in rows]
        assert same(got, expected[col]), col
    assert [r["ML_READY"] == "True" for r in rows] == expected["ML_READY"]

    res = run([mlsignal, "health", "--target", target], tmp_path)
    assert (res.returncode, res.stdout.strip()) == (0, "SERVING"), res.stderr


@pytest.mark.parametrize(
    ("argv", "extras"),
    [
        (["data", "list"], "the database extras: pip install 'mlsignal[inference]'"),
        (["data", "import", "candles.csv", "--symbol", "BTC/USD", "--timeframe", "1h"],
         "the database extras: pip install 'mlsignal[inference]'"),
        (["db", "upgrade"], "the database extras: pip install 'mlsignal[inference]'"),
        (["demo"], "the training and research extras: pip install 'mlsignal[research,training]'"),
        (["backtest-signals", "--symbol", "BTC/USD", "--timeframe", "1h", "--start", "2019-01-01", "--end",
          "2019-02-01", "--train-window", "90d", "--step", "30d", "--out", "signals.csv"],
         "the database extras: pip install 'mlsignal[inference]'"),
        # Reading candles from the database fails on the missing module itself, inside the command.
        (["loadtest", "--target", "127.0.0.1:1", "--rpc", "Predict", "--symbol", "BTC/USD", "--timeframe", "1h",
          "--requests", "1"], "the database extras: pip install 'mlsignal[inference]'"),
    ],
    ids=["data-list", "data-import", "db-upgrade", "demo", "backtest-signals", "loadtest-from-db"],
)
def test_cli_names_the_missing_extra(client_stack, tmp_path, argv, extras):
    res = run([str(CLIENT_VENV / "bin" / "mlsignal"), *argv], tmp_path)
    command = " ".join(["mlsignal", *argv[:2]] if argv[0] in ("data", "db") else ["mlsignal", argv[0]])
    assert (res.returncode, res.stderr) == (2, f"error: '{command}' needs {extras}\n"), res.stderr
    assert res.stdout == ""


@pytest.mark.parametrize("argv", [["--help"], ["predict", "--help"], ["health", "--help"], ["train", "--help"]])
def test_cli_help_on_the_client_install(client_stack, tmp_path, argv):
    res = run([str(CLIENT_VENV / "bin" / "mlsignal"), *argv], tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: mlsignal")
