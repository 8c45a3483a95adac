"""Runs git on a mirror in a clean environment, with the credential only in that process's environment."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..subprocesses import Finished, run_process

# A fetch that moves less than 1 byte/s for this long is given up, so a stalled upstream cannot hold a repo's
# single flight (and every client waiting on it) for ever. The same span as an upstream's default readTimeout.
FETCH_STALL_SECONDS = 300
_OBJECT_ID = re.compile(r"[0-9a-f]{40}")

# Set on every git command, through the environment so that none of it depends on what a mirror's config holds.
_ALWAYS: tuple[tuple[str, str], ...] = (
    # gc and maintenance would otherwise detach into the background, outside our locks and our reaping.
    ("gc.autoDetach", "false"),
    ("maintenance.autoDetach", "false"),
    # Only http(s) to the configured upstream: never ext::, file:: or ssh from a URL, and never a redirect
    # (http.extraHeader would follow it to wherever it points).
    ("protocol.allow", "never"),
    ("protocol.http.allow", "always"),
    ("protocol.https.allow", "always"),
    ("http.followRedirects", "false"),
    ("http.lowSpeedLimit", "1"),
    ("http.lowSpeedTime", str(FETCH_STALL_SECONDS)),
)

# What a mirror must allow for upload-pack to serve what clients ask of GitHub: partial clones, wants that are no
# longer a ref tip here (the client saw upstream's refs, not ours), and `want-ref`. Written into the mirror's config
# and also passed on each command, so that a mirror made by an older version still serves.
MIRROR_CONFIG: tuple[tuple[str, str], ...] = (
    ("uploadpack.allowFilter", "true"),
    ("uploadpack.allowAnySHA1InWant", "true"),
    ("uploadpack.allowRefInWant", "true"),
    # Fetched objects stay in packs (never exploded into loose objects), which upload-pack serves fastest.
    ("fetch.unpackLimit", "1"),
    ("core.logAllRefUpdates", "false"),  # no reflogs: a mirror's history of ref moves is of no use to anyone
)


def git_env(home: Path, config: Iterable[tuple[str, str]] = (), git_protocol: str | None = None) -> dict[str, str]:
    """Nothing inherited but PATH: no GIT_* variables, no user or system config, no credential helper, no prompt.
    `config` becomes GIT_CONFIG_COUNT/KEY/VALUE, visible to this process alone and never written to disk."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "HOME": str(home),
        "LANG": "C",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_TERMINAL_PROMPT": "0",  # a 401 becomes an error instead of a process waiting for a password
        "GIT_ASKPASS": "",
    }
    pairs = [*_ALWAYS, *config]
    env["GIT_CONFIG_COUNT"] = str(len(pairs))
    for index, (key, value) in enumerate(pairs):
        env[f"GIT_CONFIG_KEY_{index}"] = key
        env[f"GIT_CONFIG_VALUE_{index}"] = value
    if git_protocol:
        env["GIT_PROTOCOL"] = git_protocol
    return env


def clean_git_protocol(value: str | None) -> str | None:
    """The client's Git-Protocol header as upload-pack may read it: short printable ASCII, or nothing."""
    if not value or len(value) > 256 or not value.isascii() or not value.isprintable():
        return None
    return value


class MirrorGit:
    """The git commands a mirror needs. `authorization` reaches only fetch, and only through its environment."""

    def __init__(self, home: Path, ca_file: Path | None) -> None:
        self.home = home
        self._ca_file = ca_file

    def env(self, config: Iterable[tuple[str, str]] = (), git_protocol: str | None = None) -> dict[str, str]:
        return git_env(self.home, [*MIRROR_CONFIG, *config], git_protocol)

    async def run(
        self, mirror: Path, *args: str, input: bytes | None = None, config: Sequence[tuple[str, str]] = ()
    ) -> Finished:
        # --git-dir: no repository discovery, so nothing above the mirror (or a stray GIT_DIR) is ever used.
        return await run_process(["git", f"--git-dir={mirror}", *args], self.env(config), input=input)

    async def init_bare(self, mirror: Path) -> Finished:
        # No template: a mirror needs no sample hooks or description, and must never run a hook.
        done = await run_process(["git", "init", "--quiet", "--bare", "--template=", str(mirror)], self.env())
        for key, value in MIRROR_CONFIG:
            if done.returncode != 0:
                break
            done = await self.run(mirror, "config", key, value)
        return done

    async def fetch(
        self, mirror: Path, url: str, refspecs: Sequence[str], authorization: str | None, *, prune: bool
    ) -> Finished:
        config: list[tuple[str, str]] = []
        if authorization is not None:
            config.append(("http.extraHeader", f"Authorization: {authorization}"))
        if self._ca_file is not None:
            config.append(("http.sslCAInfo", str(self._ca_file)))
        # --no-auto-gc: maintenance runs from our own loop, under the repo's lock, never behind a client's fetch.
        args = ["fetch", "--quiet", "--no-write-fetch-head", "--no-auto-gc", "--no-tags"]
        return await self.run(mirror, *args, *(["--prune"] if prune else []), url, *refspecs, config=config)

    async def missing_objects(self, mirror: Path, object_ids: Sequence[str]) -> set[str]:
        """The ids the mirror lacks (all of them when there is no mirror, or git cannot read it)."""
        if not object_ids:
            return set()
        asked = "".join(f"{oid}\n" for oid in object_ids).encode()
        done = await self.run(mirror, "cat-file", "--batch-check", input=asked)
        if done.returncode != 0:
            return set(object_ids)
        answers = done.stdout.decode(errors="replace").splitlines()
        present = {line.split(" ")[0] for line in answers if not line.endswith(" missing")}
        return {oid for oid in object_ids if oid not in present}

    async def ref_tips(self, mirror: Path) -> list[str]:
        """What every ref points at (tags unpeeled), each once."""
        done = await self.run(mirror, "for-each-ref", "--format=%(objectname)")
        return sorted(set(done.stdout.decode(errors="replace").split())) if done.returncode == 0 else []

    async def all_reachable(self, mirror: Path, object_ids: Sequence[str]) -> bool:
        """Whether every id is reachable from the mirror's refs (which a sync just made upstream's). rev-list walks
        from the wants and stops at anything a ref reaches: a want it prints is one no ref reaches (a commit force-
        pushed away, a tag no ref names), and so is one it cannot read. upload-pack itself does not check this in
        protocol v2, whatever uploadpack.allowReachableSHA1InWant says. A blob or tree want (a partial clone's
        lazy fetch) may be printed though reachable: it goes upstream, which is only slower."""
        if not object_ids:
            return True
        if not all(_OBJECT_ID.fullmatch(oid) for oid in object_ids):
            return False  # one line per id, and nothing else: an empty line would end rev-list's list early
        asked = "".join(f"{oid}\n" for oid in object_ids).encode()
        done = await self.run(mirror, "rev-list", "--objects", "--no-object-names", "--stdin", "--not", "--all",
                              input=asked)  # fmt: skip
        return done.returncode == 0 and not done.stdout.strip()

    async def is_connected(self, mirror: Path) -> bool:
        """Every ref reaches only objects the mirror holds: a missing pack or a bad ref fails this."""
        done = await self.run(mirror, "fsck", "--connectivity-only", "--no-dangling", "--no-progress")
        return done.returncode == 0

    async def maintain(self, mirror: Path) -> Finished:
        return await self.run(mirror, "maintenance", "run", "--auto", "--quiet")

    async def prune_unreachable(self, mirror: Path) -> Finished:
        """Drop every object no ref reaches: one pack of what the refs reach (repack -a -d leaves unreachable
        packed objects behind, unlike -A), then loose ones of any age."""
        done = await self.run(mirror, "repack", "-a", "-d", "-q")
        return done if done.returncode != 0 else await self.run(mirror, "prune", "--expire=now")


def describe_failure(done: Finished) -> str:
    """git's last words, one line, for a log: git never prints the extra header, and the URL holds no credential."""
    lines = done.stderr.decode(errors="replace").strip().splitlines()
    return f"exit {done.returncode}: {lines[-1] if lines else 'no message'}"[:300]
