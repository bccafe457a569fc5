"""gpu-analytics configuration: defaults, overrides, and errors that name file, key and fix."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from analytics.config import (
    DEFAULT_UP_SELECTORS,
    ENV_OVERRIDES,
    Config,
    ConfigError,
    load_config,
    read_api_tokens,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def config_error(path: Path, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(path, env=env or {})
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_no_file_gives_the_documented_defaults() -> None:
    config = load_config(None, env={})
    assert config.prometheus.url == "http://127.0.0.1:9090"
    assert config.prometheus.timeout_seconds == 10.0
    assert config.prometheus.retries == 2
    assert config.team_label == "label_team"
    assert config.source == "exporter"
    assert config.listen_address == ("0.0.0.0", 8080)
    assert config.api_tokens == () and not config.auth_enabled
    assert config.label_prefix == ""
    assert config.up_selector == DEFAULT_UP_SELECTORS["exporter"]


def test_example_file_loads_with_defaults() -> None:
    config = load_config(REPO_ROOT / "examples" / "analytics.yaml", env={})
    assert config == Config(origin=str(REPO_ROOT / "examples" / "analytics.yaml"))


def test_full_file_is_read_and_relative_paths_follow_the_file(tmp_path: Path) -> None:
    write(tmp_path / "token", "s3cret\n")
    write(tmp_path / "tokens.txt", "# comment\n\nalpha-123\nbeta-456\n")
    path = write(
        tmp_path / "analytics.yaml",
        """
prometheus:
  url: https://prom.example:9091/prefix/
  timeout_seconds: 2.5
  retries: 0
  bearer_token_file: token
pricing_file: pricing.yaml
team_label: label_owner
source: dcgm
honor_labels: false
listen: 127.0.0.1:9999
api_tokens_file: tokens.txt
refresh_seconds: 30
""",
    )
    config = load_config(path, env={})
    assert config.prometheus.url == "https://prom.example:9091/prefix"
    assert config.prometheus.timeout_seconds == 2.5
    assert config.prometheus.retries == 0
    assert config.prometheus.bearer_token == "s3cret"
    assert config.pricing_file == tmp_path / "pricing.yaml"
    assert config.team_label == "label_owner"
    assert config.source == "dcgm"
    assert config.label_prefix == "exported_"
    assert config.up_selector == DEFAULT_UP_SELECTORS["dcgm"]
    assert config.listen_address == ("127.0.0.1", 9999)
    assert config.api_tokens == ("alpha-123", "beta-456")
    assert config.refresh_seconds == 30.0


def test_secrets_are_not_in_the_repr(tmp_path: Path) -> None:
    write(tmp_path / "pw", "hunter2-password")
    write(tmp_path / "tokens", "token-value-xyz")
    path = write(
        tmp_path / "a.yaml",
        "prometheus: {username: u, password_file: pw}\napi_tokens_file: tokens\n",
    )
    config = load_config(path, env={})
    assert config.prometheus.password == "hunter2-password"
    assert "hunter2" not in repr(config)
    assert "token-value-xyz" not in repr(config)


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "a.yaml", "prometheus:\n  url: http://from-file:9090\n")
    env = {
        "GPU_ANALYTICS_PROMETHEUS_URL": "http://from-env:9090",
        "GPU_ANALYTICS_PROMETHEUS_TIMEOUT_SECONDS": "3",
        "GPU_ANALYTICS_PROMETHEUS_RETRIES": "5",
        "GPU_ANALYTICS_SOURCE": "dcgm",
        "GPU_ANALYTICS_HONOR_LABELS": "false",
        "GPU_ANALYTICS_LISTEN": ":8181",
    }
    config = load_config(path, env=env)
    assert config.prometheus.url == "http://from-env:9090"
    assert config.prometheus.timeout_seconds == 3.0
    assert config.prometheus.retries == 5
    assert config.source == "dcgm"
    assert config.honor_labels is False
    assert config.listen_address == ("0.0.0.0", 8181)


def test_every_scalar_key_has_an_environment_variable() -> None:
    assert ENV_OVERRIDES["prometheus.url"] == "GPU_ANALYTICS_PROMETHEUS_URL"
    assert ENV_OVERRIDES["api_tokens_file"] == "GPU_ANALYTICS_API_TOKENS_FILE"
    assert "prometheus" not in ENV_OVERRIDES


def test_unknown_key_names_file_path_and_suggests_the_right_one(tmp_path: Path) -> None:
    path = write(tmp_path / "a.yaml", "prometheus:\n  urll: http://x:9090\n")
    message = config_error(path)
    assert message.startswith(f"{path}: prometheus.urll: unknown key")
    assert "did you mean 'url'" in message


def test_unknown_top_level_key(tmp_path: Path) -> None:
    message = config_error(write(tmp_path / "a.yaml", "team_lable: x\n"))
    assert "team_lable: unknown key" in message and "did you mean 'team_label'" in message


@pytest.mark.parametrize(
    ("text", "key", "fix"),
    [
        ("prometheus: {timeout_seconds: abc}", "prometheus.timeout_seconds", "write digits"),
        ("prometheus: {timeout_seconds: 0}", "prometheus.timeout_seconds", "> 0"),
        ("prometheus: {retries: -1}", "prometheus.retries", ">= 0"),
        ("prometheus: {retries: 1.5}", "prometheus.retries", "drop the fraction"),
        ("prometheus: {url: 'prometheus:9090'}", "prometheus.url", "http://prometheus:9090"),
        ("prometheus: {url: 'ftp://x'}", "prometheus.url", "http://prometheus:9090"),
        ("prometheus: {url: 'http://u:p@x:9090'}", "prometheus.url", "password_file"),
        ("prometheus: {url: 'http://x:99999'}", "prometheus.url", "http://prometheus:9090"),
        ("prometheus: [a, b]", "prometheus", "key: value"),
        ("source: nvml", "source", "exporter, dcgm"),
        ("honor_labels: maybe", "honor_labels", "true or false"),
        ("team_label: 'team name'", "team_label", "label_team"),
        ("listen: localhost", "listen", "HOST:PORT"),
        ("refresh_seconds: -5", "refresh_seconds", "> 0"),
        ("prometheus: {username: u}", "prometheus.password_file", "set prometheus.password_file"),
    ],
)
def test_wrong_values_name_file_key_and_fix(tmp_path: Path, text: str, key: str, fix: str) -> None:
    path = write(tmp_path / "a.yaml", text + "\n")
    message = config_error(path)
    assert message.startswith(f"{path}: {key}: "), message
    assert fix in message


def test_bearer_and_basic_auth_together_are_rejected(tmp_path: Path) -> None:
    write(tmp_path / "t", "x")
    path = write(
        tmp_path / "a.yaml",
        "prometheus: {bearer_token_file: t, username: u, password_file: t}\n",
    )
    assert "not both" in config_error(path)


def test_unreadable_prometheus_secret_fails_start_up(tmp_path: Path) -> None:
    path = write(tmp_path / "a.yaml", "prometheus: {bearer_token_file: missing-token}\n")
    message = config_error(path)
    assert "prometheus.bearer_token_file: cannot read" in message
    assert "missing-token" in message


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    message = config_error(write(tmp_path / "a.yaml", "prometheus:\n  url: [unclosed\n"))
    assert message.startswith(f"{tmp_path / 'a.yaml'}: not valid YAML at line")


def test_missing_config_file(tmp_path: Path) -> None:
    message = config_error(tmp_path / "nope.yaml")
    assert "nope.yaml" in message and "cannot read" in message


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    assert "expected a mapping" in config_error(write(tmp_path / "a.yaml", "- a\n- b\n"))


def test_bad_environment_value_names_the_variable(tmp_path: Path) -> None:
    path = write(tmp_path / "a.yaml", "{}\n")
    message = config_error(path, env={"GPU_ANALYTICS_PROMETHEUS_RETRIES": "many"})
    assert message.startswith("environment variable GPU_ANALYTICS_PROMETHEUS_RETRIES: ")
    assert "prometheus.retries" in message


# --- API tokens: fail closed ------------------------------------------------------------------


def test_tokens_file_as_yaml_list(tmp_path: Path) -> None:
    path = write(tmp_path / "tokens.yaml", "- alpha-1\n- 'beta-2'\n- alpha-1\n")
    assert read_api_tokens(path) == ("alpha-1", "beta-2")


def test_tokens_file_with_a_non_string_yaml_item_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path / "tokens.yaml", "- 12345\n")
    with pytest.raises(ConfigError, match="quote tokens"):
        read_api_tokens(path)


@pytest.mark.parametrize("content", ["", "\n\n", "# only a comment\n"])
def test_empty_tokens_file_is_an_error_not_no_auth(tmp_path: Path, content: str) -> None:
    write(tmp_path / "tokens", content)
    path = write(tmp_path / "a.yaml", "api_tokens_file: tokens\n")
    message = config_error(path)
    assert message.startswith(f"{path}: api_tokens_file: ")
    assert "remove api_tokens_file" in message or "put the secret" in message


def test_unreadable_tokens_file_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path / "a.yaml", "api_tokens_file: /nonexistent/tokens\n")
    message = config_error(path)
    assert "api_tokens_file: cannot read /nonexistent/tokens" in message
    assert "mount the file" in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files regardless of permissions")
def test_tokens_file_without_permission_is_an_error(tmp_path: Path) -> None:
    tokens = write(tmp_path / "tokens", "abc\n")
    tokens.chmod(0)
    path = write(tmp_path / "a.yaml", "api_tokens_file: tokens\n")
    assert "Permission denied" in config_error(path)


def test_token_with_spaces_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path / "tokens", "two words\n")
    with pytest.raises(ConfigError, match="printable ASCII"):
        read_api_tokens(path)


# --- the console script -----------------------------------------------------------------------


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "analytics.main", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        env={**os.environ, **(env or {})},
    )


def test_cli_with_a_broken_config_prints_one_line_and_exits_2(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.yaml", "prometheus:\n  timeout_seconds: soon\n")
    result = run_cli("--config", str(path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(path) in lines[0] and "prometheus.timeout_seconds" in lines[0]
    assert "write digits" in lines[0]


def test_cli_with_an_empty_tokens_file_exits_2(tmp_path: Path) -> None:
    write(tmp_path / "tokens", "")
    path = write(tmp_path / "a.yaml", "api_tokens_file: tokens\n")
    result = run_cli("--config", str(path))
    assert result.returncode == 2
    assert "api_tokens_file" in result.stderr and "Traceback" not in result.stderr
