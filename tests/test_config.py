"""Config: Concord's keys and defaults, durations, ${ENV} expansion, errors that name the key, and files that are
read within bounds whatever they hold."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from proxy.config import (
    CONFIG_MAX_BYTES,
    ConfigError,
    GitHubAppEntry,
    OAuthTokenEntry,
    load_config,
    parse_config,
    parse_duration,
)
from proxy.config.files import SECRET_FILE_MAX_BYTES
from proxy.testing import pkcs1_pem


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

    monkeypatch.delenv("CI_BOT_TOKEN", raising=False)  # the static-token example is commented out: not needed
    data = yaml.safe_load((pathlib.Path(__file__).parent.parent / "config.example.yaml").read_text())
    config = parse_config(data)
    assert [entry.type for entry in config.auth] == ["GITHUB_APP_INSTALLATION"]


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


# ---------------------------------------------------------------- bounded files and YAML


def alias_bomb(levels: int) -> str:
    """The "billion laughs": each level is a list of nine aliases to the level below, 9**levels strings in all."""
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def app_entry(**fields: Any) -> dict[str, Any]:
    return {"type": "GITHUB_APP_INSTALLATION", "urlPattern": "(?<baseUrl>github\\.com)/acme/.*", "clientId": "Iv1",
            "privateKey": "/keys/acme.pem", **fields}  # fmt: skip


def config_file(tmp_path: Path, content: str | bytes) -> Path:
    path = tmp_path / "config.yaml"
    if isinstance(content, str):
        path.write_text(content)
    else:
        path.write_bytes(content)
    return path


@pytest.mark.timeout(10)  # today's loader would expand it for minutes: fail fast instead
def test_a_400_byte_billion_laughs_is_refused_before_it_expands(tmp_path: Path) -> None:
    path = config_file(tmp_path, alias_bomb(9))
    assert path.stat().st_size < 500
    with pytest.raises(ConfigError, match=r"config\.yaml: refused: more than 100,000 nodes once aliases are expanded"):
        load_config(path)


@pytest.mark.timeout(10)
def test_a_merge_key_bomb_is_refused(tmp_path: Path) -> None:
    lines = ["m0: &m0 {k: v}"] + [f"m{i}: &m{i} {{<<: [{', '.join([f'*m{i - 1}'] * 9)}]}}" for i in range(1, 9)]
    with pytest.raises(ConfigError, match="alias bomb"):
        load_config(config_file(tmp_path, "\n".join(lines)))


@pytest.mark.parametrize(
    ("text", "problem"),
    [("x: &x 1\ny: [" + ", ".join(["*x"] * 101) + "]\n", "refused: more than 100 aliases"),
     ("a: &a [1, *a]\n", "refused: alias *a is inside the node it refers to (a recursive alias)"),
     ("a: " + "[" * 200 + "]" * 200 + "\n", "refused: nested more than 64 levels deep"),
     ("a: " + "1" * 5000 + "\n", "not valid YAML: a number or date is out of range"),
     ("a: 2024-13-45\n", "not valid YAML: a number or date is out of range")],
    ids=["101 aliases", "recursive alias", "200 levels deep", "5000-digit integer", "month 13"],
)  # fmt: skip
def test_yaml_that_would_blow_up_is_refused_naming_the_problem(tmp_path: Path, text: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"config.yaml: {problem}")):
        load_config(config_file(tmp_path, text))


def test_a_few_aliases_still_work(tmp_path: Path) -> None:
    text = r"""
github:
  appInstallation:
    auth:
      - &app {id: a, urlPattern: '(?<baseUrl>github\.com)/a/.*', type: GITHUB_APP_INSTALLATION, clientId: Iv1,
              privateKey: /keys/a.pem}
      - {<<: *app, id: b, urlPattern: '(?<baseUrl>github\.com)/b/.*'}
"""
    first, second = load_config(config_file(tmp_path, text)).auth
    assert isinstance(second, GitHubAppEntry)
    assert (first.id, second.id, second.issuer) == ("a", "b", "Iv1")  # b took a's keys, and its own
    assert second.url_pattern == r"(?<baseUrl>github\.com)/b/.*"


def test_the_config_file_size_is_capped(tmp_path: Path) -> None:
    comment = "#" + "x" * 1022 + "\n"  # 1 KiB lines: a valid, empty YAML document of any size
    path = config_file(tmp_path, comment * (CONFIG_MAX_BYTES // 1024))
    assert load_config(path).auth == []  # exactly at the cap: read
    path.write_text(comment * (CONFIG_MAX_BYTES // 1024) + "#")
    with pytest.raises(ConfigError, match=r"config\.yaml: cannot read config file: larger than 1 MiB"):
        load_config(path)


def unusual_file(tmp_path: Path, kind: str) -> Path:
    """A FIFO with no writer, a character device that never ends, or a directory, at a path of our own."""
    path = tmp_path / kind
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "zero":
        path.symlink_to("/dev/zero")  # as a Secret's symlink would point somewhere
    else:
        path.mkdir()
    return path


UNUSUAL = [("fifo", "not a regular file (a FIFO)"), ("zero", "not a regular file (a character device)"),
           ("directory", "not a regular file (a directory)")]  # fmt: skip


@pytest.mark.timeout(10)  # today's loader blocks on the FIFO for ever, and reads /dev/zero until memory runs out
@pytest.mark.parametrize(("kind", "problem"), UNUSUAL)
def test_only_regular_files_are_read_and_nothing_blocks(tmp_path: Path, kind: str, problem: str) -> None:
    path = unusual_file(tmp_path, kind)
    with pytest.raises(ConfigError, match=re.escape(f"{path}: cannot read config file: {problem}")):
        load_config(path)


def test_invalid_utf8_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config\.yaml: not valid UTF-8: byte 0xff at offset 8"):
        load_config(config_file(tmp_path, b"server:\n\xff\xfe\n"))


def with_secret_file(path: Path) -> dict[str, Any]:
    return {"github": {"appInstallation": {"secretFiles": [str(path)]}}}


@pytest.mark.timeout(10)
@pytest.mark.parametrize(("kind", "problem"), UNUSUAL)
def test_secret_files_must_be_regular_files(tmp_path: Path, kind: str, problem: str) -> None:
    path = unusual_file(tmp_path, kind)
    with pytest.raises(ConfigError, match=re.escape(f"secretFiles[0] ({path}): cannot read: {problem}")):
        parse_config(with_secret_file(path))


def test_secret_files_are_capped_and_parsed_safely(tmp_path: Path) -> None:
    secret = tmp_path / "secret.json"
    fields = {"clientId": "Iv1", "urlPattern": "(?<baseUrl>github\\.com)/acme/.*", "privateKey": "/keys/acme.pem"}
    secret.write_text(json.dumps({"githubAppInstallation": fields}))
    assert parse_config(with_secret_file(secret)).auth[0].id == "secret:secret"
    secret.write_text(json.dumps({"githubAppInstallation": {**fields, "pad": " " * SECRET_FILE_MAX_BYTES}}))
    with pytest.raises(ConfigError, match=r"secret\.json\): cannot read: larger than 64 KiB"):
        parse_config(with_secret_file(secret))
    secret.write_text("[" * 30_000 + "]" * 30_000)  # under the cap, but deeper than the JSON parser can recurse
    with pytest.raises(ConfigError, match=r"secret\.json\): not valid JSON"):
        parse_config(with_secret_file(secret))
    secret.write_bytes(b"\xff{}")
    with pytest.raises(ConfigError, match=r"secret\.json\): not valid UTF-8"):
        parse_config(with_secret_file(secret))


@pytest.mark.timeout(10)
def test_the_ca_file_must_be_a_readable_regular_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"tls\.caFile: cannot read .*nope\.pem: No such file or directory"):
        parse_config({"tls": {"caFile": str(tmp_path / "nope.pem")}})
    fifo = unusual_file(tmp_path, "fifo")
    with pytest.raises(ConfigError, match=r"tls\.caFile: cannot read .*fifo: not a regular file \(a FIFO\)"):
        parse_config({"tls": {"caFile": str(fifo)}})


@pytest.mark.parametrize(("name", "level"), [("contents", "write"), ("repository_projects", "admin")])
def test_read_only_entries_cannot_ask_for_write_permissions(name: str, level: str) -> None:
    bad = app_entry(readOnly=True, permissions={"metadata": "read", name: level})
    message = f"github.appInstallation.auth[0]: readOnly is true but permissions.{name} is '{level}'"
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(with_auth(bad))
    read_only = parse_config(with_auth(app_entry(readOnly=True, permissions={"contents": "read"}))).auth[0]
    assert isinstance(read_only, GitHubAppEntry) and read_only.token_permissions == {"contents": "read"}
    writer = parse_config(with_auth(app_entry(permissions={name: level}))).auth[0]  # without readOnly: fine
    assert isinstance(writer, GitHubAppEntry) and writer.token_permissions == {name: level}


@pytest.mark.parametrize(
    ("permissions", "message"),
    [
        ({"contents": "admin"}, "'admin' is not a level GitHub allows for contents (allowed: read, write)"),
        ({"workflows": "read"}, "'read' is not a level GitHub allows for workflows (allowed: write)"),
        ({"organization_plan": "write"}, "'write' is not a level GitHub allows for organization_plan (allowed: read)"),
        ({"contentz": "read"}, "'contentz' is not a GitHub App permission; did you mean 'contents'?"),
        ({"pull-requests": "read"}, "'pull-requests' is not a GitHub App permission; did you mean 'pull_requests'?"),
    ],
)
def test_permissions_github_would_refuse_fail_at_load_naming_the_key(permissions: dict[str, str], message: str) -> None:
    """Checked against GitHub's app-permissions schema (proxy/github_permissions.py), so that a mistake is a
    start-up error rather than a 502 at the first clone."""
    with pytest.raises(ConfigError, match=re.escape(f"github.appInstallation.auth[0].permissions: {message}")):
        parse_config(with_auth(app_entry(permissions=permissions)))


@pytest.mark.parametrize("where", ["server.headerTimeout", "readiness.interval", "upstreams.url", "server.port"])
def test_a_config_error_never_echoes_a_value_from_the_environment(where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A key put where a duration belongs (by mistake, or by whoever may edit the ConfigMap) must not reach the
    log through the message that rejects it: the message names the variable instead."""
    secret = "LS0tLS1CRUdJTiBSU0EgUFJJVkFURSBLRVktLS0tLQo-not-a-duration-" + "x" * 40
    monkeypatch.setenv("ACME_KEY_B64", secret)
    ref = "${ACME_KEY_B64}"
    data: dict[str, Any] = {
        "server.headerTimeout": {"server": {"headerTimeout": ref}},
        "readiness.interval": {"readiness": {"interval": ref}},
        "upstreams.url": {"upstreams": [{"host": "github.com", "url": ref}]},
        "server.port": {"server": {"port": ref}},
    }[where]
    with pytest.raises(ConfigError) as raised:
        parse_config(data)
    assert secret[:20] not in str(raised.value)
    assert where.split(".")[0] in str(raised.value)  # still names the key to fix


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    (folder / "team.json").write_text('{"githubAppInstallation": {"clientId": "Iv2", "privateKey": "/k.pem", '
                                      '"urlPattern": "(?<baseUrl>github\\\\.com)/team/.*"}}')  # fmt: skip
    config_path = config_file(
        folder,
        "github:\n  appInstallation:\n    secretFiles: [team.json]\n    auth:\n"
        "      - id: a\n        type: github_app_installation\n        clientId: Iv1\n"
        "        urlPattern: '(?<baseUrl>github\\.com)/acme/.*'\n        privateKey: keys/a.pem\n"
        "      - id: b\n        type: github_app_installation\n        clientId: Iv1\n"
        "        urlPattern: '(?<baseUrl>github\\.com)/b/.*'\n        privateKey: /abs/b.pem\n",
    )
    monkeypatch.chdir(tmp_path)  # not the config's folder: the folder of the file decides
    config = load_config(config_path.relative_to(tmp_path))
    keys = [entry.private_key.get_secret_value() for entry in config.auth if isinstance(entry, GitHubAppEntry)]
    assert keys == [str(folder / "keys" / "a.pem"), "/abs/b.pem", "/k.pem"]
    assert config.github.app_installation.secret_files == [folder / "team.json"]


def test_an_inline_key_is_left_as_it_is(app_key: rsa.RSAPrivateKey) -> None:
    pem = pkcs1_pem(app_key)
    config = parse_config(with_auth(app_entry(privateKey=pem)), config_folder=Path("/etc"))
    (entry,) = config.auth
    assert isinstance(entry, GitHubAppEntry) and entry.private_key.get_secret_value() == pem


def test_an_empty_variable_as_a_key_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACME_KEY", "")
    with pytest.raises(ConfigError) as refused:
        parse_config(with_auth(app_entry(privateKey="${ACME_KEY}")))
    assert str(refused.value) == (
        "config: invalid configuration: github.appInstallation.auth[0].privateKey: privateKey is empty: give the "
        "path to the app's .pem, or the PEM itself (${ACME_KEY} is set but empty)"
    )


def test_a_regex_in_double_quotes_gets_the_single_quote_hint(tmp_path: Path) -> None:
    path = config_file(tmp_path, 'github:\n  appInstallation:\n    auth:\n      - urlPattern: "github\\.com"\n')
    with pytest.raises(ConfigError, match="in double quotes YAML reads backslashes itself: write patterns in single"):
        load_config(path)


def test_a_ca_file_without_a_certificate_is_refused_naming_it(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("-----BEGIN PRIVATE KEY-----\nnot a certificate\n")
    with pytest.raises(ConfigError) as refused:
        load_config(config_file(tmp_path, "tls:\n  caFile: ca.pem\n"))
    assert f"tls.caFile: {tmp_path}/ca.pem holds no PEM certificate (-----BEGIN CERTIFICATE-----)" in str(refused.value)


def test_revoke_on_shutdown_defaults_to_what_is_safe_and_refuses_a_fleet() -> None:
    redis = {"redis": {"url": "redis://127.0.0.1:6379/0", "encryptionKey": "A" * 43 + "="}}
    assert parse_config(with_auth(app_entry())).revokes_on_shutdown
    assert not parse_config({**with_auth(app_entry()), "cache": redis}).revokes_on_shutdown
    told = with_auth(app_entry())
    told["github"]["appInstallation"]["revokeOnShutdown"] = True
    with pytest.raises(ConfigError, match=re.escape("revokeOnShutdown: true with cache.redis would revoke")):
        parse_config({**told, "cache": redis})
