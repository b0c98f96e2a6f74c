"""A model trained on simulated data is making decisions: the server says so, at start-up and
when such a model is reloaded (a real server, a real model directory, SIGHUP)."""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

import orjson
import pytest

from core.model import MANIFEST_FILE
from tests.conftest import start_server

pytestmark = pytest.mark.e2e
WARNING = "trained on simulated data"


def _set_source(model: Path, source: str) -> None:
    manifest = orjson.loads((model / MANIFEST_FILE).read_bytes())
    manifest["training"]["data"]["source"] = source
    staged = model / "manifest.json.new"
    staged.write_bytes(orjson.dumps(manifest))
    staged.replace(model / MANIFEST_FILE)


def test_a_simulator_trained_model_is_warned_about_at_start_up_and_on_reload(tmp_path: Path, model_dir: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    _set_source(model, "transactions.parquet (real history)")
    srv = start_server(tmp_path, model_dir=model, extra_env={"FRAUDSCORE_MODEL_RELOAD_S": "0"})
    try:
        assert WARNING not in srv.log()
        _set_source(model, "simulated: 10 days, 800 cards, seed 11")
        srv.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 60
        while "model reloaded" not in srv.log():
            assert time.monotonic() < deadline, srv.log()
            time.sleep(0.1)
        lines = [orjson.loads(line) for line in srv.log().splitlines() if WARNING in line]
        assert [(e["level"], e["when"]) for e in lines] == [("WARNING", "reload")]
    finally:
        assert srv.stop() == 0
    srv = start_server(tmp_path, model_dir=model)
    try:
        assert any('"when":"start-up"' in line for line in srv.log().splitlines() if WARNING in line)
    finally:
        srv.stop()
