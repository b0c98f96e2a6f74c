"""The offline commands of `fraudscore`: simulate, train, replay, evaluate, backtest.

Their imports (pyarrow, LightGBM, matplotlib, tqdm) stay inside the commands, so `serve`
never loads a training library. Progress goes to stderr: a bar on a terminal, a line every
few seconds in a log (core/offline/progress.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.cli.options import (
    duration,
    id_hasher,
    key_file_arg,
    label_delay_arg,
    max_dropped_arg,
    moment,
    number_in,
    rate,
    world_args,
)

if TYPE_CHECKING:
    from core.history.table import History
    from core.model import LoadedModel


def _simulate(args: argparse.Namespace) -> int:
    from core.history.simulate import simulate
    from core.history.table import write_history

    history = simulate(num_days=args.days, num_cards=args.cards, num_merchants=args.merchants, seed=args.seed,
                       progress=True)
    write_history(history, args.out)
    print(f"wrote {len(history)} transactions ({int(history.is_fraud.sum())} fraud) to {args.out}")
    return 0


def _label_delay(args: argparse.Namespace, model: LoadedModel | None) -> int | None:
    """--label-delay, else the delay `model` was trained with: features computed as in its training."""
    if args.label_delay is not None or model is None:
        return int(args.label_delay) if args.label_delay is not None else None
    delay = (model.manifest.get("training") or {}).get("label_delay_ms")
    if delay is not None:
        print(f"label delay: {delay / 3_600_000:g} h, as model {model.version} was trained (--label-delay to change)")
    return int(delay) if delay is not None else None


def _warn_if_trained_on(history: History, model: LoadedModel) -> None:
    """Say so when the rows evaluated overlap the model's training rows: metrics on them flatter it."""
    import numpy as np

    from core.history.times import parse_time_ms

    training = model.manifest.get("training") or {}
    start, end = (parse_time_ms(str(training.get(key, ""))) for key in ("train_from", "train_until"))
    if start is None or end is None:
        return
    inside = int(np.count_nonzero((history.event_time_ms >= start) & (history.event_time_ms < end)))
    if inside:
        print(f"warning: {inside} of {len(history)} rows fall inside model {model.version}'s training window "
              f"({training['train_from']} to {training['train_until']}): the model learnt from them, so the metrics "
              "flatter it; evaluate on later data", file=sys.stderr)


def _sha256(path: Path) -> str:
    import hashlib

    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _train(args: argparse.Namespace) -> int:
    from core.history.read import read_history_dropping
    from core.history.simulate import simulate
    from core.offline.train import train

    hasher, key_note = id_hasher(args, "train")
    if args.if_stale:
        from core.errors import ModelLoadError
        from core.model import load_model_dir

        try:
            model = load_model_dir(args.out)
            id_key = model.manifest.get("id_key")
            if isinstance(id_key, dict) and id_key.get("fingerprint") == hasher.fingerprint:
                print(f"model {model.version} in {args.out} is current; not retraining")
                return 0
            print(f"(re)training: model {model.version}'s features were hashed with another identifier key than "
                  "the one set here (or it does not say which)")
        except ModelLoadError as exc:
            print(f"(re)training: {exc.reason}")
    print(key_note, file=sys.stderr)
    data_read = None
    if args.data is not None:
        history, read = read_history_dropping(args.data, max_dropped_fraction=args.max_dropped)
        print(read.summary())
        data_read = read.as_dict() | {"sha256": _sha256(args.data)}
        source = args.data.name
    else:
        source = f"simulated: {args.days} days, {args.cards} cards, {args.merchants} merchants, seed {args.seed}"
        print(f"no --data: {source}")
        history = simulate(num_days=args.days, num_cards=args.cards, num_merchants=args.merchants, seed=args.seed,
                           progress=True)
    result = train(history, args.out, seed=args.seed, label_delay_ms=args.label_delay,
                   valid_from_ms=args.valid_from, train_until_ms=args.train_until, review_rate=args.review_rate,
                   decline_fpr=args.decline_fpr, fraud_weight=args.fraud_weight, data_source=source,
                   data_read=data_read, hasher=hasher)
    print(f"model {result.model_version} written to {result.out_dir}")
    for name, value in result.metrics.items():
        print(f"  {name:30s} {value:.4f}")
    print(f"  thresholds: review ≥ {result.thresholds['review']:.6g}, decline ≥ {result.thresholds['decline']:.6g}")
    print(f"report: {result.out_dir / 'report.md'}")
    return 0


def _replay(args: argparse.Namespace) -> int:
    from core.history.read import read_history
    from core.history.table import write_table
    from core.model import load_model_dir
    from core.offline.progress import progress
    from core.offline.replay import score_history
    from service.runtime.reload import load_rules

    hasher, key_note = id_hasher(args, "replay")
    history = read_history(args.data)
    model = load_model_dir(args.model)
    label_delay_ms = _label_delay(args, model)
    print(key_note, file=sys.stderr)
    with progress(len(history), "replay", "txn") as bar:
        table = score_history(history, model, load_rules(args.rules, hasher=hasher), label_delay_ms=label_delay_ms,
                              reasons_method=args.reasons_method, hasher=hasher, on_progress=bar.update)
    write_table(table, args.out)
    decisions = {d: int((table["decision"] == d).sum()) for d in ("APPROVE", "REVIEW", "DECLINE")}
    print(f"scored {len(history)} transactions with model {model.version} into {args.out}: {decisions}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    """Score a labelled history with a model directory and write the report training writes."""
    from core.errors import DataError
    from core.history.read import read_history_dropping
    from core.model import MODEL_FILE, load_model_dir
    from core.offline.progress import progress
    from core.offline.replay import replay_features
    from core.offline.report import REPORT_FILE, model_file_importance, write_report

    hasher, key_note = id_hasher(args, "evaluate")
    model = load_model_dir(args.model)  # a bad directory fails before the (slower) history is read
    history, read = read_history_dropping(args.data, max_dropped_fraction=args.max_dropped)
    print(read.summary())
    if not history.is_fraud.any():
        raise DataError(str(args.data), "no transaction is labelled fraud (is_fraud = 1), so the metrics mean "
                        "nothing; evaluate on a labelled history", column="is_fraud")
    stem = Path(args.data.name.removesuffix(".gz")).stem
    out = args.out if args.out is not None else args.model / f"evaluation-{stem}"
    label_delay_ms = _label_delay(args, model)
    _warn_if_trained_on(history, model)
    print(key_note, file=sys.stderr)
    # The features as `replay` computes them, the probabilities as the server's forest does.
    with progress(len(history), "evaluate", "txn") as bar:
        features = replay_features(history, hasher=hasher, label_delay_ms=label_delay_ms, on_progress=bar.update)
    probability = model.forest.predict(features)
    metrics = write_report(out, history.is_fraud, probability, history.event_time_ms, thresholds=model.thresholds,
                           model_version=model.version, data=str(args.data),
                           feature_importance=model_file_importance(args.model / MODEL_FILE),
                           data_read=read.as_dict() | {"sha256": _sha256(args.data)})
    print(f"evaluated model {model.version} on {len(history)} transactions ({metrics['fraud']} fraud) "
          f"from {args.data}")
    for name in ("roc_auc", "average_precision", "recall_at_fpr_0.1%", "recall_at_fpr_1%"):
        print(f"  {name:22s} {metrics[name]:.4f}")
    print(f"report: {out / REPORT_FILE}")
    return 0


def _backtest(args: argparse.Namespace) -> int:
    """Backtest a rules file on a labelled history; print one row per rule and the totals."""
    from core.history.read import read_history
    from core.history.table import write_table
    from core.model import load_model_dir
    from core.offline.backtest import backtest, report_columns
    from core.offline.progress import progress
    from core.rules.file import load_ruleset

    hasher, key_note = id_hasher(args, "backtest")
    ruleset = load_ruleset(args.rules, hasher=hasher)  # a bad file fails before the (slower) history is read
    model = load_model_dir(args.model) if args.model is not None else None
    history = read_history(args.data)
    label_delay_ms = _label_delay(args, model)
    print(key_note, file=sys.stderr)
    with progress(len(history), "backtest", "txn") as bar:
        report = backtest(history, ruleset, model, label_delay_ms=label_delay_ms, source=str(args.data),
                          hasher=hasher, on_progress=bar.update)
    t = report.totals
    against = f"model {t.model_version}" if model is not None else "no model: the fallback rules"
    print(f"backtest of {args.rules} (version {t.ruleset_version}) on {args.data}, {against}")

    def pct(x: float) -> str:
        return "-" if x != x else f"{100 * x:.2f} %"  # NaN: nothing to divide by

    header = ["rule", "mode", "action", "hits", "hit rate", "precision", "recall"]
    header += ["fraud missed by model"] if model is not None else []
    rows = [[*header, "decisions changed (rule on vs off)"]]
    for r in report.rules:
        changes = ", ".join(f"{c.before.name}→{c.after.name} {c.count}" for c in r.changes) or "none"
        row = [r.name, "shadow" if r.shadow else "enforce", r.action.name, str(r.hits), pct(r.hit_rate),
               pct(r.precision), pct(r.recall)]
        row += [str(r.fraud_missed_by_model)] if model is not None else []
        rows.append([*row, changes])
    widths = [max(len(row[j]) for row in rows) for j in range(len(header))]
    for row in rows:  # names left-aligned, numbers right-aligned, the change summary last and free
        cells = [cell.ljust(w) if j < 3 else cell.rjust(w)
                 for j, (cell, w) in enumerate(zip(row[:-1], widths, strict=True))]
        print("  ".join([*cells, row[-1]]))
    print(f"transactions {t.transactions}, fraud {t.fraud} ({pct(t.fraud / t.transactions)}), "
          f"fraud flagged REVIEW or DECLINE {t.fraud_flagged} ({pct(t.fraud_flagged / t.fraud)})")
    print("decisions: " + ", ".join(f"{s.name} {d.name} {count}" for s, d, count in t.decisions))
    if args.out is not None:
        write_table(report_columns(report), args.out)
        print(f"wrote the per-rule table to {args.out}")
    return 0


def add_commands(sub: Any) -> None:
    """Add simulate, train, replay, evaluate and backtest to `fraudscore`'s subcommands."""
    m = sub.add_parser("simulate", help="write a simulated labelled history (CSV or Parquet)")
    m.add_argument("--out", type=Path, required=True, help="output file, .csv or .parquet")
    world_args(m)
    m.set_defaults(run=_simulate)

    t = sub.add_parser("train", help="train a model directory from a history (or a simulated one)")
    t.add_argument("--data", type=Path, help="labelled history, .csv or .parquet (default: simulate one)")
    t.add_argument("--out", type=Path, required=True, help="model directory to write")
    t.add_argument("--label-delay", type=duration, metavar="DURATION",
                   help="fraud labels feed the features this long after the transaction at the earliest, "
                        "e.g. 48h or 2d (default: at their fraud_reported_time, never without one)")
    t.add_argument("--valid-from", type=moment, metavar="TIME",
                   help="the validation period starts here (ISO 8601 or epoch ms; default: the last 20%% of the "
                        "history's time span)")
    t.add_argument("--train-until", type=moment, metavar="TIME",
                   help="training rows end before this (default: --valid-from); earlier leaves a gap whose rows "
                        "only feed the features")
    t.add_argument("--review-rate", type=rate, default=0.005,
                   help="share of validation transactions the REVIEW threshold sends to review (default 0.005)")
    t.add_argument("--decline-fpr", type=rate, default=0.001,
                   help="share of legitimate validation transactions the DECLINE threshold may decline "
                        "(default 0.001)")
    t.add_argument("--fraud-weight", type=number_in(1e-6, 1e6, high_included=True, example="5"), default=1.0,
                   help="weight of a fraud row against a legitimate one (default 1: calibrated probabilities; "
                        "see docs/training.md)")
    max_dropped_arg(t)
    t.add_argument("--if-stale", action="store_true",
                   help="only train when --out holds no model this build can serve (used by make serve)")
    world_args(t)
    key_file_arg(t)
    t.set_defaults(run=_train)
    r = sub.add_parser("replay", help="score a history offline exactly as the service would, one row each")
    r.add_argument("--data", type=Path, required=True, help="history, .csv or .parquet")
    r.add_argument("--model", type=Path, required=True, help="model directory")
    r.add_argument("--out", type=Path, required=True, help="output file, .csv or .parquet")
    r.add_argument("--rules", type=Path, help="rules file (default: packaged rules)")
    label_delay_arg(r)
    r.add_argument("--reasons-method", choices=("path", "shap"), default="path",
                   help="how model reasons are attributed; use the server's FRAUDSCORE_REASONS_METHOD (default: path)")
    key_file_arg(r)
    r.set_defaults(run=_replay)

    e = sub.add_parser("evaluate", help="score a labelled history with a model and write the report training "
                                        "writes (metrics, operating points, top-k per day, plots)")
    e.add_argument("--model", type=Path, required=True, help="model directory")
    e.add_argument("--data", type=Path, required=True, help="labelled history (is_fraud), .csv or .parquet")
    e.add_argument("--out", type=Path,
                   help="report directory (default: <model>/evaluation-<data file name without extension>)")
    label_delay_arg(e, default="the model's training label delay")
    max_dropped_arg(e)
    key_file_arg(e)
    e.set_defaults(run=_evaluate)

    bt = sub.add_parser("backtest", help="replay a labelled history and report, per rule: hits, hit rate, "
                                         "precision, recall and the decisions it would change")
    bt.add_argument("--rules", type=Path, required=True, help="rules file (JSON) to test")
    bt.add_argument("--data", type=Path, required=True, help="labelled history (is_fraud), .csv or .parquet")
    bt.add_argument("--model", type=Path,
                    help="model directory: test the model-path rules on its decisions "
                         "(default: no model, test the fallback rules as the service without one)")
    label_delay_arg(bt)
    bt.add_argument("--out", type=Path, help="also write the per-rule table, .csv or .parquet")
    key_file_arg(bt)
    bt.set_defaults(run=_backtest)
