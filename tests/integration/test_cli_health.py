"""`mlsignal health` finds its target from the environment, as every other client command does, and says what an
unknown service name means instead of a bare NOT_FOUND."""

from __future__ import annotations

from mlsignal.cli import main as cli_main


def test_health_defaults_to_the_configured_addresses(services, monkeypatch, capsys):
    monkeypatch.setenv("MLSIGNAL_INFERENCE_ADDR", f"127.0.0.1:{services.inference.port}")
    monkeypatch.setenv("MLSIGNAL_TRAINING_ADDR", f"127.0.0.1:{services.training.port}")
    assert cli_main(["health"]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"
    assert cli_main(["health", "--training", "--service", "mlsignal.v1.TrainingService"]) == 0
    assert cli_main(["health", "--service", "mlsignal.v1.TrainingService"]) == 1  # inference has no training status
    capsys.readouterr()


def test_an_unknown_service_name_lists_the_known_ones(services, capsys):
    target = f"127.0.0.1:{services.inference.port}"
    assert cli_main(["health", "--target", target, "--service", "foo"]) == 1
    err = capsys.readouterr().err
    assert "no health status for service 'foo'" in err and "mlsignal.v1.InferenceService" in err
    assert "NOT_FOUND: \n" not in err
