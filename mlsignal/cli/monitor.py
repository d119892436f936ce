"""`mlsignal monitor`: how a model's served predictions scored on the outcomes that followed (live log loss against the
training prior's, Brier, reliability), its age and staleness; `--plot` draws the live reliability diagram next to the
out-of-sample one from training."""

from __future__ import annotations

import math
import re
import sys
import time
from pathlib import Path
from typing import Any

from mlsignal.cli.training import client_errors
from shared.labels import CLASSES
from shared.timeframes import TIMEFRAME_MS, ms_to_iso

STALENESS_SERVICE = "mlsignal.staleness"
# Per-bin out-of-sample reliability in a model's metrics: oos_reliability_<class>_<bin>_mean / _freq / _count.
_OOS_BIN = re.compile(rf"^oos_reliability_({'|'.join(CLASSES)})_(\d+)_(mean|freq|count)$")


def register(sub) -> None:
    from mlsignal.cli.security import add_security_arguments

    p = sub.add_parser(
        "monitor",
        help="live performance of a model: scored candles, log loss against the prior, reliability, staleness",
        description=(
            "Ask the inference service how a model's served predictions scored on the outcomes realised since "
            "(ready, out-of-sample predictions, scored once their label is known): the number of candles scored, "
            "the live log loss next to the training class prior's on the same candles, the multiclass Brier score "
            "and the reliability of each class. Also the model's age and the `mlsignal.staleness` health "
            "(NOT_SERVING when the server's MLSIGNAL_MODEL_MAX_AGE is exceeded; shown only when the server sets "
            "it), the expected log loss of the "
            "probabilities served, the live test against the class prior, and the trust signals of the last "
            "MLSIGNAL_DRIFT_WINDOW candles this replica served: the out-of-distribution rate and the features that "
            "drifted most (PSI). With --plot, draw the live reliability diagram, next to the out-of-sample one from "
            "training when the model has it, and the feature drift."
        ),
    )
    p.add_argument("--symbol", required=True, help="market symbol, like BTC/USDT")
    p.add_argument("--timeframe", required=True, metavar="TF", help=f"one of {' '.join(TIMEFRAME_MS)}")
    p.add_argument("--model-id", default="", metavar="ID", help="this model instead of the one serving now")
    p.add_argument("--plot", type=Path, metavar="FILE.png",
                   help="write the reliability diagram to this PNG file (needs the research extra)")
    p.add_argument("--target", metavar="ADDR",
                   help="inference service address (default: MLSIGNAL_INFERENCE_ADDR, 127.0.0.1:50052)")
    add_security_arguments(p)
    p.set_defaults(func=_monitor)


def oos_reliability(metrics: Any) -> list[tuple[str, int, float, float, int]]:
    """(class, bin, mean predicted, observed frequency, count) of the out-of-sample reliability bins a model's
    training metrics carry, sorted; empty when it has none."""
    bins: dict[tuple[str, int], dict[str, float]] = {}
    for key, value in dict(metrics).items():
        m = _OOS_BIN.match(key)
        if m:
            bins.setdefault((m.group(1), int(m.group(2))), {})[m.group(3)] = float(value)
    out = []
    for (name, b), d in sorted(bins.items(), key=lambda kv: (CLASSES.index(kv[0][0]), kv[0][1])):
        if "mean" in d and "freq" in d and d.get("count", 1) > 0 and math.isfinite(d["mean"] + d["freq"]):
            out.append((name, b, d["mean"], d["freq"], int(d.get("count", 0))))
    return out


def _num(x: float, digits: int = 4) -> str:
    return "n/a" if not math.isfinite(x) else f"{x:.{digits}f}"


def _age(ms: int) -> str:
    days, rest = divmod(max(ms, 0) // 1000, 86_400)
    return f"{days}d {rest // 3600}h" if days else f"{rest // 3600}h {rest % 3600 // 60}m"


def format_report(perf: Any, info: Any, staleness: str | None, serving_id: str) -> str:
    """The monitor table: model, scored candles, live metrics against the prior, the training figures, staleness (when
    the server watches it) and the live reliability per class."""
    lines = []
    role = "serving" if perf.model_id == serving_id else "pinned"
    lines.append(f"model       {perf.model_id} ({role})")
    if info is not None and info.created_at.seconds:
        created_ms = info.created_at.ToMilliseconds()
        lines.append(f"created     {ms_to_iso(created_ms)} (age {_age(int(time.time() * 1000) - created_ms)})")
    if staleness is not None:
        lines.append(f"staleness   {staleness}")
    if perf.scored == 0:
        lines.append("scored      0 candles: no served prediction has a realised label yet")
        return "\n".join(lines)
    lines.append(f"scored      {perf.scored} candles, {ms_to_iso(perf.first_open_time_ms)} .. "
                 f"{ms_to_iso(perf.last_open_time_ms)}")
    ratio = perf.log_loss / perf.prior_log_loss if perf.prior_log_loss > 0 else math.nan
    verdict = ("better than the prior" if ratio < 1 else "WORSE than the prior") if math.isfinite(ratio) else ""
    lines.append("")
    lines.append(f"{'':12}{'live':>10}{'prior':>10}{'ratio':>9}")
    lines.append(f"{'log_loss':12}{_num(perf.log_loss):>10}{_num(perf.prior_log_loss):>10}{_num(ratio, 3):>9}  "
                 f"{verdict}")
    lines.append(f"{'brier':12}{_num(perf.brier):>10}")
    if perf.scored and math.isfinite(perf.expected_log_loss):
        gap = perf.log_loss - perf.expected_log_loss
        note = "calibration holds" if abs(gap) <= 0.02 else (
            "WORSE than the probabilities expect: calibration drifting" if gap > 0 else
            "better than the probabilities expect: they are too cautious")
        lines.append(f"{'expected':12}{_num(perf.expected_log_loss):>10}{'':10}{'':9}  live log loss "
                     f"{gap:+.4f} against it: {note}")
    c = perf.prior_comparison
    if c.paired:
        test = ("WORSE than its prior: significant" if perf.worse_than_prior else
                {"reject": "not worse than its prior: significant", "undecided": "undecided"}.get(c.decision,
                                                                                                  c.decision))
        lines.append(f"{'prior test':12}{c.paired:>10} paired, gain of the prior {c.mean_log_loss_difference:+.4f} "
                     f"\u00b1 {c.standard_error:.4f} (z {c.statistic:+.2f}): {test}")
    lines.extend(_drift_lines(perf, info))
    if info is not None and "log_loss" in info.metrics and "prior_log_loss" in info.metrics:
        oos, prior = info.metrics["log_loss"], info.metrics["prior_log_loss"]
        lines.append(f"{'training':12}{_num(oos):>10}{_num(prior):>10}{_num(oos / prior if prior else math.nan, 3):>9}"
                     "  (out-of-sample log loss at training)")
    lines.append("")
    lines.append("live reliability: per bin of predicted probability, candles (n), mean predicted, observed frequency")
    lines.append((f"{'':12}" + "".join(f"{name:>16}{'':8}" for name in CLASSES)).rstrip())
    lines.append(f"{'bin':12}" + f"{'n':>8}{'pred':>8}{'obs':>8}" * len(CLASSES))
    cells = {(b.class_name, round(b.lower * 10)): b for b in perf.reliability}
    for k in sorted({key[1] for key in cells}):
        row = f"{k / 10:.1f}-{(k + 1) / 10:.1f}".ljust(12)
        for name in CLASSES:
            b = cells.get((name, k))
            row += (f"{b.count:>8}{b.mean_predicted:>8.2f}{b.observed_frequency:>8.2f}" if b is not None
                    else f"{'-':>8}{'':16}")
        lines.append(row.rstrip())
    return "\n".join(lines)


#: PSI above this is a large shift of a feature's distribution (the usual reading: < 0.1 none, 0.1-0.2 moderate).
PSI_ALERT = 0.2
TOP_DRIFT = 5


def _drift_lines(perf: Any, info: Any) -> list[str]:
    """The OOD rate and the features that moved most, over the drift window of this replica."""
    if not perf.drift_candles:
        return ["drift       no candle served by this replica yet (the window is per replica, in memory)"]
    lines = []
    train_rate = info.metrics.get("ood_rate_train") if info is not None else None
    rate = f"{perf.ood_rate:.1%}" if math.isfinite(perf.ood_rate) else "n/a (the model has no OOD score)"
    versus = f" (training rows: {train_rate:.1%})" if train_rate is not None else ""
    lines.append(f"ood rate    {rate} of the last {perf.drift_candles} candles served{versus}")
    if perf.drift:
        importance = dict(info.metrics) if info is not None else {}
        top = ", ".join(
            f"{d.feature} {d.psi:.2f}{' *' if d.psi > PSI_ALERT else ''}"
            + (f" (importance {importance['importance.' + d.feature]:.3f})"
               if f"importance.{d.feature}" in importance else "")
            for d in perf.drift[:TOP_DRIFT])
        lines.append(f"drift (PSI) {top}   (* above {PSI_ALERT}: a large shift)")
    return lines


def write_plot(perf: Any, oos: list[tuple[str, int, float, float, int]], path: Path, title: str) -> None:
    """Reliability diagrams, one panel per class: the live bins (marker area by count) and, when given, the
    out-of-sample bins from training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, all_axes = plt.subplots(1, 4, figsize=(19, 5.4), layout="constrained",
                                 gridspec_kw={"width_ratios": [1, 1, 1, 1.1]})
    axes, drift_ax = all_axes[:3], all_axes[3]
    biggest = max([b.count for b in perf.reliability] + [c for *_, c in oos] + [1])
    for ax, name in zip(axes, CLASSES, strict=True):
        ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="perfectly calibrated")
        if oos:
            pts = [(m, f, c) for n, _, m, f, c in oos if n == name]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], color="tab:blue", lw=1.2, marker="s", ms=4,
                        label=f"out of sample at training ({sum(p[2] for p in pts)} candles)")
        live = [b for b in perf.reliability if b.class_name == name]
        if live:
            x = [b.mean_predicted for b in live]
            y = [b.observed_frequency for b in live]
            ax.plot(x, y, color="tab:orange", lw=1.2, zorder=2)
            ax.scatter(x, y, s=[20 + 280 * b.count / biggest for b in live], color="tab:orange", alpha=0.8,
                       edgecolor="black", linewidth=0.4, zorder=3, label=f"live ({sum(b.count for b in live)} candles)")
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
        ax.set_title(f"ML_{name.upper()}_PROB")
        ax.set_xlabel("mean predicted probability")
        ax.legend(loc="lower right", fontsize=8)
    axes[0].set_ylabel("observed frequency")
    if perf.drift:
        top = list(perf.drift)[:12][::-1]
        drift_ax.barh([d.feature for d in top], [d.psi for d in top],
                      color=["tab:red" if d.psi > PSI_ALERT else "tab:gray" for d in top])
        drift_ax.axvline(PSI_ALERT, color="tab:red", lw=1, ls="--", label=f"PSI {PSI_ALERT}")
        drift_ax.legend(loc="lower right", fontsize=8)
    rate = f", OOD rate {perf.ood_rate:.1%}" if perf.drift_candles and math.isfinite(perf.ood_rate) else ""
    drift_ax.set_title(f"feature drift over the last {perf.drift_candles} candles{rate}")
    drift_ax.set_xlabel("population stability index")
    ratio = perf.log_loss / perf.prior_log_loss if perf.scored and perf.prior_log_loss > 0 else math.nan
    fig.suptitle(f"{title}\nlive log loss {_num(perf.log_loss)} vs prior {_num(perf.prior_log_loss)} "
                 f"(ratio {_num(ratio, 3)}, {perf.scored} candles scored), expected {_num(perf.expected_log_loss)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _staleness(channel: Any) -> str | None:
    """The server's `mlsignal.staleness` health, or None when it does not watch model age (MLSIGNAL_MODEL_MAX_AGE
    unset there: the name is not registered)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=STALENESS_SERVICE), timeout=5)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return None
        return f"unknown ({exc.code().name})"
    if reply.status == health_pb2.HealthCheckResponse.SERVING:
        return "SERVING (no serving model older than MLSIGNAL_MODEL_MAX_AGE)"
    return ("NOT_SERVING: a serving model is older than the server's MLSIGNAL_MODEL_MAX_AGE; retrain or promote "
            "a newer one")


@client_errors
def _monitor(args) -> int:
    from mlsignal.cli.security import security_kwargs
    from mlsignal.client import InferenceClient, MlsignalClientError
    from shared.settings import Settings

    target = args.target or Settings.from_env().inference_addr
    security = security_kwargs(args)
    with InferenceClient(target, **security) as client:
        perf = client.live_performance(args.symbol, args.timeframe, args.model_id)
        try:
            serving = client.get_model(args.symbol, args.timeframe)
        except MlsignalClientError:
            serving = None
        info = serving if serving is not None and serving.model_id == perf.model_id else None
        if info is None:
            info = _model_info(args, security, perf.model_id)
        staleness = _staleness(client.channel)
    print(format_report(perf, info, staleness, serving.model_id if serving is not None else ""))
    if args.plot:
        oos = oos_reliability(info.metrics) if info is not None else []
        write_plot(perf, oos, args.plot, f"{args.symbol} {args.timeframe} model {perf.model_id}")
        note = "" if oos else " (the model's training metrics carry no reliability bins: live only)"
        print(f"\nreliability diagram -> {args.plot}{note}")
    return 0


def _model_info(args, security: dict, model_id: str) -> Any:
    """A pinned model's registry entry, from the training service (None when it cannot be reached)."""
    from mlsignal.client import MlsignalClientError, TrainingClient
    from shared.settings import Settings

    try:
        with TrainingClient(Settings.from_env().training_addr, **security) as training:
            return next((m for m in training.list_models(args.symbol, args.timeframe) if m.model_id == model_id),
                        None)
    except MlsignalClientError as exc:
        print(f"note: the model's training figures are not shown: {exc.details}", file=sys.stderr)
        return None
