"""Things defined once and used by several packages: model stage names, classes and label kinds in the report, PEM
files, and what counts as loopback for clients and servers."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlsignal.client import model_stage_name
from mlsignal.v1 import common_pb2


def test_model_stage_names_are_the_registry_stages():
    from shared.store.registry import STAGES

    values = [v for v in common_pb2.ModelStage.values() if v != common_pb2.MODEL_STAGE_UNSPECIFIED]
    assert sorted(model_stage_name(v) for v in values) == sorted(STAGES)
    assert model_stage_name(common_pb2.MODEL_STAGE_UNSPECIFIED) == "-"
    assert model_stage_name(99) == "STAGE_99"  # a stage of a newer server


def test_the_report_names_stage_label_kind_and_classes_from_their_definitions():
    from mlsignal.report import CLASS_COLOURS, render_html
    from shared.labels import CLASSES

    assert tuple(CLASS_COLOURS) == CLASSES
    label = common_pb2.LabelSpec(kind=common_pb2.LABEL_KIND_TRIPLE_BARRIER, horizon_bars=24, threshold=0.02)
    page = render_html(common_pb2.ModelInfo(model_id="m1", symbol="BTC/USD", timeframe="1h", label=label,
                                            stage=common_pb2.MODEL_STAGE_RESEARCH, stage_reason="walk-forward"))
    assert "research (walk-forward)" in page and "triple barrier over 24 candles of 1h" in page
    page = render_html(common_pb2.ModelInfo(model_id="m2", symbol="BTC/USD", timeframe="1h",
                                            label=common_pb2.LabelSpec(horizon_bars=12, threshold=0.01)))
    assert "fixed horizon of 12 candles of 1h" in page and ">stage<" not in page  # no stage reported: no row


def test_unreadable_or_non_pem_files_name_their_setting_for_servers_clients_and_dask(tmp_path, monkeypatch):
    from shared.settings import Settings, client_security
    from training_service.executors import dask_security

    pem = tmp_path / "ok.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    text = tmp_path / "not.pem"
    text.write_text("hello")
    missing = tmp_path / "missing.pem"
    with pytest.raises(ValueError, match=r"MLSIGNAL_TLS_KEY='.*not\.pem': not a PEM file"):
        Settings(tls_cert=pem, tls_key=text).server_tls_pair()
    with pytest.raises(ValueError, match=r"--ca-cert='.*missing\.pem': cannot read"):
        client_security(ca_cert=missing)
    with pytest.raises(ValueError, match=r"MLSIGNAL_DASK_TLS_CERT='.*not\.pem': not a PEM file"):
        dask_security((pem, text, pem))
    with pytest.raises(ValueError, match=r"MLSIGNAL_DASK_TLS_KEY='.*missing\.pem': cannot read"):
        dask_security((pem, pem, Path(missing)))


def test_clients_and_servers_share_one_loopback_check():
    import mlsignal.client.channel as channel
    import shared.settings as settings

    assert channel.is_loopback_host is settings.is_loopback_host
    for host in ("localhost", "LOCALHOST.", "127.0.0.1", "127.9.8.7", "::1", "[::1]"):
        assert settings.is_loopback_host(host), host
    for host in ("0.0.0.0", "10.0.0.1", "example.com", "localhost.example", "::", ""):
        assert not settings.is_loopback_host(host), host
