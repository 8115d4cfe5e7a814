from __future__ import annotations

from pathlib import Path

import pytest

from revenge_ws.config import env_names, load_settings
from revenge_ws.exceptions import ConfigError

from .helpers import SECRET


def test_defaults() -> None:
    s = load_settings(environ={"REVENGE_JWT_SECRET": SECRET})
    assert (s.server.host, s.server.port) == ("127.0.0.1", 8080)
    assert s.broker.url == "memory://" and s.store.url.startswith("sqlite:///")
    assert s.limits.message_size == 65536 and s.limits.connections_per_user == 10
    assert s.limits.channels_per_connection == 128 and s.limits.outbound_queue_bytes == 1 << 20
    assert (s.heartbeat.interval, s.heartbeat.timeout) == (30, 90)
    assert s.node_id  # generated


def test_contract_names_exist() -> None:
    names = env_names()
    for name in [
        "REVENGE_SERVER_HOST",
        "REVENGE_SERVER_PORT",
        "REVENGE_JWT_SECRET",
        "REVENGE_JWT_PUBLIC_KEY_FILE",
        "REVENGE_JWT_ALGORITHM",
        "REVENGE_JWT_AUDIENCE",
        "REVENGE_JWT_ISSUER",
        "REVENGE_API_KEYS",
        "REVENGE_ALLOWED_ORIGINS",
        "REVENGE_BROKER_URL",
        "REVENGE_STORE_URL",
        "REVENGE_NODE_ID",
        "REVENGE_DEBUG_ECHO",
    ]:
        assert name in names, name


def test_yaml_and_env_env_wins(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "server:\n  port: 9000\n  host: 127.0.0.2\nlimits:\n  connections_per_user: 3\n"
        "history:\n  families:\n    transcode: {size: 5, ttl: 60}\n"
    )
    s = load_settings(
        cfg,
        environ={
            "REVENGE_JWT_SECRET": SECRET,
            "REVENGE_SERVER_PORT": "9100",
            "REVENGE_API_KEYS": "a, b,,",
            "REVENGE_ALLOWED_ORIGINS": "https://x.example",
            "REVENGE_JWT_AUDIENCE": "",
            "REVENGE_SOMETHING_ELSE": "ignored",
        },
    )
    assert (s.server.host, s.server.port) == ("127.0.0.2", 9100)
    assert s.limits.connections_per_user == 3
    assert [k.get_secret_value() for k in s.api.keys] == ["a", "b"]
    assert s.allowed_origins == ["https://x.example"]
    assert s.jwt.audience is None
    assert s.history_for("transcode").size == 5 and s.history_for("nope").size == 100
    assert "a" not in repr(s.api.keys)  # secrets never print


def test_config_file_from_env(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("node:\n  id: n7\n")
    s = load_settings(environ={"REVENGE_JWT_SECRET": SECRET, "REVENGE_CONFIG": str(cfg)})
    assert s.node_id == "n7"


@pytest.mark.parametrize(
    ("env", "yaml_text", "message"),
    [
        ({"REVENGE_SERVER_PORT": "http"}, None, "server.port (REVENGE_SERVER_PORT)"),
        ({"REVENGE_SERVER_PORT": "70000"}, None, "server.port"),
        ({"REVENGE_LIMITS_MESSAGE_SIZE": "10"}, None, "limits.message_size"),
        ({"REVENGE_HEARTBEAT_TIMEOUT": "10"}, None, "heartbeat.timeout must be longer"),
        ({"REVENGE_JWT_ALGORITHM": "none"}, None, "not supported"),
        ({}, "servr:\n  port: 1\n", "unknown setting servr"),
        ({}, "server:\n  prot: 1\n", "unknown setting server.prot"),
        ({}, "- a\n- b\n", "must hold a mapping"),
        ({}, "a: [\n", "cannot read config file"),
        ({"REVENGE_JWT_SECRET": ""}, None, "REVENGE_JWT_SECRET (jwt.secret) is not set"),
        ({"REVENGE_JWT_SECRET": "x" * 31}, None, "at least 32 bytes"),
        ({"REVENGE_JWT_ALGORITHM": "RS256"}, None, "REVENGE_JWT_PUBLIC_KEY_FILE"),
        (
            {"REVENGE_JWT_ALGORITHM": "RS256", "REVENGE_JWT_PUBLIC_KEY_FILE": "/nonexistent.pem"},
            None,
            "no file /nonexistent.pem",
        ),
        ({"REVENGE_JWT_PUBLIC_KEY_FILE": "/x.pem"}, None, "exactly one family"),
    ],
)
def test_errors_name_the_key(
    tmp_path: Path, env: dict[str, str], yaml_text: str | None, message: str
) -> None:
    cfg = None
    if yaml_text is not None:
        cfg = tmp_path / "c.yaml"
        cfg.write_text(yaml_text)
    full = {"REVENGE_JWT_SECRET": SECRET, **env}
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, environ=full)
    assert message in str(info.value)
    assert SECRET not in str(info.value)


def test_missing_config_file() -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings("/nonexistent/revenge.yaml", environ={"REVENGE_JWT_SECRET": SECRET})
