"""Named lists in the service: the pipeline (and the event-loop fallback) match requests' identifiers
hashed with the server's key, and a reload watches the list files with the rules file."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import orjson
from fraudscore.v1 import fraudscore_pb2 as pb

from core.encode import KeyHasher
from core.features import EntityState, FeatureEngine
from core.scoring import Scorer
from service.runtime.metrics import Metrics
from service.runtime.reload import load_rules, loaded_stamp, rules_stamp
from service.serving.items import Item
from service.serving.pipeline import Pipeline
from tests.service.serving import parsed

HASHER = KeyHasher(b"server-key")


def write_rules(tmp_path: Path) -> Path:
    (tmp_path / "blocked.txt").write_text("# cards\ntok_stolen\n")
    path = tmp_path / "rules.json"
    path.write_bytes(orjson.dumps({
        "version": "lists", "lists": {"blocked": {"kind": "card", "file": "blocked.txt"},
                                      "no_device": {"kind": "device", "values": ["dev_1"]}},
        "rules": [],
        "fallback": {"rules": [
            {"name": "blocked", "when": "card in @blocked", "action": "DECLINE", "reason_code": "R_BLOCKED"},
            # An empty device_id is unknown: in no list, and not "not in" any either.
            {"name": "other_device", "when": "device not in @no_device", "action": "REVIEW"}]}}))
    return path


def test_the_pipeline_and_the_event_loop_fallback_apply_the_lists(tmp_path: Path) -> None:
    ruleset = load_rules(write_rules(tmp_path), hasher=HASHER)
    txns = [pb.Transaction(transaction_id=f"t{i}", card_id=card, merchant_id="m", amount_minor=100, currency="USD",
                           event_time_ms=1_767_225_600_000 + i, device_id=device)
            for i, (card, device) in enumerate([("tok_stolen", ""), ("tok_fine", ""), ("tok_fine", "dev_2")])]
    state = EntityState.empty(card_capacity=16, merchant_capacity=16, customer_capacity=16, device_capacity=16,
                              ip_capacity=16)
    pipeline = Pipeline(engine=FeatureEngine(state), scorer=Scorer(None, ruleset), hasher=HASHER, metrics=Metrics())
    expected = [pb.DECLINE, pb.APPROVE, pb.REVIEW]
    loop = asyncio.new_event_loop()
    try:
        answers = parsed(pipeline.run([Item(t, 0.0, 0, loop.create_future()) for t in txns]).answers)
        assert [a.decision for a in answers] == expected
        assert [r.code for r in answers[0].reasons] == ["R_BLOCKED"]
        fallback = parsed(pipeline.answer_fallback([Item(t, 0.0, 0, loop.create_future()) for t in txns], "test"))
        assert [a.decision for a in fallback] == expected
    finally:
        loop.close()
    # Hashed with another key, the list matches nothing.
    other = Pipeline(engine=FeatureEngine(state), scorer=Scorer(None, load_rules(tmp_path / "rules.json")),
                     hasher=HASHER, metrics=Metrics())
    loop = asyncio.new_event_loop()
    try:
        assert parsed(other.run([Item(txns[0], 0.0, 0, loop.create_future())]).answers)[0].decision != pb.DECLINE
    finally:
        loop.close()


def test_a_reload_stamp_covers_the_list_files(tmp_path: Path) -> None:
    path = write_rules(tmp_path)
    before = rules_stamp(path)
    ruleset = load_rules(path, hasher=HASHER)
    seen = loaded_stamp(before, ruleset)
    lists = [p for p, _ in ruleset.list_files]
    assert lists == [tmp_path / "blocked.txt"]
    polled = rules_stamp(path, seen, list_files=lists)
    assert polled.digest == seen.digest  # what was loaded is unchanged: no reload
    assert rules_stamp(path, polled, list_files=lists) == polled
    (tmp_path / "blocked.txt").write_text("tok_stolen\ntok_new\n")
    os.utime(tmp_path / "blocked.txt", ns=(1, 1))  # a different stat, whatever the clock's resolution
    changed = rules_stamp(path, polled, list_files=lists)
    assert changed.digest != polled.digest
    (tmp_path / "blocked.txt").unlink()
    assert "unreadable" in rules_stamp(path, changed, list_files=lists).files[1].digest
