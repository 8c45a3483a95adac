"""Config: Concord's keys and defaults, durations, ${ENV} expansion, and errors that name the key."""

from __future__ import annotations

import re
from typing import Any

import pytest

from proxy.config import ConfigError, OAuthTokenEntry, parse_config, parse_duration


def entry(**fields: Any) -> dict[str, Any]:
    return {"type": "OAUTH_TOKEN", "urlPattern": "(?<baseUrl>github\\.com)/.*", "token": "t", **fields}


def with_auth(*entries: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {"github": {"appInstallation": {"auth": list(entries)}}, **top}


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("50m", 3000), ("1h", 3600), ("50 minutes", 3000), ("30 seconds", 30), ("1h30m", 5400),
     (45, 45), ("2 hours", 7200), ("500ms", 0.5)],
)  # fmt: skip
def test_durations(text: Any, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "5 fortnights", "", "m5", True])
def test_bad_durations(text: Any) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_defaults_follow_concord() -> None:
    config = parse_config(with_auth(entry()))
    oauth = config.auth[0]
    assert isinstance(oauth, OAuthTokenEntry)
    assert oauth.id == "github-oauth-token"
    assert oauth.username == "x-access-token"
    assert config.github.app_installation.http_client_timeout == 30
    assert config.github.app_installation.system_auth_cache_duration == 3000
    assert [u.host for u in config.upstreams] == ["github.com"]
    assert config.upstreams[0].url == "https://github.com"
    assert config.upstreams[0].anonymous is True
    assert (config.server.host, config.server.port) == ("127.0.0.1", 8080)


def test_type_is_case_insensitive() -> None:
    assert parse_config(with_auth(entry(type="oauth_token"))).auth[0].type == "OAUTH_TOKEN"


def test_unknown_type_is_named() -> None:
    with pytest.raises(ConfigError, match=r"auth\[0\].*'ssh_key'"):
        parse_config(with_auth(entry(type="ssh_key")))


def test_unknown_keys_are_rejected_by_name() -> None:
    with pytest.raises(ConfigError, match=r"github\.appInstallation\.auth\[0\]\.tokn: unknown key"):
        parse_config(with_auth(entry(tokn="x")))
    with pytest.raises(ConfigError, match=r"serverr: unknown key"):
        parse_config({"serverr": {}})


def test_missing_required_key_is_named() -> None:
    bad = entry()
    del bad["urlPattern"]
    with pytest.raises(ConfigError, match=r"auth\[0\]\.urlPattern: Field required"):
        parse_config(with_auth(bad))


def test_env_vars_expand(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI_BOT_TOKEN", "from-env")
    config = parse_config(with_auth(entry(token="${CI_BOT_TOKEN}", username="${BOT_USER:-bot}")))
    oauth = config.auth[0]
    assert isinstance(oauth, OAuthTokenEntry)
    assert oauth.token.get_secret_value() == "from-env"
    assert oauth.username == "bot"


def test_missing_env_var_names_key_and_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOPE_TOKEN", raising=False)
    with pytest.raises(ConfigError, match=r"auth\[0\]\.token: environment variable NOPE_TOKEN is not set"):
        parse_config(with_auth(entry(token="${NOPE_TOKEN}")))


def test_token_is_never_in_repr() -> None:
    config = parse_config(with_auth(entry(token="super-secret-value")))
    assert "super-secret-value" not in repr(config)


def test_duplicate_ids_and_hosts_are_rejected() -> None:
    with pytest.raises(ConfigError, match="duplicate auth entry id 'github-oauth-token'"):
        parse_config(with_auth(entry(), entry()))
    with pytest.raises(ConfigError, match=r"upstream host listed twice: github\.com"):
        parse_config({"upstreams": [{"host": "github.com"}, {"host": "GitHub.com"}]})


@pytest.mark.parametrize(
    ("upstream", "message"),
    [({"host": "https://github.com"}, "upstreams[0].host"), ({"host": "a/b"}, "upstreams[0].host"),
     ({"host": "ghe", "url": "ftp://ghe"}, "upstreams[0]"),
     ({"host": "ghe", "url": "https://u:p@ghe"}, "upstreams[0]")],
)  # fmt: skip
def test_bad_upstreams(upstream: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config({"upstreams": [upstream]})
    assert message in str(error.value)


def test_concord_duration_strings_are_accepted() -> None:
    config = parse_config({"github": {"appInstallation": {"httpClientTimeout": "30 seconds",
                                                          "systemAuthCacheDuration": "50 minutes"}}})  # fmt: skip
    assert config.github.app_installation.system_auth_cache_duration == 3000


def test_example_config_documents_a_valid_config(monkeypatch: pytest.MonkeyPatch) -> None:
    import pathlib

    import yaml

    monkeypatch.setenv("CI_BOT_TOKEN", "x")
    data = yaml.safe_load((pathlib.Path(__file__).parent.parent / "config.example.yaml").read_text())
    config = parse_config(data)
    assert [entry.type for entry in config.auth] == ["GITHUB_APP_INSTALLATION", "OAUTH_TOKEN"]


def test_non_loopback_bind_needs_clients_or_an_explicit_opt_out() -> None:
    with pytest.raises(ConfigError, match=r"server\.host '0\.0\.0\.0' is not a loopback address"):
        parse_config({"server": {"host": "0.0.0.0"}})
    parse_config({"server": {"host": "0.0.0.0", "allowUnauthenticated": True}})
    clients = {"clients": [{"name": "a", "token": "a-long-client-token", "repos": ["github\\.com/.*"]}]}
    parse_config({"server": {"host": "0.0.0.0"}, "access": clients})
    parse_config({"server": {"host": "::1"}})


@pytest.mark.parametrize(
    ("client", "message"),
    [({"name": "a", "repos": ["x"]}, "exactly one of token and tokenSha256"),
     ({"name": "a", "token": "short", "repos": ["x"]}, "shorter than 16"),
     ({"name": "a", "tokenSha256": "abc", "repos": ["x"]}, "64 hex digits"),
     ({"name": "a", "token": "a-long-client-token", "repos": []}, "access.clients[0].repos")],
)  # fmt: skip
def test_bad_access_clients(client: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config({"access": {"clients": [client]}})
