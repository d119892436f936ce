"""A client in another language: Node.js with @grpc/grpc-js and @grpc/proto-loader, built from protos/mlsignal/v1.

`tests/node/client.js` loads the protos at run time, sends one Predict over a month of BTC/USD candles and one
StreamPredict with one candle per message to the real inference service, and prints the probabilities as JSON. They
must equal, bit for bit, what the Python client (`mlsignal.client.InferenceClient`) gets for the same candles: ready
flags, in-sample flags and float64 probabilities (NaN where not ready, null in the JSON).

`make test` installs the npm packages (`npm ci` in tests/node). Without Node.js or the packages these tests are
skipped locally; under CI (CI=true) the skip is a failure (tests/conftest.py).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from mlsignal import client as mc
from service_fixtures import ms

REPO = Path(__file__).resolve().parents[2]
NODE_DIR = REPO / "tests" / "node"
CLIENT_JS = NODE_DIR / "client.js"
CANDLE_COLUMNS = ["open", "high", "low", "close", "volume"]
# The end of the model's training window (in-sample) and the start of 2019 (out-of-sample).
START, END = "2018-12-20", "2019-01-06"


def require_node() -> str:
    """The node executable, with tests/node's packages installed; skip (a failure under CI=true) when either is
    missing."""
    node = shutil.which("node")
    if node is None:
        msg = "Node.js (node) is not on PATH"
    elif not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir() or \
            not (NODE_DIR / "node_modules" / "@grpc" / "proto-loader").is_dir():
        msg = f"the npm packages of {NODE_DIR} are not installed; `make test` installs them (npm ci)"
    else:
        return node
    pytest.skip(msg)


@pytest.fixture(scope="module")
def node() -> str:
    return require_node()


@pytest.fixture(scope="module")
def candles(sample_frame) -> pd.DataFrame:
    f = sample_frame[(sample_frame.open_time_ms >= ms(START)) & (sample_frame.open_time_ms < ms(END))]
    return f[["open_time_ms", *CANDLE_COLUMNS]].reset_index(drop=True)


@pytest.fixture(scope="module")
def candles_file(candles, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("node-client") / "candles.json"
    rows = [{"open_time_ms": str(int(r.open_time_ms)), **{c: float(getattr(r, c)) for c in CANDLE_COLUMNS}}
            for r in candles.itertuples(index=False)]
    path.write_text(json.dumps(rows))  # float64 -> shortest round-trip decimal -> the same double in JavaScript
    return path


def run_node(node: str, target: str, candles_file: Path, *extra: str) -> tuple[int, dict]:
    proc = subprocess.run([node, str(CLIENT_JS), "--target", target, "--candles", str(candles_file), *extra],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    if not proc.stdout.strip():
        pytest.fail(f"node client printed nothing (exit {proc.returncode}): {proc.stderr}")
    return proc.returncode, json.loads(proc.stdout)


def prob(v: float | None) -> float:
    return math.nan if v is None else v


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def js_rows(preds: list[dict]) -> list[tuple]:
    return [(int(p["open_time_ms"]), p["ready"], p["in_sample"], prob(p["ml_up_prob"]), prob(p["ml_down_prob"]),
             prob(p["ml_range_prob"])) for p in preds]


def assert_rows_equal(got: list[tuple], want: list[tuple]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g[:3] == w[:3], (g, w)
        assert all(same(x, y) for x, y in zip(g[3:], w[3:], strict=True)), (g, w)  # exact, not approximate


@pytest.fixture(scope="module")
def python_results(services, candles):
    """What the Python client gets for the same candles: one Predict, and one stream fed a candle at a time."""
    df = candles.set_index(pd.DatetimeIndex(pd.to_datetime(candles.open_time_ms, unit="ms", utc=True),
                                            name="open_time"))[CANDLE_COLUMNS]
    with mc.InferenceClient(f"127.0.0.1:{services.inference.port}") as c:
        out = c.predict(df, "BTC/USD", "1h")
        live = list(c.stream(df.iterrows(), "BTC/USD", "1h"))
    batch = [(int(t.value // 1_000_000), bool(r.ML_READY), bool(r.ML_IN_SAMPLE), float(r.ML_UP_PROB),
              float(r.ML_DOWN_PROB), float(r.ML_RANGE_PROB)) for t, r in zip(out.index, out.itertuples(), strict=True)]
    streamed = [(p.open_time_ms, p.ready, p.in_sample, p.up, p.down, p.range) for p in live]
    return out["ML_MODEL_ID"].iloc[0], batch, streamed


def test_node_client_gets_exactly_the_python_clients_probabilities(node, services, candles_file, python_results):
    model_id, batch, streamed = python_results
    code, got = run_node(node, f"127.0.0.1:{services.inference.port}", candles_file)
    assert code == 0, got

    assert got["predict"]["model_id"] == model_id
    assert_rows_equal(js_rows(got["predict"]["predictions"]), batch)
    assert set(got["stream"]["model_ids"]) == {model_id}
    assert_rows_equal(js_rows(got["stream"]["predictions"]), streamed)

    # The window covers both kinds of candle: warm-up (not ready), in-sample and out-of-sample.
    ready = [r for r in batch if r[1]]
    assert 0 < len(ready) < len(batch)
    assert {r[2] for r in ready} == {True, False}
    # A stream fed one candle at a time answers exactly what one Predict over the series answers.
    assert_rows_equal(js_rows(got["stream"]["predictions"]), batch)


def test_without_keep_case_the_open_time_is_lost_and_the_server_refuses(node, services, candles_file):
    """proto-loader's default camelCase names drop the snake_case open_time_ms key: the server sees 0 and refuses."""
    code, got = run_node(node, f"127.0.0.1:{services.inference.port}", candles_file, "--no-keep-case")
    assert code == 1
    assert got["error"]["rpc"] == "Predict"
    assert got["error"]["code_name"] == "INVALID_ARGUMENT"
    assert "open_time_ms" in got["error"]["details"]
