"""The fraudscore command line, run as a user would (real subprocesses)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from core.history.read import read_history
from core.model import load_model_dir
from core.offline.replay import score_history
from service.runtime.app import load_rules
from tests.conftest import REPO, free_port


def fraudscore(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FRAUDSCORE_")} | (env or {})
    return subprocess.run([sys.executable, "-m", "service.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=full_env)


def test_simulate_then_replay_writes_one_scored_row_per_transaction(tmp_path: Path, model_dir: Path) -> None:
    data, out = tmp_path / "history.csv", tmp_path / "scored.parquet"
    sim = fraudscore("simulate", "--out", str(data), "--days", "2", "--cards", "100", "--merchants", "70")
    assert sim.returncode == 0, sim.stderr
    history = read_history(data)
    assert f"wrote {len(history)} transactions" in sim.stdout
    rep = fraudscore("replay", "--data", str(data), "--model", str(model_dir), "--out", str(out))
    assert rep.returncode == 0, rep.stderr
    import pyarrow.parquet as pq

    table = pq.read_table(out).to_pydict()
    assert table["transaction_id"] == history.transaction_id.tolist()
    expected = score_history(history, load_model_dir(model_dir), load_rules(None))
    np.testing.assert_array_equal(np.array(table["fraud_probability"]), expected["fraud_probability"])
    assert set(table["decision"]) <= {"APPROVE", "REVIEW", "DECLINE"}
    assert "card_txn_count_1h" in table


def test_offline_commands_hash_identifiers_with_the_servers_key(tmp_path: Path, model_dir: Path) -> None:
    from core.encode import KeyHasher
    from core.history.simulate import simulate
    from core.history.table import write_history

    key = "the-servers-key-0123456789abcdef"
    data, by_env, by_file, key_file = (tmp_path / name for name in ("h.csv", "env.parquet", "file.parquet", "key"))
    write_history(simulate(num_days=3, num_cards=250, num_merchants=80, seed=5), data)
    key_file.write_text(key + "\n")
    rep = fraudscore("replay", "--data", str(data), "--model", str(model_dir), "--out", str(by_env),
                     env={"FRAUDSCORE_ID_HASH_KEY": key})
    assert rep.returncode == 0, rep.stderr
    assert "identifiers hashed with the key from FRAUDSCORE_ID_HASH_KEY" in rep.stderr
    assert key not in rep.stderr + rep.stdout and KeyHasher(key.encode()).fingerprint not in rep.stderr + rep.stdout
    rep = fraudscore("replay", "--data", str(data), "--model", str(model_dir), "--out", str(by_file),
                     "--id-hash-key-file", str(key_file))
    assert rep.returncode == 0, rep.stderr
    import pyarrow.parquet as pq

    history = read_history(data)
    hasher = KeyHasher(key.encode())
    expected = score_history(history, load_model_dir(model_dir), load_rules(None, hasher=hasher), hasher=hasher)
    column = "card_distinct_merchants_24h"  # a feature that depends on the hashes' values
    for table in (pq.read_table(by_env).to_pydict(), pq.read_table(by_file).to_pydict()):
        np.testing.assert_array_equal(np.array(table[column]), expected[column])
    published = score_history(history, load_model_dir(model_dir), load_rules(None))
    assert not np.array_equal(published[column], expected[column])
    # Progress into a pipe (a log): plain lines, never a redrawn bar.
    assert "\r" not in rep.stderr and f"replay: {len(history):,}/{len(history):,} txn (100 %)" in rep.stderr
    # The development key is named as such, for every offline command.
    plain = fraudscore("replay", "--data", str(data), "--model", str(model_dir), "--out", str(by_env))
    assert "published development key" in plain.stderr


def test_train_if_stale_retrains_a_model_made_under_another_key(tmp_path: Path) -> None:
    out = tmp_path / "m"
    world = ("--days", "3", "--cards", "150", "--merchants", "68")
    first = fraudscore("train", "--out", str(out), "--if-stale", *world)
    assert first.returncode == 0, first.stderr
    again = fraudscore("train", "--out", str(out), "--if-stale", *world)
    assert "is current; not retraining" in again.stdout
    other = fraudscore("train", "--out", str(out), "--if-stale", *world,
                       env={"FRAUDSCORE_ID_HASH_KEY": "another-key-0123456789abcdef"})
    assert other.returncode == 0, other.stderr
    assert "hashed with another identifier key" in other.stdout and "written to" in other.stdout


def test_train_if_stale_keeps_a_current_model(model_dir: Path) -> None:
    before = (model_dir / "model.txt").stat().st_mtime_ns
    out = fraudscore("train", "--out", str(model_dir), "--if-stale")
    assert out.returncode == 0, out.stderr
    assert "is current; not retraining" in out.stdout
    assert (model_dir / "model.txt").stat().st_mtime_ns == before


def test_health_fails_without_a_server() -> None:
    out = fraudscore("health", "--port", str(free_port()), "--timeout", "0.5")
    assert out.returncode == 1
    assert "UNAVAILABLE" in out.stderr or "DEADLINE_EXCEEDED" in out.stderr


def test_serve_refuses_a_bad_setting_naming_it() -> None:
    out = fraudscore("serve", env={"FRAUDSCORE_MAX_BATCH": "0"})
    assert out.returncode == 2
    assert "FRAUDSCORE_MAX_BATCH" in out.stderr


def test_a_bad_rules_file_stops_serve_with_the_rule_named(tmp_path: Path) -> None:
    rules = tmp_path / "rules.json"
    rules.write_bytes(b'{"rules": [{"name": "r1", "when": [{"field": "nope", "op": ">", "value": 1}], '
                      b'"action": "DECLINE"}]}')
    out = fraudscore("serve", "--rules", str(rules), "--port", str(free_port()), "--metrics-port", "0")
    assert out.returncode == 2
    assert "rule 'r1'" in out.stderr and "unknown field 'nope'" in out.stderr


def test_bench_features_prints_its_table(model_dir: Path) -> None:
    out = fraudscore("bench", "features", "--model", str(model_dir))
    assert out.returncode == 0, out.stderr
    for needle in ("online, batch    1:", "online, batch  256:", "kernels alone", "state bytes per entity: card"):
        assert needle in out.stdout


def test_bench_store_compares_the_engine_on_its_own_redis_with_in_process_state(model_dir: Path) -> None:
    out = fraudscore("bench", "store", "--model", str(model_dir))
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith("  batch ")]
    assert [line.split(":")[0] for line in lines] == ["  batch 1", "  batch 1 on a 3-master Cluster", "  batch 64",
                                                      "  batch 64 on a 3-master Cluster"]
    for line in lines:
        added = float(re.search(r"added (-?[\d.]+) ms", line).group(1))  # type: ignore[union-attr]
        assert 0 < added < 100, line  # two loopback round trips: more than nothing, far under the budget
    (workers,) = [line for line in out.stdout.splitlines() if "1 worker" in line]
    assert re.search(r"1 worker [\d,]+ txn/s, 2 workers [\d,]+ txn/s \(ratio [\d.]+\); degraded 0 and 0", workers), workers


def test_rules_check_summarises_a_valid_file() -> None:
    out = fraudscore("rules", "check", "service/defaults/rules.json")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "service/defaults/rules.json: valid, version default-2026.11.25",
        "  rules:          4 (enforce REVIEW 2, enforce DECLINE 1, shadow REVIEW 1)",
        "  fallback rules: 5 (enforce REVIEW 3, enforce DECLINE 2); default probability 0.02",
    ]


def test_rules_check_refuses_a_bad_file_with_exit_2_naming_the_rule(tmp_path: Path) -> None:
    bad = tmp_path / "rules.json"
    bad.write_text('{"version": "x", "rules": [{"name": "velocity", "when": '
                   '[{"field": "card_count", "op": ">", "value": 3}], "action": "DECLINE"}]}')
    out = fraudscore("rules", "check", str(bad))
    assert out.returncode == 2
    assert out.stdout == ""
    assert out.stderr.startswith(f"fraudscore rules check: cannot load rules {bad}: ")
    assert "rule 'velocity', condition 0: unknown field 'card_count'" in out.stderr
    missing = fraudscore("rules", "check", str(tmp_path / "absent.json"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr


def test_backtest_prints_a_row_per_rule_and_writes_the_table(tmp_path: Path) -> None:
    from core.history.simulate import simulate
    from core.history.table import write_history
    from core.offline.backtest import backtest
    from core.rules.file import load_ruleset

    data, rules, table = tmp_path / "history.csv", tmp_path / "rules.json", tmp_path / "backtest.csv"
    write_history(simulate(num_days=3, num_cards=300, num_merchants=70, seed=5), data)
    fallback = [{"name": "big_amount", "when": "amount > 300", "action": "DECLINE"},
                {"name": "busy_card", "when": "card_txn_count_1h >= 3", "action": "REVIEW", "mode": "shadow"}]
    rules.write_text(f'{{"version": "bt-1", "fallback": {{"rules": {json.dumps(fallback)}}}}}')
    out = fraudscore("backtest", "--rules", str(rules), "--data", str(data), "--out", str(table))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"backtest of {rules} (version bt-1) on {data}, no model: the fallback rules"
    assert lines[1].split() == ["rule", "mode", "action", "hits", "hit", "rate", "precision", "recall",
                                "decisions", "changed", "(rule", "on", "vs", "off)"]
    big = next(r for r in backtest(read_history(data), load_ruleset(rules)).rules if r.name == "big_amount")
    row = next(line for line in lines if line.startswith("big_amount"))
    assert row.split()[:5] == ["big_amount", "enforce", "DECLINE", str(big.hits), f"{100 * big.hit_rate:.2f}"]
    assert row.endswith(f"APPROVE→DECLINE {big.hits}")  # nothing else decides in this fallback
    assert lines[-1] == f"wrote the per-rule table to {table}"
    written = read_table_csv(table)
    assert written["rule"] == ["big_amount", "busy_card"] and written["hits"][0] == big.hits


def read_table_csv(path: Path) -> dict[str, list[object]]:
    import pyarrow.csv as pa_csv

    result: dict[str, list[object]] = pa_csv.read_csv(path).to_pydict()
    return result


def test_backtest_refuses_a_bad_rules_file_and_an_unlabelled_history_with_exit_2(tmp_path: Path) -> None:
    bad, data = tmp_path / "rules.json", tmp_path / "history.csv"
    bad.write_text('{"rules": [{"name": "r1", "when": "amount >", "action": "DECLINE"}]}')
    out = fraudscore("backtest", "--rules", str(bad), "--data", str(data))
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith(f"fraudscore backtest: cannot load rules {bad}: rule 'r1'")
    data.write_text("transaction_id,card_id,merchant_id,amount_minor,currency,event_time_ms\n"
                    "t1,c1,m1,1000,USD,1767225600000\n")
    out = fraudscore("backtest", "--rules", "service/defaults/rules.json", "--data", str(data))
    assert out.returncode == 2
    assert "column 'is_fraud': no transaction is labelled fraud" in out.stderr


def test_bench_rules_prints_cost_per_transaction_per_rule(model_dir: Path) -> None:
    out = fraudscore("bench", "rules", "--model", str(model_dir))
    assert out.returncode == 0, out.stderr
    assert "packaged rules" in out.stdout and "generated rules (50)" in out.stdout
    assert "ns per transaction per rule" in out.stdout


def test_evaluate_writes_the_training_report_for_a_labelled_history(tmp_path: Path, model_dir: Path) -> None:
    import shutil

    from core.history.simulate import simulate
    from core.history.table import write_history
    from core.offline.evaluation import roc_auc
    from core.offline.replay import replay_features

    model, data = tmp_path / "model", tmp_path / "later.csv"
    shutil.copytree(model_dir, model)  # the default report folder goes inside the model directory
    write_history(simulate(num_days=3, num_cards=150, num_merchants=68, seed=5, fraud_scale=5.0), data)
    out = fraudscore("evaluate", "--model", str(model), "--data", str(data))
    assert out.returncode == 0, out.stderr
    report = model / "evaluation-later"
    assert out.stdout.splitlines()[-1] == f"report: {report / 'report.md'}"
    for name in ("report.md", "metrics.json", "pr_curve.png", "score_histogram.png"):
        assert (report / name).stat().st_size > 0
    metrics = json.loads((report / "metrics.json").read_text())
    history = read_history(data)
    expected = load_model_dir(model).forest.predict(replay_features(history))
    assert metrics["transactions"] == len(history)
    assert metrics["roc_auc"] == roc_auc(history.is_fraud, expected)
    assert metrics["feature_importance_gain"]
    again = fraudscore("evaluate", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "elsewhere"))
    assert again.returncode == 0, again.stderr
    assert json.loads((tmp_path / "elsewhere" / "metrics.json").read_text()) == metrics


def test_evaluate_refuses_a_bad_model_or_history_with_exit_2(tmp_path: Path, model_dir: Path) -> None:
    missing = fraudscore("evaluate", "--model", str(tmp_path / "nope"), "--data", str(tmp_path / "h.csv"))
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr.startswith(f"fraudscore evaluate: cannot load model {tmp_path / 'nope'}: no manifest.json")
    no_data = fraudscore("evaluate", "--model", str(model_dir), "--data", str(tmp_path / "h.csv"))
    assert no_data.returncode == 2
    assert no_data.stderr.startswith(f"fraudscore evaluate: {tmp_path / 'h.csv'}: no such file")
    unlabelled = tmp_path / "unlabelled.csv"
    unlabelled.write_text("transaction_id,card_id,merchant_id,amount_minor,currency,event_time_ms\n"
                          "t1,c1,m1,1000,USD,1767225600000\n")
    out = fraudscore("evaluate", "--model", str(model_dir), "--data", str(unlabelled))
    assert out.returncode == 2
    assert "column 'is_fraud': no transaction is labelled fraud" in out.stderr
    assert not (model_dir / "evaluation-unlabelled").exists()


def users_export(tmp_path: Path, *, bad_rows: int, pan: bool = False) -> Path:
    """A simulated history as a payment team might export it: decimal amounts, ISO 8601 times,
    and `bad_rows` rows with broken values."""
    import pyarrow as pa
    import pyarrow.csv as pa_csv

    from core.encode import currency_exponent
    from core.history.simulate import simulate
    from core.history.times import iso_ms

    h = simulate(num_days=4, num_cards=200, num_merchants=68, seed=5, fraud_scale=5.0)
    amount = [f"{m / 10 ** currency_exponent(c):.{currency_exponent(c)}f}" for m, c in zip(
        h.amount_minor.tolist(), h.currency.tolist(), strict=True)]
    event_time = [iso_ms(t) for t in h.event_time_ms.tolist()]
    for i in range(bad_rows):
        amount[10 + 7 * i] = "n/a"
    card_id = h.card_id.tolist()
    if pan:
        card_id[3] = "4111111111111111"
    table = pa.table({
        "transaction_id": h.transaction_id.tolist(), "card_id": card_id, "merchant_id": h.merchant_id.tolist(),
        "merchant_category": h.merchant_category.tolist(), "amount": amount, "currency": h.currency.tolist(),
        "event_time": event_time, "channel": h.channel.tolist(), "country": h.country.tolist(),
        "is_fraud": h.is_fraud.tolist(), "fraud_reported_time_ms": h.fraud_reported_time_ms.tolist(),
    })
    path = tmp_path / "export.csv"
    pa_csv.write_csv(table, path)
    return path


def test_train_on_a_users_export_drops_and_reports_bad_rows(tmp_path: Path) -> None:
    import hashlib

    from core.history.read import read_history_dropping
    from core.history.times import parse_time_ms

    data = users_export(tmp_path, bad_rows=3)
    history, _ = read_history_dropping(data)
    start = int(history.event_time_ms[0])
    valid_from = start + 3 * 86_400_000
    out = fraudscore("train", "--data", str(data), "--out", str(tmp_path / "m"), "--label-delay", "1d12h",
                     "--valid-from", str(valid_from), "--train-until", "2026-01-03T00:00:00Z",
                     "--review-rate", "0.01", "--decline-fpr", "0.002")
    assert out.returncode == 0, out.stderr
    assert f"read {len(history) + 3} rows from {data}: kept {len(history)}, dropped 3" in out.stdout
    assert "column 'amount_minor' read as amount" not in out.stdout  # forms are listed by the file's name
    assert "column 'amount' read as amount_minor" in out.stdout
    assert "3 rows, column 'amount': expected a decimal amount" in out.stdout
    model = load_model_dir(tmp_path / "m")
    training = model.manifest["training"]
    assert training["label_delay_ms"] == 36 * 3_600_000
    assert model.manifest["threshold_policy"] == {"review_rate": 0.01, "decline_fpr": 0.002}
    assert training["valid_from"].startswith(datetime_text(valid_from))
    assert parse_time_ms(training["train_until"]) == parse_time_ms("2026-01-03T00:00:00Z")
    assert training["data"]["source"] == "export.csv"  # the name, not this machine's path
    assert training["data"]["rows_dropped"] == 3
    assert training["data"]["dropped"][0]["first_rows"] == [11, 18, 25]
    assert training["data"]["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    report = (tmp_path / "m" / "report.md").read_text()
    assert "## Data read" in report and "| `amount` | expected a decimal amount" in report
    assert "slightly optimistic" in report
    # Evaluating it on its own training file: features under its label delay, and a warning.
    again = fraudscore("evaluate", "--model", str(tmp_path / "m"), "--data", str(data), "--max-dropped", "0.01")
    assert again.returncode == 0, again.stderr
    assert f"label delay: 36 h, as model {model.version} was trained" in again.stdout
    assert "rows fall inside model" in again.stderr and "the metrics flatter it" in again.stderr


def datetime_text(ms: int) -> str:
    from core.history.times import iso_ms

    return iso_ms(ms)[:19]


def test_train_refuses_a_file_that_is_mostly_bad_or_holds_card_numbers(tmp_path: Path) -> None:
    bad = fraudscore("train", "--data", str(users_export(tmp_path, bad_rows=40)), "--out", str(tmp_path / "m"),
                     "--max-dropped", "0.001")
    assert bad.returncode == 2
    assert "rows have bad values, more than the 0.10% that may be dropped" in bad.stderr
    assert "--max-dropped" in bad.stderr
    pan = fraudscore("train", "--data", str(users_export(tmp_path, bad_rows=0, pan=True)),
                     "--out", str(tmp_path / "m"), "--max-dropped", "0.5")
    assert pan.returncode == 2
    assert "row 4, column 'card_id': value looks like a raw card number" in pan.stderr
    assert "4111111111111111" not in pan.stderr + pan.stdout
    assert not (tmp_path / "m").exists()
    flag = fraudscore("train", "--out", str(tmp_path / "m"), "--valid-from", "next tuesday")
    assert flag.returncode == 2 and "--valid-from: expected ISO 8601" in flag.stderr
    year = fraudscore("train", "--out", str(tmp_path / "m"), "--train-until", "2026")
    assert year.returncode == 2 and "a year or epoch seconds?" in year.stderr
    weight = fraudscore("train", "--out", str(tmp_path / "m"), "--fraud-weight", "inf")
    assert weight.returncode == 2 and "--fraud-weight: expected a number in" in weight.stderr
