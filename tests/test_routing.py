"""Routing: Concord's urlPattern semantics, strict path parsing, and the git-only endpoint list."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.config import ConfigError, parse_config
from proxy.errors import (
    AnonymousRefused,
    BadRequestPath,
    HostNotAllowed,
    MethodNotAllowed,
    NotAGitEndpoint,
)
from proxy.routing import REMEMBERED_TARGET, RESOLVED_ROUTES, Router, Service, translate_java_regex

INFO_REFS = "service=git-upload-pack"


def make_router(*patterns: str, upstreams: list[dict[str, Any]] | None = None) -> Router:
    config = parse_config(
        {
            "upstreams": upstreams or [{"host": "github.com"}, {"host": "git.company.local"}],
            "github": {
                "appInstallation": {
                    "auth": [
                        {"id": f"e{i}", "type": "OAUTH_TOKEN", "urlPattern": p, "token": f"t{i}"}
                        for i, p in enumerate(patterns)
                    ]
                }
            },
        }
    )
    return Router(config.upstreams, config.auth)


@pytest.mark.parametrize(
    ("java", "python"),
    [
        ("(?<baseUrl>github.com)/.*", "(?P<baseUrl>github.com)/.*"),
        ("(?<=x)(?<baseUrl>a)", "(?<=x)(?P<baseUrl>a)"),
        ("(?<!x)(?<baseUrl>a)(?<!y)", "(?<!x)(?P<baseUrl>a)(?<!y)"),
        (r"\(?<baseUrl>", r"\(?<baseUrl>"),  # an escaped parenthesis is not a group
        (r"\\(?<baseUrl>a)", r"\\(?P<baseUrl>a)"),  # an escaped backslash, then a real group
        ("(?P<baseUrl>a)", "(?P<baseUrl>a)"),  # already Python syntax
    ],
)
def test_java_named_groups_translate_and_lookbehinds_stay(java: str, python: str) -> None:
    assert translate_java_regex(java) == python


@pytest.mark.parametrize("pattern", [r"(?<baseUrl>github\.com)/(?<!evil/)acme/.*", r"(?<baseUrl>github\.com)/(a)\1"])
def test_patterns_the_linear_engine_cannot_take_are_refused_at_load(pattern: str) -> None:
    with pytest.raises(ConfigError, match=r"urlPattern .* does not compile: .*RE2: no lookarounds or backreferences"):
        make_router(pattern)


def test_first_matching_entry_wins_even_if_a_later_one_is_more_specific() -> None:
    router = make_router(r"(?<baseUrl>github\.com)/acme/.*", r"(?<baseUrl>github\.com)/acme/special.*")
    route = router.resolve_route("GET", "/github.com/acme/special.git/info/refs", INFO_REFS)
    assert route.entry is not None and route.entry.id == "e0"


def test_no_fallback_to_next_entry_and_no_match_means_anonymous() -> None:
    router = make_router(r"(?<baseUrl>github\.com)/acme/.*")
    route = router.resolve_route("GET", "/github.com/other/x/info/refs", INFO_REFS)
    assert route.entry is None
    assert route.repo.full_name == "other/x"


def test_matching_is_case_insensitive_like_github() -> None:
    router = make_router(r"(?<baseUrl>github\.com)/acme/.*")
    route = router.resolve_route("GET", "/GitHub.com/ACME/Repo.git/info/refs", INFO_REFS)
    assert route.entry is not None
    assert route.repo.full_name == "ACME/Repo"


def test_pattern_is_a_prefix_match() -> None:
    router = make_router(r"(?<baseUrl>github\.com)/acme")
    route = router.resolve_route("GET", "/github.com/acme/anything.git/info/refs", INFO_REFS)
    assert route.entry is not None


def test_path_prefix_in_base_url_sets_where_owner_and_repo_start() -> None:
    router = make_router(r"(?<baseUrl>git\.company\.local/proxypath)/.*")
    route = router.resolve_route("POST", "/git.company.local/proxypath/team/tool.git/git-upload-pack", "")
    assert route.entry is not None
    assert (route.repo.owner, route.repo.name) == ("team", "tool")
    assert route.url == "https://git.company.local/proxypath/team/tool.git/git-upload-pack"


def test_unescaped_dot_cannot_reach_a_host_that_is_not_an_upstream() -> None:
    router = make_router("(?<baseUrl>github.com)/.*")  # Concord's docs leave the dot unescaped
    with pytest.raises(HostNotAllowed):
        router.resolve_route("GET", "/githubxcom/acme/x/info/refs", INFO_REFS)


@pytest.mark.parametrize("pattern", ["github\\.com/acme/.*", "(?<base>github\\.com)/.*"])
def test_pattern_without_base_url_group_is_rejected_naming_entry_and_pattern(pattern: str) -> None:
    with pytest.raises(ConfigError) as error:
        make_router(pattern)
    assert "'e0'" in str(error.value) and pattern in str(error.value) and "baseUrl" in str(error.value)


def test_pattern_that_does_not_compile_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"'e0'.*does not compile"):
        make_router("(?<baseUrl>github\\.com/(unclosed")


@pytest.mark.parametrize(
    ("method", "path", "query", "service", "upstream_url"),
    [
        ("GET", "/github.com/o/r.git/info/refs", "service=git-upload-pack", Service.UPLOAD_PACK,
         "https://github.com/o/r.git/info/refs?service=git-upload-pack"),
        ("GET", "/github.com/o/r/info/refs", "service=git-receive-pack", Service.RECEIVE_PACK,
         "https://github.com/o/r/info/refs?service=git-receive-pack"),
        ("POST", "/github.com/o/r.git/git-upload-pack", "", Service.UPLOAD_PACK,
         "https://github.com/o/r.git/git-upload-pack"),
        ("POST", "/github.com/o/r.git/git-receive-pack", "ignored=1", Service.RECEIVE_PACK,
         "https://github.com/o/r.git/git-receive-pack"),
        ("POST", "/github.com/o/r.git/info/lfs/objects/batch", "", Service.LFS,
         "https://github.com/o/r.git/info/lfs/objects/batch"),
        ("GET", "/github.com/o/r.git/info/lfs/locks", "path=a.bin", Service.LFS,
         "https://github.com/o/r.git/info/lfs/locks?path=a.bin"),
        ("POST", "/github.com/o/r.git/info/lfs/locks/verify", "", Service.LFS,
         "https://github.com/o/r.git/info/lfs/locks/verify"),
        ("POST", "/github.com/o/r.git/info/lfs/locks/17/unlock", "", Service.LFS,
         "https://github.com/o/r.git/info/lfs/locks/17/unlock"),
        # A repo called "info" or "refs" is still a repo.
        ("GET", "/github.com/info/refs/info/refs", "service=git-upload-pack", Service.UPLOAD_PACK,
         "https://github.com/info/refs/info/refs?service=git-upload-pack"),
    ],
)  # fmt: skip
def test_git_endpoints_are_routed(method: str, path: str, query: str, service: Service, upstream_url: str) -> None:
    route = make_router().resolve_route(method, path, query)
    assert route.service is service
    assert route.url == upstream_url


@pytest.mark.parametrize(
    ("method", "path", "query", "error"),
    [
        ("GET", "/github.com/o/r.git/info/refs", "", NotAGitEndpoint),  # dumb HTTP
        ("GET", "/github.com/o/r.git/info/refs", "service=git-upload-archive", NotAGitEndpoint),
        ("GET", "/github.com/o/r.git/HEAD", "", NotAGitEndpoint),
        ("GET", "/github.com/o/r.git/objects/info/packs", "", NotAGitEndpoint),
        ("GET", "/github.com/repos/o/r/contents/x", "", NotAGitEndpoint),
        ("GET", "/github.com/user", "", NotAGitEndpoint),
        ("GET", "/github.com/o/r.git/git-upload-pack", "", MethodNotAllowed),
        ("POST", "/github.com/o/r.git/info/refs", "service=git-upload-pack", MethodNotAllowed),
        ("GET", "/github.com/r.git/info/refs", "service=git-upload-pack", NotAGitEndpoint),  # no owner
        ("GET", "/evil.example/o/r/info/refs", "service=git-upload-pack", HostNotAllowed),
        ("GET", "/127.0.0.1:8080/o/r/info/refs", "service=git-upload-pack", HostNotAllowed),
        ("GET", "/localhost/o/r/info/refs", "service=git-upload-pack", HostNotAllowed),
        ("GET", "/github.com@evil/o/r/info/refs", "service=git-upload-pack", BadRequestPath),
        ("GET", "/github.com/../evil/o/r/info/refs", "service=git-upload-pack", BadRequestPath),
        ("GET", "/github.com/%2e%2e/o/r/info/refs", "service=git-upload-pack", BadRequestPath),
        ("GET", "/github.com%3A1/o/r/info/refs", "service=git-upload-pack", BadRequestPath),
        ("GET", "//evil/o/r/info/refs", "service=git-upload-pack", BadRequestPath),
        ("GET", "/github.com//o/r/info/refs", "service=git-upload-pack", BadRequestPath),
        ("GET", "/github.com/o/./r/info/refs", "service=git-upload-pack", BadRequestPath),
        ("GET", "http://github.com/o/r/info/refs", "service=git-upload-pack", BadRequestPath),
        ("GET", "/github.com/o/r\\x/info/refs", "service=git-upload-pack", BadRequestPath),
        ("GET", "/github.com/o/..git/info/refs", "service=git-upload-pack", BadRequestPath),
        ("GET", "/github.com/o/.git/info/refs", "service=git-upload-pack", BadRequestPath),
        ("GET", "/github.com/" + "a/" * 1100 + "info/refs", "service=git-upload-pack", BadRequestPath),
    ],
)
def test_everything_else_is_refused(method: str, path: str, query: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        make_router().resolve_route(method, path, query)


def test_an_entry_only_covers_exactly_owner_and_repo() -> None:
    router = make_router(r"(?<baseUrl>github\.com)/acme/.*")
    with pytest.raises(BadRequestPath, match="expected <owner>/<repo> after the baseUrl of auth entry 'e0'"):
        router.resolve_route("GET", "/github.com/acme/x/y/z/info/refs", INFO_REFS)


def test_dot_github_repos_are_fine() -> None:
    route = make_router().resolve_route("GET", "/github.com/acme/.github/info/refs", INFO_REFS)
    assert route.repo.name == ".github"


def test_anonymous_false_refuses_repos_no_entry_matches() -> None:
    router = make_router(r"(?<baseUrl>github\.com)/acme/.*", upstreams=[{"host": "github.com", "anonymous": False}])
    assert router.resolve_route("GET", "/github.com/acme/x/info/refs", INFO_REFS).entry is not None
    with pytest.raises(AnonymousRefused):
        router.resolve_route("GET", "/github.com/public/x/info/refs", INFO_REFS)


def test_upstream_url_with_port_and_path() -> None:
    router = make_router(upstreams=[{"host": "ghe.local:8443", "url": "http://10.0.0.5:8080/git"}])
    route = router.resolve_route("GET", "/ghe.local:8443/o/r.git/info/refs", INFO_REFS)
    assert route.url == "http://10.0.0.5:8080/git/o/r.git/info/refs?service=git-upload-pack"
    assert str(route.repo) == "ghe.local:8443/o/r"


@pytest.mark.parametrize(
    ("path", "says"),
    [("/acme/app.git/info/refs", ["host 'acme' is not an allowed upstream", "(configured: github.com, "
      "git.company.local)", "paths start with the host, /github.com/<owner>/<repo>.git",
      'url."http://<this proxy>/github.com/".insteadOf "https://github.com/"']),
     ("/github.comacme/app.git/info/refs", ["host 'github.comacme'", "a slash is missing after 'github.com': the "
      "insteadOf URL must end with '/github.com/'"]),
     ("/evil.example/a/b/info/refs", ["host 'evil.example' is not an allowed upstream"])],
)  # fmt: skip
def test_a_path_with_the_wrong_host_says_so_even_when_its_endpoint_looks_wrong(path: str, says: list[str]) -> None:
    """Before, `/acme/app.git/info/refs` was "only git smart-HTTP endpoints are proxied": it *was* info/refs."""
    with pytest.raises(HostNotAllowed) as refused:
        make_router().resolve_route("GET", path, INFO_REFS)
    for text in says:
        assert text in str(refused.value)


def test_a_known_host_with_a_wrong_endpoint_is_still_an_endpoint_error() -> None:
    with pytest.raises(NotAGitEndpoint):
        make_router().resolve_route("GET", "/github.com/acme/app/blob/main/README.md", "")


def test_an_empty_segment_names_the_insteadof_rule() -> None:
    with pytest.raises(BadRequestPath, match="empty path segment \\(//\\): both URLs of an insteadOf rule"):
        make_router().resolve_route("GET", "/github.com//acme/app/info/refs", INFO_REFS)


def test_routes_found_are_remembered_a_bounded_number() -> None:
    router = make_router(r"(?<baseUrl>github\.com)/acme/.*")
    first = router.resolve_route("GET", "/github.com/acme/app.git/info/refs", INFO_REFS)
    assert router.resolve_route("GET", "/github.com/acme/app.git/info/refs", INFO_REFS) is first
    for number in range(RESOLVED_ROUTES):
        router.resolve_route("POST", f"/github.com/acme/repo-{number}.git/git-upload-pack", "")
    again = router.resolve_route("GET", "/github.com/acme/app.git/info/refs", INFO_REFS)
    assert again is not first  # the oldest went out when the table was full...
    assert again == first  # ...and the same request finds the same route again


def test_a_long_target_is_resolved_every_time_rather_than_remembered() -> None:
    router = make_router(r"(?<baseUrl>github\.com)/acme/.*")
    query = "path=" + "a" * REMEMBERED_TARGET  # an LFS lock listing may carry a query of kilobytes
    first = router.resolve_route("GET", "/github.com/acme/app.git/info/lfs/locks", query)
    again = router.resolve_route("GET", "/github.com/acme/app.git/info/lfs/locks", query)
    assert again == first and again is not first
