"""Retrain policy rules that need no server: the schedule, validation and conversion of the message."""

from __future__ import annotations

import pytest
from google.protobuf.duration_pb2 import Duration

from mlsignal.v1 import common_pb2, training_pb2
from shared.errors import InvalidArgument
from shared.labels import LabelSpec
from shared.store.policies import RetrainPolicy, next_due
from shared.timeframes import format_duration, parse_duration
from training_service import converters
from training_service.policies import validate

H, D = 3_600_000, 86_400_000


@pytest.mark.parametrize("due, now, expected", [
    (1_000, 999, 1_000),  # not due yet: unchanged
    (1_000, 1_000, 1_000 + D),  # due now: one period on
    (1_000, 1_000 + D - 1, 1_000 + D),
    (1_000, 1_000 + D, 1_000 + 2 * D),  # exactly on the next due time: that one has passed too
    (1_000, 1_000 + 5 * D + H, 1_000 + 6 * D),  # five missed due times: the first one after now
])
def test_next_due_is_the_first_due_time_after_now_on_the_schedule(due, now, expected):
    assert next_due(due, D, now) == expected


@pytest.mark.parametrize("text", ["30m", "1h", "36h", "1d", "7d", "365d"])
def test_durations_read_back(text):
    assert format_duration(parse_duration(text)) == text


def test_durations_are_shown_in_the_largest_unit_that_divides_them():
    assert [format_duration(ms) for ms in (parse_duration("2w"), 90_000, 1_500)] == ["14d", "90s", "1500ms"]


def _policy(**kw) -> RetrainPolicy:
    return RetrainPolicy(**{"symbol": "BTC/USDT", "timeframe": "1h", "every_ms": D, "window_ms": 365 * D, **kw})


def test_validation_names_every_and_window():
    assert validate(_policy()) == _policy()
    assert validate(_policy(every_ms=H)).every_ms == H
    with pytest.raises(InvalidArgument) as caught:
        validate(_policy(every_ms=H - 1))
    assert caught.value.field == "every"
    with pytest.raises(InvalidArgument) as caught:
        validate(_policy(timeframe="1d", every_ms=12 * H))
    assert caught.value.field == "every" and "at least one 1d candle (1d)" in str(caught.value)
    needed = 1123  # warm-up 100 - 1 + horizon 24 + 1,000 labelled rows
    assert validate(_policy(window_ms=needed * H)).window_ms == needed * H
    with pytest.raises(InvalidArgument) as caught:
        validate(_policy(window_ms=needed * H - 1))
    assert caught.value.field == "window" and "needs at least 1123" in str(caught.value)
    with pytest.raises(InvalidArgument) as caught:
        validate(_policy(window_ms=47 * D, label=LabelSpec(horizon_bars=200)))
    assert caught.value.field == "window" and "label.horizon_bars=200" in str(caught.value)


def _duration(ms: int) -> Duration:
    d = Duration()
    d.FromMilliseconds(ms)
    return d


def test_the_message_takes_the_training_defaults_and_round_trips():
    msg = training_pb2.RetrainPolicy(symbol="ETH/USDT", timeframe="4h", every=_duration(D), window=_duration(400 * D),
                                     label=common_pb2.LabelSpec(threshold=0.03), paused=True,
                                     last_outcome="ignored: output only")
    policy = converters.retrain_policy(msg)
    assert policy.label == LabelSpec(horizon_bars=24, threshold=0.03)
    assert policy.params.n_estimators == 200 and policy.paused and policy.last_outcome == ""
    back = converters.policy_message(policy)
    assert back.every == msg.every and back.window == msg.window and back.label.horizon_bars == 24
    with pytest.raises(InvalidArgument) as caught:
        converters.retrain_policy(training_pb2.RetrainPolicy(symbol="ETH/USDT", timeframe="4h", every=_duration(D),
                                                             window=Duration(seconds=86_400, nanos=500)))
    assert caught.value.field == "window" and "whole milliseconds" in str(caught.value)
