from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from service.runtime.config import Settings


def test_defaults_are_valid_and_documented() -> None:
    s = Settings.load(env={})
    assert (s.host, s.port, s.metrics_port) == ("127.0.0.1", 50051, 9464)
    source = Path("service/runtime/config.py").read_text()
    for f in dataclasses.fields(Settings):
        # Every setting has a docstring line right after its declaration.
        decl = source.index(f"    {f.name}: ")
        assert '"""' in source[decl:].splitlines()[1], f"{f.name} is undocumented"


def test_environment_then_flags() -> None:
    env = {"FRAUDSCORE_PORT": "6000", "FRAUDSCORE_MODEL_DIR": "/m", "FRAUDSCORE_BUDGET_MS": "20", "OTHER": "x"}
    s = Settings.load(env=env)
    assert (s.port, s.model_dir, s.budget_ms) == (6000, Path("/m"), 20.0)
    assert Settings.load(env=env, port=7000, model_dir=None).port == 7000
    assert Settings.load(env={"FRAUDSCORE_STATE_DIR": ""}).state_dir is None


def test_settings_are_frozen() -> None:
    s = Settings.load(env={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(("env", "needle"), [
    ({"FRAUDSCORE_PORT": "eighty"}, "FRAUDSCORE_PORT: expected int"),
    ({"FRAUDSCORE_PORT": "70000"}, "FRAUDSCORE_PORT: must be 0..65535"),
    ({"FRAUDSCORE_CARD_CAPACITY": "1000"}, "power of two"),
    ({"FRAUDSCORE_MAX_QUEUE": "1"}, "FRAUDSCORE_MAX_QUEUE"),
    ({"FRAUDSCORE_FAULT_INJECTION": "explode"}, "FRAUDSCORE_FAULT_INJECTION"),
    ({"FRAUDSCORE_RULES_RELOAD_S": "-1"}, "FRAUDSCORE_RULES_RELOAD_S: must be ≥ 0"),
    ({"FRAUDSCORE_MODEL_RELOAD_S": "-1"}, "FRAUDSCORE_MODEL_RELOAD_S: must be ≥ 0"),
])
def test_bad_settings_name_the_variable(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        Settings.load(env=env)


def test_id_hash_key_is_read_as_text_never_shown_and_never_empty() -> None:
    secret = "a-production-secret-0123456789"
    s = Settings.load(env={"FRAUDSCORE_ID_HASH_KEY": secret})
    assert s.id_hash_key == secret and secret not in repr(s)
    with pytest.raises(ValueError, match="FRAUDSCORE_ID_HASH_KEY is empty"):
        Settings.load(env={"FRAUDSCORE_ID_HASH_KEY": ""})


def test_an_id_hash_key_that_is_not_text_is_refused_without_quoting_it() -> None:
    raw = b"key-\xff\xfe-secret-part".decode("utf-8", "surrogateescape")  # as os.environ holds raw bytes
    with pytest.raises(ValueError) as err:
        Settings.load(env={"FRAUDSCORE_ID_HASH_KEY": raw})
    message = str(err.value)
    assert "FRAUDSCORE_ID_HASH_KEY" in message and "UTF-8" in message
    assert "secret-part" not in message and "key-" not in message


def test_the_id_hash_key_may_come_from_a_file_never_from_both(tmp_path: Path) -> None:
    secret = "a-mounted-secret-0123456789"
    key_file = tmp_path / "id-hash-key"
    key_file.write_text(secret + "\n")  # as `echo` or a Secret made from a literal leaves it
    s = Settings.load(env={"FRAUDSCORE_ID_HASH_KEY_FILE": str(key_file)})
    assert s.id_hash_key == secret and secret not in repr(s)
    assert Settings.load(env={}, id_hash_key_file=key_file).id_hash_key == secret  # the offline flag's way
    with pytest.raises(ValueError, match="both set"):
        Settings.load(env={"FRAUDSCORE_ID_HASH_KEY": secret, "FRAUDSCORE_ID_HASH_KEY_FILE": str(key_file)})
    with pytest.raises(ValueError, match="cannot read"):
        Settings.load(env={"FRAUDSCORE_ID_HASH_KEY_FILE": str(tmp_path / "absent")})
    key_file.write_bytes(b"key-\xff\xfe-secret-part")
    with pytest.raises(ValueError) as err:
        Settings.load(env={"FRAUDSCORE_ID_HASH_KEY_FILE": str(key_file)})
    assert "UTF-8" in str(err.value) and "secret-part" not in str(err.value)
    key_file.write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        Settings.load(env={"FRAUDSCORE_ID_HASH_KEY_FILE": str(key_file)})


def test_the_state_url_is_a_redis_url_from_the_environment_or_a_file_and_never_shown(tmp_path: Path) -> None:
    url = "redis://fraud:p4ssw0rd-part@redis.internal:6379/2"
    s = Settings.load(env={"FRAUDSCORE_STATE_URL": url})
    assert s.state_url == url and "p4ssw0rd" not in repr(s)
    url_file = tmp_path / "state-url"
    url_file.write_text(url + "\n")
    assert Settings.load(env={"FRAUDSCORE_STATE_URL_FILE": str(url_file)}).state_url == url
    with pytest.raises(ValueError, match="both set"):
        Settings.load(env={"FRAUDSCORE_STATE_URL": url, "FRAUDSCORE_STATE_URL_FILE": str(url_file)})
    with pytest.raises(ValueError, match="FRAUDSCORE_STATE_URL_FILE: cannot read"):
        Settings.load(env={"FRAUDSCORE_STATE_URL_FILE": str(tmp_path / "absent")})
    with pytest.raises(ValueError) as err:
        Settings.load(env={"FRAUDSCORE_STATE_URL": "http://user:p4ssw0rd-part@host/"})
    assert "FRAUDSCORE_STATE_URL: expected one of redis://, rediss://" in str(err.value) and "p4ssw0rd" not in str(err.value)
    for name in ("STATE_TTL_S", "STATE_TIMEOUT_MS"):
        with pytest.raises(ValueError, match=f"FRAUDSCORE_{name}: must be > 0"):
            Settings.load(env={f"FRAUDSCORE_{name}": "0"})


def test_a_redis_url_is_shown_without_its_password() -> None:
    from service.state.redis_store import redacted

    assert redacted("redis://fraud:secret@host:6379/2") == "redis://fraud:***@host:6379/2"
    assert redacted("rediss://:secret@host/0") == "rediss://:***@host/0"
    assert redacted("redis://host:6379/0") == "redis://host:6379/0"


def test_connection_age_maps_to_grpc_arguments() -> None:
    from service.runtime.server import server_options

    options = dict(server_options(Settings.load(env={"FRAUDSCORE_SHUTDOWN_GRACE_S": "7"})))
    assert (options["grpc.max_connection_age_ms"], options["grpc.max_connection_age_grace_ms"]) == (300_000, 7_000)
    off = dict(server_options(Settings.load(env={"FRAUDSCORE_MAX_CONNECTION_AGE_S": "0"})))
    assert "grpc.max_connection_age_ms" not in off
    with pytest.raises(ValueError, match="FRAUDSCORE_MAX_CONNECTION_AGE_S"):
        Settings.load(env={"FRAUDSCORE_MAX_CONNECTION_AGE_S": "-1"})
    with pytest.raises(ValueError, match="or ≥ 1 second"):  # 0.0004 s would round to 0 ms: "off"
        Settings.load(env={"FRAUDSCORE_MAX_CONNECTION_AGE_S": "0.0004"})
    no_drain = dict(server_options(Settings.load(env={"FRAUDSCORE_SHUTDOWN_GRACE_S": "0"})))
    assert no_drain["grpc.max_connection_age_grace_ms"] == 5_000  # calls in flight still finish
