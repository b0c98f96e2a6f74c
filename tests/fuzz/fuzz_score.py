"""Coverage-guided fuzzing (atheris) of decode → validate → score, in process.

Each input is a serialized ScoreBatchRequest, ScoreRequest or ReportOutcomeRequest (the
first byte picks which, the rest is the message). It is decoded as the server decodes it
(service.api.validation.lenient: bytes that do not parse are refused INVALID_ARGUMENT naming
`request`, not answered by gRPC before the handler) and validated as the handlers validate it.
Messages that pass are scored by the service's own pipeline (service.serving.pipeline.Pipeline, as the
pipeline thread runs it) against one entity state kept across inputs.

What it checks, per input: no crash and no hang (libFuzzer's -timeout); one answer per
transaction, each in range; a refusal is InvalidInputError naming a request field (or
`request`); and the entity state is unchanged after a refused input. In process, refused input
reaches no code that holds the state (the harness, like the handlers, validates the whole
request before anything is scored), so that last check guards two things only: that decoding
and validation stay free of side effects, and that the gate comes first (tests/fuzz/
test_harness.py shows it fails when either breaks). The server's promise that a refused call
changes nothing — features, idempotency records, outcomes — is checked over a real channel by
tests/e2e/test_fuzz.py.

    # atheris is in the dev extra (`make test` installs it): a manylinux wheel for CPython 3.11, no clang
    mkdir -p /tmp/fuzz-corpus      # an empty corpus folder gets valid seed messages written into it
    .venv/bin/python tests/fuzz/fuzz_score.py /tmp/fuzz-corpus -max_total_time=60 -artifact_prefix=/tmp/fuzz-
    .venv/bin/python tests/fuzz/fuzz_score.py --model models/default /tmp/fuzz-corpus -max_total_time=300 \
        -artifact_prefix=/tmp/fuzz-                                             # the model path too

Without --model, answers come from the packaged fallback rules. A broken promise or crash
is saved as /tmp/fuzz-crash-…, an input over -rss_limit_mb as …oom-…; replay one with
`.venv/bin/python tests/fuzz/fuzz_score.py /tmp/fuzz-crash-…`. Only the modules under test
are instrumented (see `main`). Not collected by pytest (the file
name does not start with test_); tests/e2e/test_fuzz.py runs `one_input` on hypothesis'
inputs without atheris.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import math
import sys
from pathlib import Path

import numpy as np
from fraudscore.v1 import fraudscore_pb2 as pb

from core import encode, identifiers
from core.encode import KeyHasher
from core.errors import InvalidInputError
from core.features import EntityState, FeatureEngine
from core.model import load_model_dir
from core.rules.file import load_ruleset
from core.scoring import Scorer
from service.api import validation
from service.api.validation import decoded, lenient, validate_outcome, validate_transaction
from service.runtime.metrics import Metrics
from service.serving import pipeline as pipeline_module
from service.serving.items import Item
from service.serving.pipeline import Pipeline

RULES = Path(__file__).resolve().parents[2] / "service" / "defaults" / "rules.json"
# `request`: bytes that do not parse as the message (service.api.validation.decoded).
FIELDS = frozenset(f.name for f in pb.Transaction.DESCRIPTOR.fields) | frozenset(
    f.name for f in pb.ReportOutcomeRequest.DESCRIPTOR.fields) | {"request"}
_BATCH, _SINGLE, _REPORT = lenient(pb.ScoreBatchRequest), lenient(pb.ScoreRequest), lenient(pb.ReportOutcomeRequest)


class Harness:
    """One pipeline and one entity state, shared by every input of a fuzzing run."""

    def __init__(self, model_dir: Path | None = None) -> None:
        self.hasher = KeyHasher()
        model = load_model_dir(model_dir) if model_dir is not None else None
        self.state = EntityState.empty(card_capacity=1024, merchant_capacity=1024, customer_capacity=1024,
                                       device_capacity=1024, ip_capacity=1024)
        self.pipeline = Pipeline(engine=FeatureEngine(self.state), scorer=Scorer(model, load_ruleset(RULES)),
                                 hasher=self.hasher, metrics=Metrics())
        self.loop = asyncio.new_event_loop()

    def one_input(self, data: bytes) -> None:
        """Decode, validate and score one input; raise AssertionError on a broken promise."""
        kind, body = (data[0] % 3, data[1:]) if data else (0, b"")
        before = _snapshot(self.state)
        try:
            txns = self._admit(kind, body)
        except InvalidInputError as exc:
            _check_refusal(exc)
            if any(not np.array_equal(a, b, equal_nan=True) for a, b in zip(before, _snapshot(self.state), strict=True)):
                raise AssertionError("a refused input changed the entity state") from exc
            return
        if txns:
            self._score(txns)

    def _admit(self, kind: int, body: bytes) -> list[pb.Transaction]:
        """What the handler would pass on to the batcher (nothing for a report); InvalidInputError if refused."""
        if kind == 2:
            validate_outcome(decoded(_REPORT(body)))
            return []
        if kind == 0:
            txns = list(decoded(_BATCH(body)).transactions)
            for i, txn in enumerate(txns):
                validate_transaction(txn, prefix=f"transactions[{i}].")
            return txns
        request = decoded(_SINGLE(body))
        if not request.HasField("transaction"):
            return []
        validate_transaction(request.transaction)
        return [request.transaction]

    def _score(self, txns: list[pb.Transaction]) -> None:
        items = [Item(t, math.inf, 0, self.loop.create_future()) for t in txns]
        answers = self.pipeline.run(items).answers
        if len(answers) != len(txns):
            raise AssertionError(f"{len(txns)} transactions, {len(answers)} answers")
        for answer in map(pb.ScoreResponse.FromString, answers):
            if not (0.0 <= answer.fraud_probability <= 1.0 and 0 <= answer.risk_score <= 999):
                raise AssertionError(f"answer out of range: {answer}")


def _check_refusal(exc: InvalidInputError) -> None:
    name = exc.field.rsplit(".", 1)[-1]
    if name not in FIELDS:
        raise AssertionError(f"refusal names no request field: {exc}") from exc


def _snapshot(state: EntityState) -> list[np.ndarray]:
    """Copies of every array of every entity table (keys, values, recency, counters)."""
    return [getattr(table, f.name).copy() for table in state.tables() for f in dataclasses.fields(table)
            if isinstance(getattr(table, f.name), np.ndarray)]


_SEED = b"\x01" + pb.ScoreRequest(transaction=pb.Transaction(
    transaction_id="fuzz-seed", card_id="tok_fuzz", merchant_id="m_fuzz", amount_minor=2_500, currency="USD",
    event_time_ms=1_767_225_600_000, channel=pb.ECOMMERCE, country="US", latitude=40.7, longitude=-74.0,
    device_id="dev_fuzz", ip_address="10.0.0.1")).SerializeToString()


def _write_seeds(corpus: Path) -> None:
    good = pb.ScoreRequest.FromString(_SEED[1:]).transaction
    batch = pb.ScoreBatchRequest(transactions=[good, good, good])
    for i, t in enumerate(batch.transactions):
        t.transaction_id = f"fuzz-seed-{i}"
    batch.transactions[1].ClearField("latitude")
    batch.transactions[1].ClearField("longitude")
    report = pb.ReportOutcomeRequest(transaction_id="fuzz-seed", card_id="tok_fuzz", merchant_id="m_fuzz",
                                     outcome=pb.CONFIRMED_FRAUD, reported_time_ms=1_767_225_660_000)
    seeds = {"score": _SEED, "batch": b"\x00" + batch.SerializeToString(), "report": b"\x02" + report.SerializeToString()}
    for name, data in seeds.items():
        (corpus / f"seed-{name}").write_bytes(data)


def main(argv: list[str]) -> None:
    import atheris  # only this entry point needs it

    model_dir = None
    if "--model" in argv:
        at = argv.index("--model")
        model_dir = Path(argv[at + 1])
        del argv[at:at + 2]
    harness = Harness(model_dir)
    corpus = next((Path(a) for a in argv[1:] if not a.startswith("-") and Path(a).is_dir()), None)
    if corpus is not None and not any(corpus.iterdir()):
        _write_seeds(corpus)  # libFuzzer rarely builds a valid protobuf message by mutation alone
    harness.one_input(_SEED)  # compiles the kernels before the clock of the first input starts
    # Coverage of the code under test only: atheris.instrument_all() also instruments protobuf,
    # numpy and numba, and then grows by ~1.5 kB an input (out of memory within a minute).
    for module in (validation, identifiers, encode, pipeline_module, sys.modules[__name__]):
        for _, obj in inspect.getmembers(module):
            functions = [obj] if inspect.isfunction(obj) else [
                f for _, f in inspect.getmembers(obj, inspect.isfunction)] if inspect.isclass(obj) else []
            for fn in functions:
                if fn.__module__ == module.__name__:
                    atheris.instrument_func(fn)
    atheris.Setup(argv, harness.one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
