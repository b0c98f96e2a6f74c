"""Start-up restore: a refused snapshot is moved aside (not lost to the next snapshot), and a model
trained on simulated data is warned about."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import orjson
import pytest

from core.encode import KeyHasher
from core.features import FEATURE_SET_VERSION, EntityState
from core.features.store import save_snapshot
from core.model import MANIFEST_FILE
from service.runtime.config import Settings
from service.runtime.restore import REFUSED_KEPT, SNAPSHOT_FILE, load_model, restore_state


def _settings(state_dir: Path, key: str) -> Settings:
    return Settings.load(env={"FRAUDSCORE_ID_HASH_KEY": key, "FRAUDSCORE_STATE_DIR": str(state_dir),
                              "FRAUDSCORE_CARD_CAPACITY": "64", "FRAUDSCORE_ENTITY_CAPACITY": "64"})


def _snapshot(state_dir: Path, key: str) -> bytes:
    state = EntityState.empty(card_capacity=64, merchant_capacity=64, customer_capacity=64, device_capacity=64,
                              ip_capacity=64)
    save_snapshot(state, state_dir / SNAPSHOT_FILE, feature_set_version=FEATURE_SET_VERSION,
                  hasher=KeyHasher(key.encode()))
    return (state_dir / SNAPSHOT_FILE).read_bytes()


def test_a_snapshot_refused_at_start_up_is_moved_aside_and_can_be_restored(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    old_key, new_key = "the-old-key-0123456789", "a-new-key-9876543210"
    content = _snapshot(tmp_path, old_key)
    with caplog.at_level(logging.ERROR, logger="fraudscore.app"):
        restore_state(_settings(tmp_path, new_key), KeyHasher(new_key.encode()))  # another key: refused
    assert not (tmp_path / SNAPSHOT_FILE).exists()  # the next snapshot cannot overwrite it
    (kept,) = tmp_path.glob(f"{SNAPSHOT_FILE}.refused-*")
    assert kept.read_bytes() == content
    (record,) = [r for r in caplog.records if "refused" in r.getMessage()]
    assert record.__dict__["moved_to"] == str(kept)
    # Rolled back to the old key, with the copy moved back: the state is there again.
    shutil.move(kept, tmp_path / SNAPSHOT_FILE)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fraudscore.app"):
        restore_state(_settings(tmp_path, old_key), KeyHasher(old_key.encode()))
    assert any(r.getMessage() == "state restored" for r in caplog.records)


def test_at_most_a_few_refused_copies_are_kept(tmp_path: Path) -> None:
    key = "a-new-key-9876543210"
    contents = []
    for i in range(REFUSED_KEPT + 2):
        contents.append(_snapshot(tmp_path, f"old-key-number-{i}-0123"))
        restore_state(_settings(tmp_path, key), KeyHasher(key.encode()))
    kept = sorted(tmp_path.glob(f"{SNAPSHOT_FILE}.refused-*"))
    assert len(kept) == REFUSED_KEPT
    assert {p.read_bytes() for p in kept} == set(contents[-REFUSED_KEPT:])  # the newest are kept


def test_the_copy_just_made_survives_clock_jumps_and_an_operators_backup_is_never_counted(tmp_path: Path) -> None:
    for name in ("29990101T000000Z", "29990101T000001Z", "29990101T000002Z", "backup"):
        (tmp_path / f"{SNAPSHOT_FILE}.refused-{name}").write_bytes(b"older")  # a clock once ran ahead
    key = "a-new-key-9876543210"
    content = _snapshot(tmp_path, "the-old-key-0123456789")
    restore_state(_settings(tmp_path, key), KeyHasher(key.encode()))
    names = {p.name.removeprefix(f"{SNAPSHOT_FILE}.refused-") for p in tmp_path.glob(f"{SNAPSHOT_FILE}.refused-*")}
    assert "backup" in names and len(names - {"backup"}) == REFUSED_KEPT
    (moved,) = [p for p in tmp_path.glob(f"{SNAPSHOT_FILE}.refused-*") if p.read_bytes() == content]
    assert moved.name.removeprefix(f"{SNAPSHOT_FILE}.refused-") < "2999"  # today's, kept despite the future ones


def test_a_model_trained_under_another_identifier_key_is_warned_about_never_naming_it(
        tmp_path: Path, model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    served_with_another = KeyHasher(b"the-servers-own-key-0123456789")
    for hasher, warned in ((KeyHasher(), False), (served_with_another, True)):  # the fixture trained under the default
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="fraudscore.app"):
            model, _ = load_model(model_dir, hasher)
        assert model is not None
        warnings = [r for r in caplog.records if "another identifier key" in r.getMessage()]
        assert bool(warnings) == warned and all(r.levelno == logging.WARNING for r in warnings)
        assert all(hasher.fingerprint not in r.getMessage() for r in caplog.records)
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    manifest = orjson.loads((copy / MANIFEST_FILE).read_bytes())
    del manifest["id_key"]  # a model trained before models recorded the key
    (copy / MANIFEST_FILE).write_bytes(orjson.dumps(manifest))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fraudscore.app"):
        load_model(copy, served_with_another)
    assert any("does not record which identifier key" in r.getMessage() for r in caplog.records)


def test_a_model_trained_on_simulated_data_is_warned_about(
        tmp_path: Path, model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    manifest = orjson.loads((copy / MANIFEST_FILE).read_bytes())
    for source, warned in (("an in-memory history", False), ("simulated: 10 days, seed 11", True)):
        manifest["training"]["data"]["source"] = source
        (copy / MANIFEST_FILE).write_bytes(orjson.dumps(manifest))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="fraudscore.app"):
            model, _ = load_model(copy, KeyHasher())
        assert model is not None
        assert any("simulated data" in r.getMessage() for r in caplog.records) == warned, source
