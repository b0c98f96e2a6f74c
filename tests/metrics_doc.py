"""The exported metrics as docs/metrics.md lists them: the one list the scrape, dashboard and
alert tests check against."""

from __future__ import annotations

import re
from dataclasses import dataclass

from tests.conftest import REPO

METRICS_DOC = REPO / "docs" / "metrics.md"
_ROW = re.compile(r"^\|(.*)\|\s*$")
_TICKED = re.compile(r"`([^`]+)`")


@dataclass(frozen=True, slots=True)
class Documented:
    name: str                 # as queried: counters with _total, histograms without _bucket/_sum/_count
    type: str                 # counter, gauge or histogram
    labels: frozenset[str]

    @property
    def family(self) -> str:
        """The name prometheus_client's parser gives the family (a counter without `_total`)."""
        return self.name.removesuffix("_total") if self.type == "counter" else self.name


def _table(heading: str) -> list[list[str]]:
    text = METRICS_DOC.read_text()
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [[cell.strip() for cell in m.group(1).split("|")] for line in section.splitlines()
            if (m := _ROW.match(line))]
    return [r for r in rows[2:]]  # past the header and its rule


def documented_metrics() -> dict[str, Documented]:
    out = {}
    for name, kind, labels, _ in _table("Exported metrics"):
        (metric,) = _TICKED.findall(name)
        out[metric] = Documented(metric, kind, frozenset(_TICKED.findall(labels)))
    return out


def label_values() -> dict[str, frozenset[str]]:
    """Each label's allowed values; an empty set where the values are open but bounded by
    configuration (rule names, versions)."""
    out: dict[str, frozenset[str]] = {}
    for labels, values in _table("Label values"):
        allowed = frozenset(_TICKED.findall(values))
        for label in _TICKED.findall(labels):
            out[label] = allowed
    return out


def series_names(metric: Documented) -> set[str]:
    """Every sample name a query may use for the metric."""
    if metric.type == "histogram":
        return {f"{metric.name}_{s}" for s in ("bucket", "sum", "count")}
    return {metric.name}
