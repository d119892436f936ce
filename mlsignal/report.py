"""A model's evaluation as one self-contained HTML page (charts embedded as PNG data URIs).

Everything comes from the model's ModelInfo as the training service lists it: the label definition, the training
window with its gap counts, and the metrics the pipeline recorded (out-of-sample reliability per class, log loss
against the class prior per cross-validation fold and on the held-back test part, class balance, permutation
importance). Nothing is recomputed here, so the page shows exactly what the registry holds.

    mlsignal report MODEL_ID --out DIR
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlsignal.client.training import label_kind_name, model_stage_name
from shared.labels import CLASSES, TRIPLE_BARRIER
from shared.timeframes import ms_to_iso

CLASS_COLOURS = dict(zip(CLASSES, ("#c0392b", "#7f8c8d", "#27ae60"), strict=True))  # down, range, up
BINS = 10
TOP_FEATURES = 20


def report_filename(model_id: str) -> str:
    return f"report-{model_id}.html"


def find_model(models, model_id: str):
    """The ModelInfo with this id among `models`, or None."""
    return next((m for m in models if m.model_id == model_id), None)


def write_report(info: Any, out_dir: str | Path) -> Path:
    """Write the report of one model (a ModelInfo message) into `out_dir`; returns the path of the HTML file."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / report_filename(info.model_id)
    tmp = path.with_suffix(".html.partial")
    tmp.write_text(render_html(info), encoding="utf-8")
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------------------------------------------------
# reading the metrics


def _get(m: Mapping[str, float], key: str) -> float | None:
    v = m.get(key)
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def cv_folds(m: Mapping[str, float]) -> list[dict[str, float | None]]:
    n = int(m.get("cv_folds", 0) or 0)
    return [{
        "log_loss": _get(m, f"cv_fold_{k}_log_loss"),
        "prior_log_loss": _get(m, f"cv_fold_{k}_prior_log_loss"),
        "ratio": _get(m, f"cv_fold_{k}_log_loss_ratio"),
        "start_ms": _get(m, f"cv_fold_{k}_start_ms"),
        "end_ms": _get(m, f"cv_fold_{k}_end_ms"),
    } for k in range(n)]


def reliability_bins(m: Mapping[str, float], name: str) -> list[tuple[int, float, float, int]]:
    """(bin, mean predicted, observed frequency, count) of the non-empty bins of one class."""
    out = []
    for b in range(BINS):
        count = int(m.get(f"oos_reliability_{name}_{b}_count", 0) or 0)
        mean, freq = _get(m, f"oos_reliability_{name}_{b}_mean"), _get(m, f"oos_reliability_{name}_{b}_freq")
        if count and mean is not None and freq is not None:
            out.append((b, mean, freq, count))
    return out


def importances(m: Mapping[str, float]) -> list[tuple[str, float]]:
    items = [(k.split(".", 1)[1], float(v)) for k, v in m.items() if k.startswith("importance.")]
    return sorted(items, key=lambda kv: kv[1], reverse=True)


def label_kind(info: Any) -> str:
    """The model's label definition, `shared.labels.FIXED_HORIZON` or `TRIPLE_BARRIER` (unspecified: fixed horizon,
    the training default)."""
    return label_kind_name(int(getattr(info.label, "kind", 0)))


def label_text(info: Any) -> str:
    kind = label_kind(info)
    h, thr = info.label.horizon_bars, info.label.threshold
    pct = f"{thr * 100:g} %"
    if kind == TRIPLE_BARRIER:
        return (f"triple barrier over {h} candles of {info.timeframe}: up if the close first rises more than {pct} "
                f"above the candle's close within {h} candles, down if it first falls more than {pct}, range if "
                "neither happens")
    return (f"fixed horizon of {h} candles of {info.timeframe}: up if the close {h} candles later is more than {pct} "
            f"above the candle's close, down if more than {pct} below, range otherwise")


# --------------------------------------------------------------------------------------------------------------------
# charts


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def chart_reliability(m: Mapping[str, float]) -> str | None:
    if not any(reliability_bins(m, c) for c in CLASSES):
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(11, 5.2), gridspec_kw={"height_ratios": [3, 1]}, sharex="col")
    for j, name in enumerate(CLASSES):
        ax, hist = axes[0][j], axes[1][j]
        bins = reliability_bins(m, name)
        ax.plot([0, 1], [0, 1], color="#bbbbbb", lw=1, ls="--", label="perfectly calibrated")
        if bins:
            xs = [b[1] for b in bins]
            ys = [b[2] for b in bins]
            sizes = [20 + 180 * math.sqrt(b[3] / max(c[3] for c in bins)) for b in bins]
            ax.plot(xs, ys, color=CLASS_COLOURS[name], lw=1)
            ax.scatter(xs, ys, s=sizes, color=CLASS_COLOURS[name], zorder=3, label="test part (size: candles)")
        base = _get(m, f"test_class_{name}")
        if base is not None:
            ax.axhline(base, color=CLASS_COLOURS[name], lw=0.8, ls=":", label=f"test frequency {base:.2f}")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(f"{name}: ML_{name.upper()}_PROB")
        ax.set_ylabel("observed frequency" if j == 0 else "")
        ax.legend(loc="upper left", fontsize=7)
        counts = [int(m.get(f"oos_reliability_{name}_{b}_count", 0) or 0) for b in range(BINS)]
        hist.bar([(b + 0.5) / BINS for b in range(BINS)], counts, width=0.9 / BINS, color=CLASS_COLOURS[name])
        hist.set_xlim(0, 1)
        hist.set_xlabel("predicted probability")
        hist.set_ylabel("candles" if j == 0 else "")
    fig.suptitle("Reliability on the held-back test part (out of sample)")
    fig.tight_layout()
    return _png(fig)


def chart_log_loss(m: Mapping[str, float]) -> str | None:
    folds = [f for f in cv_folds(m) if f["log_loss"] is not None and f["prior_log_loss"] is not None]
    names = [f"CV fold {k + 1}" for k in range(len(folds))]
    model_ll = [float(f["log_loss"] or 0.0) for f in folds]
    prior_ll = [float(f["prior_log_loss"] or 0.0) for f in folds]
    if _get(m, "log_loss") is not None and _get(m, "prior_log_loss") is not None:
        names.append("test part")
        model_ll.append(float(m["log_loss"]))
        prior_ll.append(float(m["prior_log_loss"]))
    if not names:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(11, 3.8))
    x = list(range(len(names)))
    w = 0.38
    ax.bar([i - w / 2 for i in x], model_ll, width=w, color="#2c7fb8", label="model (served probabilities)")
    ax.bar([i + w / 2 for i in x], prior_ll, width=w, color="#cccccc", label="class prior")
    top = max(model_ll + prior_ll)
    for i, (a, b) in enumerate(zip(model_ll, prior_ll, strict=True)):
        ratio = a / b if b else float("nan")
        ax.text(i, max(a, b) + top * 0.02, f"{ratio:.3f}", ha="center", fontsize=9,
                color="#1a7f37" if ratio < 1 else "#b42318")
    ax.set_xticks(x, names)
    ax.set_ylim(0, top * 1.15)
    ax.set_ylabel("log loss (lower is better)")
    ax.set_title("Log loss against the class prior (number: model / prior; below 1 beats the prior)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    return _png(fig)


def chart_class_balance(m: Mapping[str, float]) -> str | None:
    candidates = (("training window", "window_class_"), ("fitting part", "train_class_"), ("test part", "test_class_"))
    parts = [(label, prefix) for label, prefix in candidates if all(_get(m, prefix + c) is not None for c in CLASSES)]
    if not parts:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(11, 0.75 * len(parts) + 1.0))
    for i, (_, prefix) in enumerate(parts):
        left = 0.0
        for c in CLASSES:
            v = float(m[prefix + c])
            ax.barh(i, v, left=left, color=CLASS_COLOURS[c], label=c if i == 0 else None)
            if v > 0.06:
                ax.text(left + v / 2, i, f"{c} {v:.0%}", ha="center", va="center", color="white", fontsize=9)
            left += v
    ax.set_yticks(range(len(parts)), [p[0] for p in parts])
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of labelled candles")
    ax.set_title("Class balance")
    fig.tight_layout()
    return _png(fig)


def chart_importance(m: Mapping[str, float]) -> str | None:
    items = importances(m)[:TOP_FEATURES]
    if not items:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(11, 0.28 * len(items) + 1.2))
    names = [k for k, _ in items][::-1]
    values = [v for _, v in items][::-1]
    ax.barh(names, values, color=["#2c7fb8" if v > 0 else "#bbbbbb" for v in values])
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("increase in test log loss when the feature is shuffled")
    ax.set_title(f"Permutation importance on the test part (top {len(items)})")
    fig.tight_layout()
    return _png(fig)


# --------------------------------------------------------------------------------------------------------------------
# the page

CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 24px auto;
       max-width: 1120px; color: #1f2328; line-height: 1.45; padding: 0 16px; }
h1 { font-size: 1.6em; margin-bottom: 0.1em; } h2 { font-size: 1.2em; margin-top: 1.6em;
     border-bottom: 1px solid #d0d7de; padding-bottom: 4px; }
.sub { color: #57606a; margin-top: 0; }
table { border-collapse: collapse; margin: 8px 0; } td, th { padding: 4px 12px 4px 0; text-align: left;
        vertical-align: top; } th { color: #57606a; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.verdict { padding: 10px 14px; border-radius: 6px; margin: 12px 0; font-weight: 600; }
.good { background: #dafbe1; color: #1a7f37; } .bad { background: #ffebe9; color: #b42318; }
img { max-width: 100%; display: block; margin: 8px 0; }
.note { color: #57606a; font-size: 0.92em; }
code { background: #f6f8fa; padding: 1px 4px; border-radius: 4px; }
"""


def _fmt(v: float | None, spec: str = ".4f") -> str:
    return "n/a" if v is None else format(v, spec)


def _rows(rows: list[tuple[str, str]]) -> str:
    return "\n".join(f"<tr><th>{html.escape(k)}</th><td>{v}</td></tr>" for k, v in rows)


def _ts(t) -> str:
    ms = t.ToMilliseconds() if t is not None and (t.seconds or t.nanos) else None
    return ms_to_iso(ms) if ms is not None else "n/a"


def ood_rows(m: Mapping[str, float]) -> list[tuple[str, str]]:
    """The out-of-distribution score on the held-back part: how many candles it flagged (the threshold flags 1 % of
    the training rows), and whether they scored worse than the rest (log-loss ratio to the prior of each group)."""
    rate, flagged = _get(m, "ood_rate_test"), _get(m, "test_ood_rows")
    if rate is None:
        return [("out-of-distribution candles", "n/a (a model trained before the score existed)")]
    train = _get(m, "ood_rate_train")
    rows = [("out-of-distribution candles",
             f"{rate:.2%} of the held-back part ({int(flagged or 0):,} candles; training rows: "
             f"{_fmt(train, '.2%') if train is not None else 'n/a'})")]
    ood, rest = _get(m, "test_ood_log_loss_ratio"), _get(m, "test_in_distribution_log_loss_ratio")
    if ood is not None and rest is not None:
        verdict = "worse than" if ood > rest else "no worse than"
        rows.append(("log-loss ratio, flagged / the rest",
                     f"{_fmt(ood)} / {_fmt(rest)}: flagged candles scored {verdict} the rest"
                     + (" (few candles: read with care)" if (flagged or 0) < 30 else "")))
    else:
        rows.append(("log-loss ratio, flagged / the rest", "n/a (no held-back candle was flagged)"))
    return rows


def render_html(info: Any) -> str:
    m = dict(info.metrics)
    e = html.escape
    ll, prior = _get(m, "log_loss"), _get(m, "prior_log_loss")
    ratio = _get(m, "log_loss_ratio")
    cv_mean, cv_std, n_folds = _get(m, "cv_log_loss_ratio_mean"), _get(m, "cv_log_loss_ratio_std"), \
        int(m.get("cv_folds", 0) or 0)
    beats = ll is not None and prior is not None and ll < prior
    verdict = (
        f"Out of sample the model's log loss is {_fmt(ll)} against {_fmt(prior)} for the class prior "
        f"(ratio {_fmt(ratio)}): it {'adds information over' if beats else 'does NOT beat'} the prior."
    )
    stage_value = int(getattr(info, "stage", 0) or 0)  # 0: a server that does not report stages
    stage = model_stage_name(stage_value).lower() if stage_value else ""
    stage_reason = getattr(info, "stage_reason", "")
    p = info.params
    params = (f"{p.n_estimators} trees, max depth {'unlimited' if p.max_depth == -1 else p.max_depth}, "
              f"min samples per leaf {p.min_samples_leaf}, seed {p.random_state}")
    gaps = int(m.get("window_gaps", 0) or 0)
    missing = int(m.get("window_missing_candles", 0) or 0)
    dropped = m.get("dropped_gap_labels")
    overview = [
        ("model", f"<code>{e(info.model_id)}</code>"),
        ("market", e(f"{info.symbol} {info.timeframe}")),
        ("registered", _ts(info.created_at)),
    ]
    if stage:
        overview.append(("stage", e(stage + (f" ({stage_reason})" if stage_reason else ""))))
    overview += [
        ("label", e(label_text(info))),
        ("training window", f"{_ts(info.train_start)} .. {_ts(info.train_end)}"),
        ("labelled candles", e(f"{int(m.get('n_rows', 0) or 0):,}") if "n_rows" in m else "n/a"),
        ("gaps in the window", e(f"{gaps} hole{'s' if gaps != 1 else ''}, {missing} missing candle"
                                 f"{'s' if missing != 1 else ''}")),
        ("labels dropped for gaps", e(f"{int(dropped):,} (their horizon spans missing candles)")
         if dropped is not None else "n/a"),
        ("features", e(f"{len(info.features)} ({info.feature_set or 'feature set'}), warm-up {info.warmup_bars} "
                       "candles")),
        ("forest", e(params)),
    ]
    split = _get(m, "test_start_ms")
    test_rows = [
        ("held-back test part", e(f"{int(m.get('n_test', 0) or 0):,} candles from {ms_to_iso(int(split))}")
         if split is not None else "n/a"),
        ("log loss (model / prior)", f"{_fmt(ll)} / {_fmt(prior)} = <b>{_fmt(ratio)}</b>"),
        ("Brier score (model / prior)", f"{_fmt(_get(m, 'brier'))} / {_fmt(_get(m, 'prior_brier'))}"),
        ("balanced accuracy", _fmt(_get(m, "balanced_accuracy"))),
        ("shrink weight on the forest", _fmt(_get(m, "shrink_weight"), ".3f")),
    ]
    test_rows.extend(ood_rows(m))
    if n_folds:
        test_rows.append((f"purged {n_folds}-fold CV, log-loss ratio",
                          f"{_fmt(cv_mean)} &plusmn; {_fmt(cv_std)} (mean &plusmn; standard deviation)"))
    fold_rows = "".join(
        f"<tr><td>fold {k + 1}</td><td>{ms_to_iso(int(f['start_ms'])) if f['start_ms'] is not None else 'n/a'} .. "
        f"{ms_to_iso(int(f['end_ms'])) if f['end_ms'] is not None else 'n/a'}</td>"
        f"<td class=num>{_fmt(f['log_loss'])}</td><td class=num>{_fmt(f['prior_log_loss'])}</td>"
        f"<td class=num>{_fmt(f['ratio'])}</td></tr>"
        for k, f in enumerate(cv_folds(m))
    )
    charts = {
        "reliability": chart_reliability(m),
        "log_loss": chart_log_loss(m),
        "balance": chart_class_balance(m),
        "importance": chart_importance(m),
    }

    def img(key: str, alt: str) -> str:
        src = charts[key]
        return f'<img src="{src}" alt="{e(alt)}">' if src else f"<p class=note>No {e(alt)} recorded.</p>"

    title = f"mlsignal model {info.model_id}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>
<body>
<h1>{e(info.symbol)} {e(info.timeframe)} &mdash; model <code>{e(info.model_id)}</code></h1>
<p class=sub>Evaluation report: ML_UP_PROB, ML_DOWN_PROB and ML_RANGE_PROB of this model, out of sample.</p>
<div class="verdict {'good' if beats else 'bad'}">{e(verdict)}</div>
<h2>Model</h2>
<table>{_rows(overview)}</table>
<h2>Out-of-sample quality</h2>
<table>{_rows(test_rows)}</table>
{img("log_loss", "log loss per fold")}
<table><tr><th>part</th><th>test candles</th><th>model</th><th>prior</th><th>ratio</th></tr>{fold_rows}
<tr><td>test part</td><td>{ms_to_iso(int(split)) if split is not None else 'n/a'} .. {_ts(info.train_end)}</td>
<td class=num>{_fmt(ll)}</td><td class=num>{_fmt(prior)}</td><td class=num>{_fmt(ratio)}</td></tr></table>
<p class=note>Cross-validation folds are contiguous blocks of the training window; each fold's forest is fitted on
the rest of the window minus a purge of {info.label.horizon_bars} candles on both sides of the block and an embargo
after it, and calibrated on a purged slice that does not touch the block. The test part is the end of the window,
held back from the evaluation forest and its calibration.</p>
<h2>Reliability per class</h2>
{img("reliability", "reliability diagram")}
<p class=note>Each point is one bin of predicted probability (width 0.1): its mean prediction against how often the
class happened. Points on the diagonal are calibrated; the dotted line is the class's frequency in the test part.</p>
<h2>Class balance</h2>
{img("balance", "class balance")}
<h2>Permutation importance</h2>
{img("importance", "permutation importance")}
<p class=note>Generated by <code>mlsignal report {e(info.model_id)}</code> from the model's metrics in the registry.
</p>
</body></html>
"""
