"""Tests of service/serving/; `parsed` reads the pipeline's answers (serialized ScoreResponses)."""

from __future__ import annotations

from collections.abc import Sequence

from fraudscore.v1 import fraudscore_pb2 as pb


def parsed(answers: Sequence[bytes]) -> list[pb.ScoreResponse]:
    return [pb.ScoreResponse.FromString(a) for a in answers]
