"""config.json is validated by one schema; bad keys and values are rejected by name."""

import json

import pytest

from common.config import (
    DEFAULT_CONFIG_PATH,
    ConfigError,
    ServiceConfig,
    SessionSettings,
    load_config,
    load_config_or_report,
    validate_session_settings,
)


def test_repo_config_is_valid_and_matches_schema_defaults():
    cfg = load_config(DEFAULT_CONFIG_PATH)
    assert cfg.model.preset == "tiny"
    assert cfg.service.gateway_port == 8006
    assert cfg.service.worker_base_port == 22400
    assert json.loads(DEFAULT_CONFIG_PATH.read_text()).keys() == ServiceConfig().model_dump().keys()


def test_unknown_key_is_rejected_by_name(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"model": {"presett": "tiny"}}))
    with pytest.raises(ConfigError, match=r"model\.presett"):
        load_config(p)


@pytest.mark.parametrize(
    "override, key",
    [
        ("service.gateway_port=70000", "service.gateway_port"),
        ("compile.mode=fastest", "compile.mode"),
        ("model.preset=huge", "model.preset"),
        ("duplex.sliding_low_tokens=5000", "duplex.sliding_low_tokens"),
    ],
)
def test_bad_values_are_rejected_by_name(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(DEFAULT_CONFIG_PATH, [override])


def test_overrides_apply_dotted_keys():
    cfg = load_config(DEFAULT_CONFIG_PATH, ["model.dtype=bfloat16", "service.compile=false"])
    assert cfg.model.dtype == "bfloat16"
    assert cfg.service.compile is False


def test_missing_file_named():
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/config.json")


def test_session_settings_ignore_unknown_and_name_bad_key():
    base = SessionSettings()
    s = validate_session_settings(base, {"max_kv_tokens_unknown": 1, "temperature": 0.3})
    assert s.temperature == 0.3
    with pytest.raises(ConfigError, match="top_p"):
        validate_session_settings(base, {"top_p": 3})
    with pytest.raises(ConfigError, match="decode_mode"):
        validate_session_settings(base, {"decode_mode": "beam"})
    # defaults untouched: nothing leaks
    assert base.temperature == 0.7


def test_entry_points_report_a_bad_config_by_program_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert load_config_or_report(None, ["model.preset=bogus"], "worker") is None
    message = capsys.readouterr().err
    assert message.startswith("worker: invalid configuration") and "model.preset" in message
    assert load_config_or_report(None, ["model.preset=tiny"], "worker").model.preset == "tiny"
