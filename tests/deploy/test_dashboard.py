"""The Grafana dashboard and the Prometheus alert rules query only metrics the server exports
(the list in docs/metrics.md, which tests/e2e/test_metrics.py checks against a real scrape),
with labels those metrics have, in PromQL that passes a syntax sanity check (no promtool here)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest
import yaml

from tests.conftest import REPO
from tests.metrics_doc import Documented, documented_metrics, series_names

DASHBOARD = REPO / "deploy" / "grafana" / "fraudscore-dashboard.json"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yaml"

_FUNCTIONS = {
    "abs", "absent", "absent_over_time", "avg_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min",
    "count_over_time", "delta", "deriv", "exp", "floor", "histogram_quantile", "idelta", "increase", "irate",
    "label_replace", "label_join", "last_over_time", "ln", "log2", "log10", "max_over_time", "min_over_time",
    "predict_linear", "quantile_over_time", "rate", "resets", "round", "scalar", "sort", "sort_desc", "sqrt",
    "stddev_over_time", "sum_over_time", "time", "timestamp", "vector",
}
_AGGREGATIONS = {"sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile",
                 "count_values", "group"}
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
             "offset", "inf", "nan"}
# Labels every scraped series has, besides its own.
_TARGET_LABELS = {"instance", "job", "namespace", "pod", "container", "service", "endpoint"}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_MATCHERS = re.compile(r"\{([^{}]*)\}")
_MATCHER = re.compile(r'^\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"(?:[^"\\]|\\.)*"\s*$')
_RANGE = re.compile(r"\[(?:\$__rate_interval|\$__interval|\$__range|\d+[smhdwy](?:\d+[smhdwy])*)"
                    r"(?::(?:\d+[smhdwy])?)?\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def _known_series() -> dict[str, Documented]:
    return {series: m for m in documented_metrics().values() for series in series_names(m)}


def check_promql(expr: str) -> list[tuple[str, set[str]]]:
    """The (metric, matcher label names) selectors of `expr`, after a syntax sanity check: balanced
    brackets, well-formed label matchers and range durations, known functions and aggregations.
    Raises AssertionError naming what is wrong."""
    depth = 0
    for ch in _STRING.sub('""', expr):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        assert depth >= 0, f"unbalanced ')' in {expr!r}"
    assert depth == 0, f"unbalanced '(' in {expr!r}"
    # Matchers first (strings inside them may hold any character), then the rest without strings.
    selectors: list[tuple[str, set[str]]] = []
    rest = expr
    for m in list(_MATCHERS.finditer(expr))[::-1]:
        before = expr[:m.start()]
        name_match = re.search(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*$", before)
        assert name_match and name_match.group(1) not in _KEYWORDS | _FUNCTIONS | _AGGREGATIONS, \
            f"a label matcher without a metric name in {expr!r}"
        labels = set()
        for matcher in filter(str.strip, _split_matchers(m.group(1))):
            lm = _MATCHER.match(matcher)
            assert lm, f"bad label matcher {matcher!r} in {expr!r}"
            labels.add(lm.group(1))
        selectors.append((name_match.group(1), labels))
        rest = rest[:m.start()] + rest[m.end():]
        after = expr[m.end():].lstrip()
        assert not after or not _NAME.match(after) or after.split()[0] in _KEYWORDS | {"offset"}, \
            f"something follows a selector's matchers in {expr!r}: {after[:20]!r}"
    rest = _STRING.sub("", rest)
    stripped = _RANGE.sub("", rest)
    assert "[" not in stripped and "]" not in stripped, f"a bad range or subquery in {expr!r}"
    stripped = _GROUPING.sub("", stripped)
    stripped = re.sub(r"\b\d+(\.\d+)?(e[+-]?\d+)?\b", "", stripped)
    bare: list[tuple[str, set[str]]] = []
    for m in _NAME.finditer(stripped):
        word = m.group(0)
        called = stripped[m.end():].lstrip().startswith("(")
        if called:
            assert word in _FUNCTIONS | _AGGREGATIONS, f"unknown function {word!r} in {expr!r}"
        elif word not in _KEYWORDS and word not in {n for n, _ in selectors}:
            bare.append((word, set()))
        elif word in _FUNCTIONS | _AGGREGATIONS:
            raise AssertionError(f"{word} without arguments in {expr!r}")
    assert re.sub(r"[\s()+\-*/%^<>=!,]|and|or|unless|bool", "", _NAME.sub("", stripped)) == "", \
        f"unexpected characters in {expr!r}"
    return selectors + bare


def _split_matchers(inner: str) -> Iterator[str]:
    part, quoted, escaped = "", False, False
    for ch in inner:
        if ch == "," and not quoted:
            yield part
            part = ""
            continue
        part += ch
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
    yield part


def _dashboard_exprs() -> list[str]:
    def walk(panels: list[dict[str, object]]) -> Iterator[str]:
        for p in panels:
            for t in p.get("targets", []):  # type: ignore[attr-defined]
                yield t["expr"]
            yield from walk(p.get("panels", []))  # type: ignore[arg-type]
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = list(walk(dashboard["panels"]))
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            exprs.append(re.fullmatch(r"label_values\((.*),\s*\w+\)", query).group(1))  # type: ignore[union-attr]
    return exprs


def _alert_rules() -> list[dict[str, object]]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [r for group in rules["groups"] for r in group["rules"]]


def _check_names(expr: str) -> set[str]:
    known = _known_series()
    used = set()
    for name, labels in check_promql(expr):
        assert name in known, f"{name} (in {expr!r}) is not an exported metric (docs/metrics.md)"
        extra = labels - set(known[name].labels) - _TARGET_LABELS - ({"le"} if name.endswith("_bucket") else set())
        assert not extra, f"{name} has no label {sorted(extra)} (in {expr!r})"
        used.add(name)
    return used


@pytest.mark.parametrize("expr", _dashboard_exprs())
def test_every_dashboard_query_uses_exported_metrics(expr: str) -> None:
    _check_names(expr)


@pytest.mark.parametrize("rule", _alert_rules(), ids=lambda r: str(r.get("alert")))
def test_every_alert_is_well_formed_and_uses_exported_metrics(rule: dict[str, object]) -> None:
    assert set(rule) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}, sorted(rule)
    assert re.fullmatch(r"[A-Z][A-Za-z0-9]+", str(rule["alert"]))
    if "for" in rule:
        assert re.fullmatch(r"(\d+[smhdwy])+", str(rule["for"])), rule["for"]
    labels, annotations = rule["labels"], rule["annotations"]
    assert isinstance(labels, dict) and labels.get("severity") in ("critical", "warning", "info")
    assert isinstance(annotations, dict) and annotations.get("summary")
    for text in annotations.values():  # Go templates: balanced {{ }}
        assert str(text).count("{{") == str(text).count("}}")
    _check_names(str(rule["expr"]))


def test_the_alerts_cover_fallbacks_sheds_the_budget_and_no_model() -> None:
    exprs = {str(r["alert"]): re.sub(r"\s+", " ", str(r["expr"])).strip() for r in _alert_rules()}
    assert any("fraudscore_fallbacks_total" in e and "/" in e for e in exprs.values()), "fallback ratio"
    assert any("fraudscore_sheds_total" in e and "/" in e for e in exprs.values()), "shed ratio"
    assert any("fraudscore_calls_in_flight" in e and "fraudscore_calls_in_flight_limit" in e
               for e in exprs.values()), "a pod at its call limit (gRPC refuses past it)"
    assert any("histogram_quantile(0.99" in e and "fraudscore_request_duration_seconds_bucket" in e
               and e.endswith("> 0.05") for e in exprs.values()), "p99 over the 50 ms budget"
    assert any("fraudscore_model_loaded" in e and "== 0" in e for e in exprs.values()), "no model loaded"


def _all_exprs() -> list[str]:
    return _dashboard_exprs() + [str(r["expr"]) for r in _alert_rules()]


def _selectors(expr: str, metric: str) -> list[str]:
    """The matcher text of every selector of `metric` in `expr` ('' when it has none)."""
    return [m.group(1) or "" for m in re.finditer(rf"\b{metric}\b(?:\{{([^{{}}]*)\}})?", expr)]


def test_latency_queries_leave_out_stream_lifetimes() -> None:
    """fraudscore_request_duration_seconds of ScoreStream is a stream's lifetime, not an answer's latency."""
    for expr in _all_exprs():
        for matchers in _selectors(expr, r"fraudscore_request_duration_seconds_(?:bucket|count|sum)"):
            assert 'method="Score"' in matchers or 'method!="ScoreStream"' in matchers, expr


def test_shed_ratios_keep_transactions_and_outcome_reports_apart() -> None:
    for expr in _all_exprs():
        if "fraudscore_sheds_total" in expr and "/" in expr:
            reasons = {re.search(r'reason="(\w+)"', m).group(1) if "reason=" in m else None  # type: ignore[union-attr]
                       for m in _selectors(expr, "fraudscore_sheds_total")}
            assert len(reasons) == 1 and None not in reasons, f"one shed reason per ratio: {expr}"


def test_no_alert_on_state_occupancy() -> None:
    """Occupancy reaches ~100% on every warm pod by design (LRU): evictions per scored transaction alert."""
    exprs = {str(r["alert"]): str(r["expr"]) for r in _alert_rules()}
    assert not [a for a, e in exprs.items() if "fraudscore_state_entities" in e]
    assert any("fraudscore_state_evictions_total" in e and "fraudscore_decisions_total" in e for e in exprs.values())


def test_the_budget_is_documented_where_it_is_hard_coded() -> None:
    """le="0.05" and "> 0.05" are FRAUDSCORE_BUDGET_MS's default: each place says so."""
    for rule in _alert_rules():
        if "0.05" in str(rule["expr"]):
            assert "FRAUDSCORE_BUDGET_MS" in str(rule["annotations"]), rule["alert"]
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [q for p in dashboard["panels"] for q in [p, *p.get("panels", [])]]
    for panel in panels:
        if "0.05" in json.dumps(panel.get("targets", [])) + json.dumps(panel.get("fieldConfig", {})):
            assert "FRAUDSCORE_BUDGET_MS" in panel.get("description", ""), panel["title"]


def test_the_dashboard_shows_what_operators_need() -> None:
    used = set().union(*(_check_names(e) for e in _dashboard_exprs()))
    for name in ("fraudscore_requests_total", "fraudscore_request_duration_seconds_bucket",
                 "fraudscore_stage_duration_seconds_bucket", "fraudscore_batch_size_count",
                 "fraudscore_decisions_total", "fraudscore_fallbacks_total", "fraudscore_sheds_total",
                 "fraudscore_fraud_probability_bucket", "fraudscore_state_entities", "fraudscore_model_info",
                 "fraudscore_model_loaded", "fraudscore_rules_reloads_total", "fraudscore_model_reloads_total",
                 "fraudscore_challenger_disagreements_total"):
        assert name in used, f"the dashboard has no panel on {name}"
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


@pytest.mark.parametrize("bad", [
    "rate(fraudscore_requests_total[5m]",                      # unbalanced
    "rate(fraudscore_requests_total{code=OK}[5m])",            # unquoted matcher value
    "rate(fraudscore_requests_total[5 minutes])",              # bad duration
    "histogram_quantil(0.99, fraudscore_batch_size_bucket)",   # unknown function
    'fraudscore_requests_total{method="Score"}_bucket',        # junk after the matchers
])
def test_the_checker_catches_malformed_queries(bad: str) -> None:
    with pytest.raises(AssertionError):
        check_promql(bad)


def test_the_checker_catches_unexported_metrics_and_labels() -> None:
    with pytest.raises(AssertionError, match="not an exported metric"):
        _check_names("rate(fraudscore_no_such_thing_total[5m])")
    with pytest.raises(AssertionError, match="has no label"):
        _check_names('rate(fraudscore_decisions_total{stage="x"}[5m])')
