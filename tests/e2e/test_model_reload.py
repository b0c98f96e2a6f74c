"""Model hot swap over real server processes: SIGHUP, polling (a model appearing after start-up
included), refusal of a model of another feature set, and swaps under concurrent load."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import orjson
from fraudscore.v1 import fraudscore_pb2 as pb

from core.features import FEATURE_SET_VERSION
from core.model import MANIFEST_FILE, MODEL_FILE
from tests.conftest import ServerProcess, start_server
from tests.e2e.helpers import BackgroundLoad, scrape, value
from tests.e2e.test_rules_reload import score, wait_until, write_atomically

OLD_FEATURE_SET = "fs-0-retired"


def publish(source: Path, target: Path, model_version: str, **manifest_changes: object) -> None:
    """The trained test model as `model_version`, written into `target` file by file (atomically
    each), model first and manifest last, as a deploy tool should."""
    target.mkdir(parents=True, exist_ok=True)
    manifest = orjson.loads((source / MANIFEST_FILE).read_bytes())
    manifest.update(model_version=model_version, **manifest_changes)
    write_atomically(target / MODEL_FILE, (source / MODEL_FILE).read_bytes())
    write_atomically(target / MANIFEST_FILE, orjson.dumps(manifest))


def reloads(srv: ServerProcess, result: str) -> float:
    return value(scrape(srv), "fraudscore_model_reloads_total", result=result)


def info_models(srv: ServerProcess) -> list[str]:
    return [labels["model_version"] for labels, _ in scrape(srv)["fraudscore_model_info"]]


def test_sighup_swaps_in_a_new_model_and_answers_name_it(tmp_path: Path, model_dir: Path) -> None:
    live = tmp_path / "model"
    publish(model_dir, live, "A")
    srv = start_server(tmp_path, model_dir=live, extra_env={"FRAUDSCORE_MODEL_RELOAD_S": "0"})
    try:
        assert score(srv).model_version == "A"
        publish(model_dir, live, "B")
        srv.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: reloads(srv, "ok") == 1, "the model reload")
        after = score(srv)
        assert after.model_version == "B" and not after.degraded
        assert info_models(srv) == ["B"]
        assert value(scrape(srv), "fraudscore_model_loaded") == 1
        # Another SIGHUP with nothing changed loads nothing.
        srv.proc.send_signal(signal.SIGHUP)
        assert score(srv).model_version == "B"
        assert reloads(srv, "ok") == 1 and reloads(srv, "refused") == 0
    finally:
        assert srv.stop() == 0
    log = srv.log()
    assert "model reloaded" in log and '"old_model_version":"A"' in log and '"new_model_version":"B"' in log


def test_a_model_of_another_feature_set_is_refused_and_the_old_one_keeps_answering(
        tmp_path: Path, model_dir: Path) -> None:
    live = tmp_path / "model"
    publish(model_dir, live, "A")
    srv = start_server(tmp_path, model_dir=live, extra_env={"FRAUDSCORE_MODEL_RELOAD_S": "0"})
    try:
        publish(model_dir, live, "B", feature_set_version=OLD_FEATURE_SET)
        srv.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: reloads(srv, "refused") == 1, "the refusal")
        answer = score(srv)
        assert answer.model_version == "A" and not answer.degraded
        assert reloads(srv, "ok") == 0 and info_models(srv) == ["A"]
    finally:
        assert srv.stop() == 0
    log = srv.log()
    assert "model refused; the previous model stays in use" in log
    assert f"model was trained on feature set '{OLD_FEATURE_SET}' but this build computes '{FEATURE_SET_VERSION}'" \
        in log


def test_polling_picks_up_a_model_when_the_service_started_without_a_usable_one(
        tmp_path: Path, model_dir: Path) -> None:
    live = tmp_path / "model"
    publish(model_dir, live, "old", feature_set_version=OLD_FEATURE_SET)
    srv = start_server(tmp_path, model_dir=live, extra_env={"FRAUDSCORE_MODEL_RELOAD_S": "0.1"})
    try:
        before = score(srv)
        assert before.degraded and before.model_version == ""
        assert value(scrape(srv), "fraudscore_fallbacks_total", reason="model_load_failed") == 1
        assert value(scrape(srv), "fraudscore_model_loaded") == 0
        # A directory swapped in whole, as a symlink or rename deploy does.
        staged = tmp_path / "staged"
        publish(model_dir, staged, "A")
        shutil.rmtree(live)
        os.rename(staged, live)
        wait_until(lambda: score(srv).model_version == "A", "the poll to pick up A")
        answer = score(srv)
        assert not answer.degraded and answer.source == pb.MODEL
        s = scrape(srv)
        assert value(s, "fraudscore_model_loaded") == 1
        assert value(s, "fraudscore_model_reloads_total", result="ok") == 1
        assert [labels["model_version"] for labels, _ in s["fraudscore_model_info"]] == ["A"]
    finally:
        assert srv.stop() == 0
    log = srv.log()
    assert "model refused; serving from fallback rules" in log and f"'{OLD_FEATURE_SET}'" in log
    assert '"trigger":"file_changed"' in log


def test_swaps_under_concurrent_load_fail_no_call_and_every_answer_names_a_model(
        tmp_path: Path, model_dir: Path) -> None:
    live = tmp_path / "model"
    publish(model_dir, live, "A")
    srv = start_server(tmp_path, model_dir=live, extra_env={"FRAUDSCORE_MODEL_RELOAD_S": "0"})
    try:
        with BackgroundLoad(srv.target) as load:
            wait_until(lambda: len(load.answers) > 50 or bool(load.failures), "load to get going")
            for i, version in enumerate(["B", "A"] * 3, start=1):
                publish(model_dir, live, version)
                srv.proc.send_signal(signal.SIGHUP)
                wait_until(lambda i=i: reloads(srv, "ok") == i or bool(load.failures), f"reload {i}")
                seen = len(load.answers)
                wait_until(lambda v=version, n=seen: any(a.model_version == v for a in load.answers[n:])
                           or bool(load.failures), f"answers from {version}")
            assert reloads(srv, "refused") == 0
    finally:
        assert srv.stop() == 0
    assert not load.failures, load.failures
    assert {a.model_version for a in load.answers} == {"A", "B"}
    assert not [a for a in load.answers if a.degraded][:3]
    assert srv.log().count("model reloaded") == 6
