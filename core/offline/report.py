"""The model report: what `train` writes for its validation period and `evaluate` for any labelled history.

    <out>/
      report.md            for an analyst: each metric, what it means, its value
      metrics.json         the same numbers, for machines (and for comparing two models)
      pr_curve.png         precision against recall, the manifest's operating points marked
      score_histogram.png  fraud probability by class, log-scaled counts

Offline only: matplotlib (and lightgbm, for feature importance) are imported inside the
functions that need them, so nothing on the serving path loads them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from core.history.times import iso_ms
from core.model import Thresholds
from core.offline.evaluation import average_precision, precision_recall_curve, recall_at_fpr, roc_auc

REPORT_FILE = "report.md"
METRICS_FILE = "metrics.json"
PR_CURVE_FILE = "pr_curve.png"
HISTOGRAM_FILE = "score_histogram.png"
TOP_K = (10, 50, 100)
_DAY_MS = 86_400_000


def top_k_precision_by_day(y: np.ndarray, score: np.ndarray, event_time_ms: np.ndarray, k: int) -> dict[str, float]:
    """Per UTC day: the share of fraud among that day's `k` highest scores (all of them on a smaller day).

    What an analyst team that can work `k` alerts a day would find. Equal scores keep
    time order (the earlier transaction is alerted first).
    """
    days = np.asarray(event_time_ms, dtype=np.int64) // _DAY_MS
    out: dict[str, float] = {}
    for day in np.unique(days):
        rows = np.flatnonzero(days == day)
        top = rows[np.argsort(-score[rows], kind="stable")[:k]]
        out[_date(int(day))] = float(np.mean(y[top]))
    return out


def operating_point(y: np.ndarray, score: np.ndarray, threshold: float) -> dict[str, float]:
    """What flagging `score >= threshold` does: how many, their precision, the fraud caught, the legit hit."""
    flagged = score >= threshold
    fraud = y.astype(bool)
    n_flagged = int(flagged.sum())
    n_fraud, n_legit = int(fraud.sum()), int((~fraud).sum())
    caught = int((flagged & fraud).sum())
    return {
        "threshold": float(threshold),
        "flagged": n_flagged,
        "flag_rate": n_flagged / y.size if y.size else float("nan"),
        "precision": caught / n_flagged if n_flagged else float("nan"),
        "recall": caught / n_fraud if n_fraud else float("nan"),
        "false_positive_rate": (n_flagged - caught) / n_legit if n_legit else float("nan"),
    }


def gain_importance(booster: Any, *, iteration: int | None = None, top: int = 20) -> dict[str, float]:
    """The `top` features of a LightGBM booster (its first `iteration` trees) by total split gain,
    as shares of all the gain."""
    gain = np.asarray(booster.feature_importance(importance_type="gain", iteration=iteration), dtype=np.float64)
    names = list(booster.feature_name())
    total = float(gain.sum())
    order = np.argsort(-gain, kind="stable")[:top]
    return {names[j]: (float(gain[j]) / total if total > 0 else 0.0) for j in order}


def model_file_importance(model_file: Path, *, top: int = 20) -> dict[str, float] | None:
    """`gain_importance` of a saved LightGBM text model; None when lightgbm is not installed."""
    try:
        import lightgbm as lgb
    except ImportError:
        return None
    return gain_importance(lgb.Booster(model_file=str(model_file)), top=top)


def report_metrics(
    y: np.ndarray,
    score: np.ndarray,
    event_time_ms: np.ndarray,
    *,
    thresholds: Thresholds,
    top_k: Sequence[int] = TOP_K,
) -> dict[str, Any]:
    """Every number of the report (NaN where a class is missing), as `metrics.json` holds them."""
    y = np.asarray(y, dtype=np.float64)
    score = np.asarray(score, dtype=np.float64)
    return {
        "transactions": int(y.size),
        "fraud": int(y.sum()),
        "fraud_rate": float(y.mean()) if y.size else float("nan"),
        "period": {"from": iso_ms(int(event_time_ms.min())), "until": iso_ms(int(event_time_ms.max()))} if y.size else None,
        "roc_auc": roc_auc(y, score),
        "average_precision": average_precision(y, score),
        "recall_at_fpr_0.1%": recall_at_fpr(y, score, 0.001),
        "recall_at_fpr_1%": recall_at_fpr(y, score, 0.01),
        "operating_points": {
            "review": operating_point(y, score, thresholds.review),
            "decline": operating_point(y, score, thresholds.decline),
        },
        "top_k_precision_per_day": {
            str(k): top_k_precision_by_day(y, score, event_time_ms, k) for k in top_k
        },
    }


def write_report(
    out_dir: Path,
    y: np.ndarray,
    score: np.ndarray,
    event_time_ms: np.ndarray,
    *,
    thresholds: Thresholds,
    model_version: str,
    data: str,
    feature_importance: Mapping[str, float] | None = None,
    data_read: Mapping[str, Any] | None = None,
    top_k: Sequence[int] = TOP_K,
) -> dict[str, Any]:
    """Write report.md, metrics.json and the two plots into `out_dir`; return the metrics.

    `data` says in words what was scored (it heads the report), e.g. "the validation period";
    `data_read` is what reading the file kept and dropped (`ReadReport.as_dict()`).
    """
    metrics = report_metrics(y, score, event_time_ms, thresholds=thresholds, top_k=top_k)
    metrics = {"model_version": model_version, "data": data, **metrics,
               "feature_importance_gain": dict(feature_importance) if feature_importance is not None else None,
               "data_read": dict(data_read) if data_read is not None else None}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / METRICS_FILE).write_bytes(orjson.dumps(metrics, option=orjson.OPT_INDENT_2))
    y64, s64 = np.asarray(y, dtype=np.float64), np.asarray(score, dtype=np.float64)
    _plot_pr_curve(out_dir / PR_CURVE_FILE, y64, s64, metrics)
    _plot_histogram(out_dir / HISTOGRAM_FILE, y64, s64, thresholds)
    (out_dir / REPORT_FILE).write_text(_markdown(metrics, event_time_ms, y64, top_k))
    return metrics


# --- rendering ------------------------------------------------------------------------------------

def _date(day: int) -> str:
    return datetime.fromtimestamp(day * 86_400, tz=UTC).date().isoformat()


def _num(x: float, digits: int = 4) -> str:
    return "n/a" if x != x else f"{x:.{digits}f}"  # NaN: one class is missing


def _pct(x: float) -> str:
    return "n/a" if x != x else f"{100 * x:.2f} %"


def _markdown(m: dict[str, Any], event_time_ms: np.ndarray, y: np.ndarray, top_k: Sequence[int]) -> str:
    period = m["period"] or {"from": "-", "until": "-"}
    lines = [
        f"# Model report: {m['model_version']}",
        "",
        f"Scored: {m['data']}, {period['from']} to {period['until']}: {m['transactions']:,} transactions, "
        f"{m['fraud']:,} fraud ({_pct(m['fraud_rate'])}).",
        "",
        "## Ranking",
        "",
        "| metric | value | what it means |",
        "|---|---|---|",
        f"| ROC AUC | {_num(m['roc_auc'])} | chance that a random fraud scores above a random legitimate transaction |",
        f"| average precision | {_num(m['average_precision'])} | precision averaged over every recall level "
        f"(a random model scores the fraud rate, {_pct(m['fraud_rate'])}) |",
        f"| recall at 0.1 % FPR | {_num(m['recall_at_fpr_0.1%'])} | share of fraud caught when 1 in 1,000 "
        "legitimate transactions is flagged |",
        f"| recall at 1 % FPR | {_num(m['recall_at_fpr_1%'])} | the same at 1 in 100 |",
        "",
        "## Operating points (the manifest's thresholds)",
        "",
        "The model alone: rules can still change a decision (`fraudscore backtest` measures them).",
        "",
        "| decision | fraud probability ≥ | flagged | flag rate | precision | recall | legitimate flagged (FPR) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, label in (("review", "REVIEW or DECLINE"), ("decline", "DECLINE")):
        op = m["operating_points"][name]
        lines.append(f"| {label} | {op['threshold']:.6g} | {op['flagged']:,} | {_pct(op['flag_rate'])} | "
                     f"{_pct(op['precision'])} | {_pct(op['recall'])} | {_pct(op['false_positive_rate'])} |")
    per_day = m["top_k_precision_per_day"]
    days = list(per_day[str(top_k[0])]) if top_k else []
    day_of = np.asarray(event_time_ms, dtype=np.int64) // _DAY_MS
    lines += [
        "",
        "## Precision of the top-k alerts per day",
        "",
        "If analysts work the k highest-scored transactions of each day (UTC), the share of them that is "
        "fraud. A day with fewer than k transactions counts all of them.",
        "",
        "| day | transactions | fraud | " + " | ".join(f"top {k}" for k in top_k) + " |",
        "|---|---|---|" + "---|" * len(top_k),
    ]
    unique_days, counts = np.unique(day_of, return_counts=True)  # sorted, as top_k_precision_by_day's keys
    fraud_counts = np.bincount(np.searchsorted(unique_days, day_of), weights=y, minlength=unique_days.size)
    for day, count, fraud in zip(days, counts, fraud_counts, strict=True):
        lines.append(f"| {day} | {int(count):,} | {int(fraud):,} | "
                     + " | ".join(_pct(per_day[str(k)][day]) for k in top_k) + " |")
    if days:
        lines.append("| **mean** | | | "
                     + " | ".join(_pct(float(np.mean(list(per_day[str(k)].values())))) for k in top_k) + " |")
    lines += [
        "",
        "## Plots",
        "",
        f"![precision against recall]({PR_CURVE_FILE})",
        "",
        f"![fraud probability by class]({HISTOGRAM_FILE})",
        "",
    ]
    importance = m["feature_importance_gain"]
    if importance:
        lines += [
            "## Feature importance",
            "",
            "Share of the model's total split gain: how much each feature reduced the training loss. "
            "High gain means the model leans on it, not that it causes fraud.",
            "",
            "| rank | feature | share of gain |",
            "|---|---|---|",
            *(f"| {i} | `{name}` | {_pct(share)} |" for i, (name, share) in enumerate(importance.items(), 1)),
            "",
        ]
    read = m["data_read"]
    if read:
        lines += [
            "## Data read",
            "",
            f"`{read['source']}`: {read['rows_read']:,} rows read, {read['rows_kept']:,} kept, "
            f"{read['rows_dropped']:,} dropped (a row with several problems counts under each).",
            "",
        ]
        if read["dropped"]:
            lines += ["| column | problem | rows | first rows (from 1, file order) |", "|---|---|---|---|"]
            lines += [f"| `{d['column']}` | {d['reason']} | {d['rows']:,} | {', '.join(map(str, d['first_rows']))} |"
                      for d in read["dropped"]]
            lines.append("")
    return "\n".join(lines)


def _plot_pr_curve(path: Path, y: np.ndarray, score: np.ndarray, m: dict[str, Any]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    precision, recall, _ = precision_recall_curve(y, score)
    fig = Figure(figsize=(6, 4.5), dpi=100)
    FigureCanvasAgg(fig)  # Agg explicitly: no display, no global pyplot state
    ax = fig.add_subplot()
    ax.plot(np.r_[0.0, recall], np.r_[precision[:1] if precision.size else [1.0], precision],
            drawstyle="steps-post", label=f"model (average precision {_num(m['average_precision'], 3)})")
    for name, marker in (("review", "o"), ("decline", "s")):
        op = m["operating_points"][name]
        if op["recall"] == op["recall"] and op["precision"] == op["precision"]:
            ax.plot([op["recall"]], [op["precision"]], marker, label=f"{name} threshold {op['threshold']:.4g}")
    ax.axhline(m["fraud_rate"], color="grey", linestyle=":", label="random model (the fraud rate)")
    ax.set(xlabel="recall (share of fraud flagged)", ylabel="precision (share of flags that are fraud)",
           xlim=(0, 1.01), ylim=(0, 1.01), title="Precision against recall")
    ax.legend(loc="lower left", fontsize="small")
    fig.savefig(path)


def _plot_histogram(path: Path, y: np.ndarray, score: np.ndarray, thresholds: Thresholds) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    bins = np.linspace(0.0, 1.0, 51).tolist()
    fraud = y.astype(bool)
    # Log counts: legitimate transactions outnumber fraud ~100:1 and would flatten it.
    ax.hist(score[~fraud], bins=bins, log=True, histtype="step", linewidth=1.5, label=f"legitimate ({int((~fraud).sum()):,})")
    ax.hist(score[fraud], bins=bins, log=True, histtype="step", linewidth=1.5, label=f"fraud ({int(fraud.sum()):,})")
    ax.axvline(thresholds.review, color="orange", linestyle="--", label=f"review ≥ {thresholds.review:.4g}")
    ax.axvline(thresholds.decline, color="red", linestyle="--", label=f"decline ≥ {thresholds.decline:.4g}")
    ax.set(xlabel="fraud probability", ylabel="transactions (log scale)", title="Fraud probability by class")
    ax.legend(loc="upper center", fontsize="small")
    fig.savefig(path)
