"""Objects shaped as GitHub's REST API sends them, for the fake's answers: as large and as full as the real ones."""

from __future__ import annotations

from typing import Any

_API = "https://api.github.com"


def account_object(login: str, account_id: int, account_type: str = "Organization") -> dict[str, Any]:
    """GitHub's `simple-user`, as it appears as a repository's `owner`."""
    url = f"{_API}/users/{login}"
    return {
        "login": login, "id": account_id, "node_id": f"MDEyOk9yZ2FuaXphdGlvbn{account_id}",
        "avatar_url": f"https://avatars.githubusercontent.com/u/{account_id}?v=4", "gravatar_id": "", "url": url,
        "html_url": f"https://github.com/{login}", "followers_url": f"{url}/followers",
        "following_url": f"{url}/following{{/other_user}}", "gists_url": f"{url}/gists{{/gist_id}}",
        "starred_url": f"{url}/starred{{/owner}}{{/repo}}", "subscriptions_url": f"{url}/subscriptions",
        "organizations_url": f"{url}/orgs", "repos_url": f"{url}/repos", "events_url": f"{url}/events{{/privacy}}",
        "received_events_url": f"{url}/received_events", "type": account_type, "site_admin": False,
        "user_view_type": "public",
    }  # fmt: skip


def repository_object(full_name: str, repo_id: int, owner_id: int = 1) -> dict[str, Any]:
    """GitHub's full `repository` object, the kind a mint answer lists for every selected repository (GitHub's
    documented example is 5.6 KiB: a mint answer for a few hundred repositories is megabytes)."""
    owner, name = full_name.split("/", 1)
    url = f"{_API}/repos/{full_name}"
    html = f"https://github.com/{full_name}"
    stamp = "2011-01-26T19:01:12Z"
    return {
        "id": repo_id, "node_id": f"MDEwOlJlcG9zaXRvcnkx{repo_id}", "name": name, "full_name": full_name,
        "license": {"key": "mit", "name": "MIT License", "url": f"{_API}/licenses/mit", "spdx_id": "MIT",
                    "node_id": "MDc6TGljZW5zZW1pdA==", "html_url": f"{_API}/licenses/mit"},
        "forks": 9, "permissions": {"admin": False, "pull": True, "triage": True, "push": False, "maintain": False},
        "owner": account_object(owner, owner_id), "private": True, "html_url": html,
        "description": "This your first repo!", "fork": False, "url": url,
        "archive_url": f"{url}/{{archive_format}}{{/ref}}", "assignees_url": f"{url}/assignees{{/user}}",
        "blobs_url": f"{url}/git/blobs{{/sha}}", "branches_url": f"{url}/branches{{/branch}}",
        "collaborators_url": f"{url}/collaborators{{/collaborator}}", "comments_url": f"{url}/comments{{/number}}",
        "commits_url": f"{url}/commits{{/sha}}", "compare_url": f"{url}/compare/{{base}}...{{head}}",
        "contents_url": f"{url}/contents/{{+path}}", "contributors_url": f"{url}/contributors",
        "deployments_url": f"{url}/deployments", "downloads_url": f"{url}/downloads", "events_url": f"{url}/events",
        "forks_url": f"{url}/forks", "git_commits_url": f"{url}/git/commits{{/sha}}",
        "git_refs_url": f"{url}/git/refs{{/sha}}", "git_tags_url": f"{url}/git/tags{{/sha}}",
        "git_url": f"git:github.com/{full_name}.git", "issue_comment_url": f"{url}/issues/comments{{/number}}",
        "issue_events_url": f"{url}/issues/events{{/number}}", "issues_url": f"{url}/issues{{/number}}",
        "keys_url": f"{url}/keys{{/key_id}}", "labels_url": f"{url}/labels{{/name}}",
        "languages_url": f"{url}/languages", "merges_url": f"{url}/merges",
        "milestones_url": f"{url}/milestones{{/number}}",
        "notifications_url": f"{url}/notifications{{?since,all,participating}}",
        "pulls_url": f"{url}/pulls{{/number}}", "releases_url": f"{url}/releases{{/id}}",
        "ssh_url": f"git@github.com:{full_name}.git", "stargazers_url": f"{url}/stargazers",
        "statuses_url": f"{url}/statuses/{{sha}}", "subscribers_url": f"{url}/subscribers",
        "subscription_url": f"{url}/subscription", "tags_url": f"{url}/tags", "teams_url": f"{url}/teams",
        "trees_url": f"{url}/git/trees{{/sha}}", "clone_url": f"{html}.git",
        "mirror_url": f"git:git.example.com/{full_name}", "hooks_url": f"{url}/hooks",
        "svn_url": f"https://svn.github.com/{full_name}", "homepage": "https://github.com",
        "language": None, "forks_count": 9, "stargazers_count": 80, "watchers_count": 80, "size": 108,
        "default_branch": "main", "open_issues_count": 0, "is_template": False,
        "topics": ["octocat", "atom", "electron", "api"], "has_issues": True, "has_projects": True,
        "has_wiki": True, "has_pages": False, "has_downloads": True, "has_discussions": False, "archived": False,
        "disabled": False, "visibility": "private", "pushed_at": stamp, "created_at": stamp, "updated_at": stamp,
        "allow_rebase_merge": True, "template_repository": None, "temp_clone_token": "ABTLWHOULUVAXGTRYU7OC2876QJ2O",
        "allow_squash_merge": True, "allow_auto_merge": False, "delete_branch_on_merge": True,
        "allow_merge_commit": True, "allow_forking": True, "web_commit_signoff_required": False,
        "subscribers_count": 42, "network_count": 0, "open_issues": 0, "watchers": 80, "master_branch": "main",
        "starred_at": '"2020-07-09T00:17:42Z"', "anonymous_access_enabled": False,
        "use_squash_pr_title_as_default": False, "squash_merge_commit_title": "PR_TITLE",
        "squash_merge_commit_message": "PR_BODY", "merge_commit_title": "PR_TITLE", "merge_commit_message": "PR_BODY",
        "security_and_analysis": {
            "advanced_security": {"status": "enabled"}, "secret_scanning": {"status": "enabled"},
            "secret_scanning_push_protection": {"status": "disabled"},
            "secret_scanning_non_provider_patterns": {"status": "disabled"},
        },
    }  # fmt: skip
