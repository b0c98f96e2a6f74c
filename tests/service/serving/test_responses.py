"""Answers serialized on the pipeline thread are byte for byte protobuf's own serialization."""

from __future__ import annotations

from dataclasses import dataclass

from fraudscore.v1 import fraudscore_pb2 as pb
from hypothesis import given
from hypothesis import strategies as st

from service.serving.responses import ResponseWriter, batch_response, varint

UINT32 = st.integers(0, 2**32 - 1)
ENUM = st.integers(0, 3)
DOUBLE = st.floats(allow_nan=False) | st.sampled_from([0.0, -0.0, 1.0, 5e-324])
TEXT = st.text(max_size=40)


@dataclass(frozen=True)
class _Reason:
    code: str
    description: str
    weight: float


answers = st.lists(st.tuples(TEXT, DOUBLE, st.integers(0, 2**31 - 1), ENUM, ENUM, UINT32,
                             st.lists(st.builds(_Reason, TEXT, TEXT, DOUBLE), max_size=4)), max_size=6)


@given(answers, st.booleans(), TEXT, TEXT, TEXT)
def test_every_answer_is_protobufs_own_serialization(rows, degraded, model, ruleset, features):
    writer = ResponseWriter()
    got = writer.write([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows],
                       [r[4] for r in rows], [r[6] for r in rows], degraded=degraded, model_version=model,
                       ruleset_version=ruleset, feature_set_version=features, latencies_us=[r[5] for r in rows])
    expected = [pb.ScoreResponse(
        transaction_id=txn_id, fraud_probability=p, risk_score=score, decision=decision, source=source,
        degraded=degraded, model_version=model, ruleset_version=ruleset, feature_set_version=features,
        server_latency_us=latency,
        reasons=[pb.Reason(code=r.code, description=r.description, weight=r.weight) for r in why],
    ).SerializeToString() for txn_id, p, score, decision, source, latency, why in rows]
    assert got == expected
    assert batch_response(got) == pb.ScoreBatchResponse(results=[pb.ScoreResponse.FromString(a) for a in got]
                                                        ).SerializeToString()


@given(UINT32)
def test_varint_reads_back(n):
    assert pb.ScoreResponse.FromString(b"X" + varint(n)).server_latency_us == n


def test_varint_of_large_numbers():
    assert varint(2**63) == b"\x80" * 9 + b"\x01"
    assert varint(2**64 - 1) == b"\xff" * 9 + b"\x01"


def test_the_writer_knows_every_field_of_the_messages():
    # A field added to ScoreResponse or Reason must be added to ResponseWriter too (and to this list).
    assert [(f.number, f.name) for f in pb.ScoreResponse.DESCRIPTOR.fields] == [
        (1, "transaction_id"), (2, "fraud_probability"), (3, "risk_score"), (4, "decision"), (5, "reasons"),
        (6, "source"), (7, "degraded"), (8, "model_version"), (9, "ruleset_version"), (10, "feature_set_version"),
        (11, "server_latency_us")]
    assert [(f.number, f.name) for f in pb.Reason.DESCRIPTOR.fields] == [(1, "code"), (2, "description"), (3, "weight")]
    assert [(f.number, f.name) for f in pb.ScoreBatchResponse.DESCRIPTOR.fields] == [(1, "results")]
