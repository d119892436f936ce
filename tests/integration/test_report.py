"""`mlsignal report MODEL_ID --out DIR`: a self-contained HTML page built from the model's ModelInfo."""

from __future__ import annotations

import re

from mlsignal.cli import main as cli_main
from mlsignal.v1 import training_pb2


def test_report_renders_with_embedded_charts_and_names_the_model(services, tmp_path, capsys):
    model_id = services.btc_job.model_id
    code = cli_main(["report", model_id, "--out", str(tmp_path / "out"), "--target",
                     f"127.0.0.1:{services.training.port}"])
    out, err = capsys.readouterr()
    assert code == 0, err
    path = tmp_path / "out" / f"report-{model_id}.html"
    assert out.strip() == str(path)
    page = path.read_text()
    assert model_id in page and "BTC/USD 1h" in page
    # every chart is embedded, none is a link to a file that could go missing
    images = re.findall(r'<img src="([^"]+)"', page)
    assert len(images) == 4
    assert all(src.startswith("data:image/png;base64,") and len(src) > 5000 for src in images)
    info = next(m for m in services.train_stub.ListModels(training_pb2.ListModelsRequest()).models
                if m.model_id == model_id)
    m = info.metrics
    # the label definition, the window and its gap counts, the out-of-sample numbers
    assert "fixed horizon of 24 candles of 1h" in page and "2 %" in page
    assert "2018-01-01T00:00:00Z .. 2018-12-31T23:00:00Z" in page
    assert "labels dropped for gaps" in page and "0 holes, 0 missing candles" in page
    assert f"{m['log_loss']:.4f}" in page and f"{m['prior_log_loss']:.4f}" in page
    assert int(m["cv_folds"]) >= 4
    for k in range(int(m["cv_folds"])):
        assert f"{m[f'cv_fold_{k}_log_loss_ratio']:.4f}" in page
    assert f"{m['cv_log_loss_ratio_mean']:.4f}" in page
    # the out-of-distribution candles of the held-back part, and how they scored against the rest
    assert f"{m['ood_rate_test']:.2%} of the held-back part ({int(m['test_ood_rows']):,} candles" in page
    if "test_ood_log_loss_ratio" in m:
        assert f"{m['test_ood_log_loss_ratio']:.4f} / {m['test_in_distribution_log_loss_ratio']:.4f}" in page
    else:
        assert "no held-back candle was flagged" in page


def test_report_of_an_unknown_model_is_not_found(services, tmp_path, capsys):
    code = cli_main(["report", "no-such-model", "--out", str(tmp_path), "--target",
                     f"127.0.0.1:{services.training.port}"])
    assert code == 2
    assert "NOT_FOUND" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
