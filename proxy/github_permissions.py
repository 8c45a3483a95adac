"""GitHub App permissions: the names and levels an installation token may ask for, as GitHub describes them.

The table is GitHub's `app-permissions` schema (components/schemas/app-permissions), copied from
github/rest-api-description, descriptions/api.github.com/api.github.com.json (info.version 1.1.4, commit
0000036e42b5e7121c2b1ac244cb7bba1d2f3914); it is identical in api.github.com.2022-11-28.json (the API version the
proxy sends) and api.github.com.2026-03-10.json. A mint that asks for anything else is refused by GitHub at the first
clone; checking the config against the table makes it a start-up error that names the key instead.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping

APP_PERMISSIONS: Mapping[str, tuple[str, ...]] = {
    "actions": ("read", "write"),
    "administration": ("read", "write"),
    "artifact_metadata": ("read", "write"),
    "attestations": ("read", "write"),
    "checks": ("read", "write"),
    "code_quality": ("read", "write"),
    "codespaces": ("read", "write"),
    "contents": ("read", "write"),
    "custom_properties_for_organizations": ("read", "write"),
    "dependabot_secrets": ("read", "write"),
    "deployments": ("read", "write"),
    "discussions": ("read", "write"),
    "email_addresses": ("read", "write"),
    "enterprise_custom_properties_for_organizations": ("read", "write", "admin"),
    "environments": ("read", "write"),
    "followers": ("read", "write"),
    "git_ssh_keys": ("read", "write"),
    "gpg_keys": ("read", "write"),
    "interaction_limits": ("read", "write"),
    "issues": ("read", "write"),
    "members": ("read", "write"),
    "merge_queues": ("read", "write"),
    "metadata": ("read", "write"),
    "organization_administration": ("read", "write"),
    "organization_announcement_banners": ("read", "write"),
    "organization_copilot_agent_settings": ("read", "write"),
    "organization_copilot_seat_management": ("read", "write"),
    "organization_custom_org_roles": ("read", "write"),
    "organization_custom_properties": ("read", "write", "admin"),
    "organization_custom_roles": ("read", "write"),
    "organization_events": ("read",),
    "organization_hooks": ("read", "write"),
    "organization_packages": ("read", "write"),
    "organization_personal_access_token_requests": ("read", "write"),
    "organization_personal_access_tokens": ("read", "write"),
    "organization_plan": ("read",),
    "organization_projects": ("read", "write", "admin"),
    "organization_secrets": ("read", "write"),
    "organization_self_hosted_runners": ("read", "write"),
    "organization_user_blocking": ("read", "write"),
    "packages": ("read", "write"),
    "pages": ("read", "write"),
    "profile": ("write",),
    "pull_requests": ("read", "write"),
    "repository_custom_properties": ("read", "write"),
    "repository_hooks": ("read", "write"),
    "repository_projects": ("read", "write", "admin"),
    "secret_scanning_alerts": ("read", "write"),
    "secrets": ("read", "write"),
    "security_events": ("read", "write"),
    "single_file": ("read", "write"),
    "starring": ("read", "write"),
    "statuses": ("read", "write"),
    "vulnerability_alerts": ("read", "write"),
    "workflows": ("write",),
}


def permission_problem(name: str, level: str) -> str | None:
    """Why GitHub would refuse `name: level` in a token request, or None when it is one GitHub knows."""
    levels = APP_PERMISSIONS.get(name)
    if levels is None:
        close = difflib.get_close_matches(name, APP_PERMISSIONS, n=1)
        hint = f"did you mean {close[0]!r}?" if close else "GitHub's names are snake_case, e.g. contents, pull_requests"
        return f"{name!r} is not a GitHub App permission; {hint}"
    if level not in levels:
        allowed = ", ".join(levels)
        return f"{level!r} is not a level GitHub allows for {name} (allowed: {allowed})"
    return None
