"""Predict over a candle CSV with mlsignal.client and print the results and the gRPC stack as one JSON object.

    python compat_client.py TARGET SYMBOL TIMEFRAME CSV MODEL_ID STREAM_ROWS

The CSV has the header timestamp,open,high,low,close,volume with epoch-millisecond timestamps. The whole file goes
through InferenceClient.predict (several overlapping requests of at most 400 rows, then once more in one request);
its last STREAM_ROWS rows also go through InferenceClient.stream. Floats are printed exactly (JSON numbers round-trip,
NaN for rows that are not ready). Run by the compatibility test under each supported gRPC stack.
"""

from __future__ import annotations

import csv
import json
import sys

import google.protobuf
import grpc
import pandas as pd

import mlsignal.client
from mlsignal.client import InferenceClient

CANDLE_COLUMNS = ["open", "high", "low", "close", "volume"]
PROB_COLUMNS = ["ML_UP_PROB", "ML_DOWN_PROB", "ML_RANGE_PROB"]


def read_frame(path: str) -> pd.DataFrame:
    """The candles, every number parsed by float() so each stack sends exactly the same values."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    times = [int(r["timestamp"]) for r in rows]
    index = pd.DatetimeIndex(pd.to_datetime(times, unit="ms", utc=True), name="open_time")
    return pd.DataFrame([[float(r[c]) for c in CANDLE_COLUMNS] for r in rows], columns=CANDLE_COLUMNS, index=index)


def columns(out: pd.DataFrame) -> dict[str, list]:
    result: dict[str, list] = {"open_time_ms": [int(t.value // 1_000_000) for t in out.index]}
    for col in PROB_COLUMNS:
        result[col] = [float(v) for v in out[col]]
    for col in ("ML_READY", "ML_IN_SAMPLE"):
        result[col] = [bool(v) for v in out[col]]
    result["ML_MODEL_ID"] = sorted(set(out["ML_MODEL_ID"]))
    return result


def main(argv: list[str]) -> int:
    target, symbol, timeframe, csv, model_id, stream_rows = argv
    frame = read_frame(csv)
    with InferenceClient(target, max_batch=400) as client:
        batched = client.predict(frame, symbol, timeframe, model_id=model_id)
    with InferenceClient(target) as client:
        whole = client.predict(frame, symbol, timeframe, model_id=model_id)
        tail = frame.iloc[-int(stream_rows):]
        streamed = [
            [p.open_time_ms, p.up, p.down, p.range, p.ready, p.in_sample, p.model_id]
            for p in client.stream(tail.itertuples(), symbol, timeframe, model_id=model_id)
        ]
    report = {
        "versions": {"python": sys.version.split()[0], "grpcio": grpc.__version__,
                     "protobuf": google.protobuf.__version__, "pandas": pd.__version__},
        "client_module": mlsignal.client.__file__,
        "predict": columns(whole),
        "predict_batched": columns(batched),
        "stream": streamed,
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
