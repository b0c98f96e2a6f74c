"""Rules hot reload over real server processes: SIGHUP, polling (a ConfigMap-style symlink
swap included), refusal of a bad file, and reloads under concurrent load."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import orjson
from fraudscore.v1 import fraudscore_pb2 as pb
from fraudscore.v1 import fraudscore_pb2_grpc as pb_grpc

from tests.conftest import REPO, ServerProcess, start_server
from tests.e2e.helpers import BackgroundLoad, scrape, txn, value

EVERYTHING = [{"field": "amount", "op": ">=", "value": 0}]


def rule(name: str, action: str, when: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"name": name, "when": when, "action": action, "reason_code": f"R_{name.upper()}",
            "description": name, **extra}


def rules_file(version: str, rules: list[dict[str, Any]], fallback: list[dict[str, Any]] | None = None) -> bytes:
    return orjson.dumps({"version": version, "rules": rules,
                         "fallback": {"default_probability": 0.02, "rules": fallback or []}})


def defaults_with(version: str, *extra_rules: dict[str, Any]) -> bytes:
    packaged = orjson.loads((REPO / "service" / "defaults" / "rules.json").read_bytes())
    packaged["version"] = version
    packaged["rules"].extend(extra_rules)
    return orjson.dumps(packaged)


def write_atomically(path: Path, data: bytes) -> None:
    """What a deploy tool should do: the server never reads a half-written file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def wait_until(check: Callable[[], bool], what: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def score(srv: ServerProcess, **fields: Any) -> pb.ScoreResponse:
    with grpc.insecure_channel(srv.target) as ch:
        answer: pb.ScoreResponse = pb_grpc.FraudScoringStub(ch).Score(pb.ScoreRequest(transaction=txn(**fields)),
                                                                       timeout=10)
    return answer


def reloads(srv: ServerProcess, result: str) -> float:
    return value(scrape(srv), "fraudscore_rules_reloads_total", result=result)


def info_versions(srv: ServerProcess) -> list[str]:
    return [labels["ruleset_version"] for labels, _ in scrape(srv)["fraudscore_model_info"]]


BIG_AMOUNT = rule("big_amount", "DECLINE", [{"field": "amount", "op": ">=", "value": 1000}], priority=5)


def test_sighup_swaps_in_a_changed_file_and_answers_carry_the_new_version(tmp_path: Path, model_dir: Path) -> None:
    path = tmp_path / "rules.json"
    path.write_bytes(defaults_with("v1"))
    srv = start_server(tmp_path, model_dir=model_dir,
                       extra_env={"FRAUDSCORE_RULES_FILE": str(path), "FRAUDSCORE_RULES_RELOAD_S": "0"})
    try:
        before = score(srv, amount_minor=200_000)
        assert before.ruleset_version == "v1"
        assert "R_BIG_AMOUNT" not in [r.code for r in before.reasons]
        write_atomically(path, defaults_with("v2", BIG_AMOUNT))
        srv.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: reloads(srv, "ok") == 1, "the reload")
        after = score(srv, amount_minor=200_000)
        assert after.ruleset_version == "v2"
        assert after.decision == pb.DECLINE and "R_BIG_AMOUNT" in [r.code for r in after.reasons]
        assert not after.degraded
        small = score(srv, amount_minor=5_000)
        assert small.ruleset_version == "v2" and "R_BIG_AMOUNT" not in [r.code for r in small.reasons]
        s = scrape(srv)
        assert [labels["ruleset_version"] for labels, _ in s["fraudscore_model_info"]] == ["v2"]
        assert value(s, "fraudscore_rule_hits_total", rule="big_amount", mode="enforce", decision="DECLINE") == 1
        assert value(s, "fraudscore_rules_reloads_total", result="refused") == 0
    finally:
        assert srv.stop() == 0
    log = srv.log()
    assert "rules reloaded" in log and '"old_ruleset_version":"v1"' in log and '"new_ruleset_version":"v2"' in log


def test_an_invalid_file_is_refused_counted_and_the_old_rules_keep_answering(tmp_path: Path) -> None:
    path = tmp_path / "rules.json"
    path.write_bytes(defaults_with("v1"))
    srv = start_server(tmp_path, model_dir=None,
                       extra_env={"FRAUDSCORE_RULES_FILE": str(path), "FRAUDSCORE_RULES_RELOAD_S": "0"})
    try:
        broken = rule("typo_rule", "DECLINE", [{"field": "card_count", "op": ">", "value": 1}])
        write_atomically(path, defaults_with("v2", broken))
        srv.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: reloads(srv, "refused") == 1, "the refusal")
        assert score(srv).ruleset_version == "v1"
        assert reloads(srv, "ok") == 0
        assert info_versions(srv) == ["v1"]
        # Fixed: the next SIGHUP takes it.
        write_atomically(path, defaults_with("v3"))
        srv.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: reloads(srv, "ok") == 1, "the reload of the fixed file")
        assert score(srv).ruleset_version == "v3"
    finally:
        assert srv.stop() == 0
    log = srv.log()
    assert "rules refused; the previous ruleset stays in use" in log
    assert "rule 'typo_rule', condition 0: unknown field 'card_count'" in log


def test_polling_follows_a_configmap_symlink_swap_without_a_signal(tmp_path: Path) -> None:
    # Kubernetes mounts a ConfigMap as rules.json -> ..data/rules.json, ..data -> ..<timestamp>/,
    # and updates it by pointing ..data at a new directory: the file is never written in place.
    mount = tmp_path / "config"
    (mount / "..v1").mkdir(parents=True)
    (mount / "..v1" / "rules.json").write_bytes(defaults_with("v1"))
    (mount / "..data").symlink_to("..v1")
    (mount / "rules.json").symlink_to("..data/rules.json")

    def publish(version: str, data: bytes) -> None:
        (mount / f"..{version}").mkdir()
        (mount / f"..{version}" / "rules.json").write_bytes(data)
        (mount / "..data_tmp").symlink_to(f"..{version}")
        os.replace(mount / "..data_tmp", mount / "..data")

    srv = start_server(tmp_path, model_dir=None, extra_env={
        "FRAUDSCORE_RULES_FILE": str(mount / "rules.json"), "FRAUDSCORE_RULES_RELOAD_S": "0.1"})
    try:
        assert score(srv).ruleset_version == "v1"
        publish("v2", defaults_with("v2", BIG_AMOUNT))
        wait_until(lambda: score(srv).ruleset_version == "v2", "the poll to pick up v2")
        assert reloads(srv, "ok") == 1
        publish("v3", b'{"version": "v3", "rules": [')
        wait_until(lambda: reloads(srv, "refused") == 1, "the refusal")
        time.sleep(0.5)  # five more polls: a refused file is refused once, not at every poll
        assert reloads(srv, "refused") == 1 and reloads(srv, "ok") == 1
        assert score(srv).ruleset_version == "v2"
    finally:
        assert srv.stop() == 0
    assert "not valid JSON" in srv.log()


def test_reloads_under_concurrent_load_fail_no_call_and_never_mix_versions(tmp_path: Path, model_dir: Path) -> None:
    """Version A approves everything, version B declines everything (model path and fallback
    alike): an answer is DECLINE exactly when it says B, so no answer mixed the two."""
    path = tmp_path / "rules.json"
    versions = {
        "A": rules_file("A", [rule("allow_all", "APPROVE", EVERYTHING)], [rule("fb_allow_all", "APPROVE", EVERYTHING)]),
        "B": rules_file("B", [rule("decline_all", "DECLINE", EVERYTHING)],
                        [rule("fb_decline_all", "DECLINE", EVERYTHING, probability=0.9)]),
    }
    path.write_bytes(versions["A"])
    srv = start_server(tmp_path, model_dir=model_dir,
                       extra_env={"FRAUDSCORE_RULES_FILE": str(path), "FRAUDSCORE_RULES_RELOAD_S": "0"})
    try:
        with BackgroundLoad(srv.target) as load:
            wait_until(lambda: len(load.answers) > 50 or bool(load.failures), "load to get going")
            for i, version in enumerate(["B", "A"] * 3, start=1):
                write_atomically(path, versions[version])
                srv.proc.send_signal(signal.SIGHUP)
                wait_until(lambda i=i: reloads(srv, "ok") == i or bool(load.failures), f"reload {i}")
                seen = len(load.answers)
                wait_until(lambda v=version, n=seen: any(a.ruleset_version == v for a in load.answers[n:])
                           or bool(load.failures), f"answers from {version}")
            assert reloads(srv, "refused") == 0
    finally:
        assert srv.stop() == 0
    assert not load.failures, load.failures
    assert {a.ruleset_version for a in load.answers} == {"A", "B"}
    mixed = [a for a in load.answers if (a.decision == pb.DECLINE) != (a.ruleset_version == "B")]
    assert not mixed, mixed[:3]
    assert srv.log().count("rules reloaded") == 6
