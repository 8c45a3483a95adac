"""Benchmark: the mirror cache. A clone straight from a throttled fake GitHub, the first clone through the proxy (the
mirror fills), and a repeat clone through the proxy (the mirror serves): time, speed-up and bytes taken from upstream.

Run: python -m bench.mirror [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.clone import BRANCH, REPO, TOKEN, BigRepo, build_big_repo, redact, token_proxy_server
from bench.common import HOST, MIB, Stopwatch, in_scratch, log, print_report
from proxy.testing import FakeGitHub, git_env, run_git_sync

KINDS = ("direct", "first", "repeat")
LABELS = {
    "direct": "direct from the fake GitHub",
    "first": "through the proxy, first (mirror fills)",
    "repeat": "through the proxy, repeat (mirror serves)",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return parse_throttled_clone_args(__doc__, argv, size_mib=48, clone_timeout=600.0, fresh="mirror")


def parse_throttled_clone_args(
    description: str | None, argv: list[str] | None, *, size_mib: int, clone_timeout: float, fresh: str
) -> argparse.Namespace:
    """The arguments of a benchmark that clones a repo of random blobs from a throttled fake GitHub (this one and
    bench/snapshots.py): `fresh` is what each round starts without."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--size-mib", type=int, default=size_mib, help=f"total size of the random blobs (default {size_mib})"
    )
    parser.add_argument("--file-mib", type=int, default=2, help="size of each blob (default 2)")
    parser.add_argument("--rate-mib", type=float, default=16.0, help="the fake GitHub's git rate in MiB/s (default 16)")
    parser.add_argument("--rounds", type=int, default=3, help=f"rounds, each with a fresh {fresh} (default 3)")
    parser.add_argument(
        "--clone-timeout", type=float, default=clone_timeout, help="seconds before one clone is abandoned"
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = parser.parse_args(argv)
    if args.size_mib < 1 or args.file_mib < 1 or args.rounds < 1 or args.rate_mib <= 0:
        parser.error("sizes, --rate-mib and --rounds must be positive")
    return args


# ---------------------------------------------------------------- the fake GitHub, in a thread of ours


@dataclass
class ThrottledGitHub:
    """In this process (its own thread and loop), so that its upload-pack byte counter can be read between
    clones. Clients and the proxy are other processes, so they share no GIL with it."""

    fake: FakeGitHub
    url: str
    loop: asyncio.AbstractEventLoop

    @property
    def upload_pack_bytes(self) -> int:
        return self.fake.upload_pack_bytes


@contextlib.contextmanager
def throttled_github(root: Path, bytes_per_second: float) -> Iterator[ThrottledGitHub]:
    fake = FakeGitHub(root=root, git_bytes_per_second=bytes_per_second)
    fake.add_token(TOKEN)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fake-github", daemon=True)
    thread.start()
    try:
        url = asyncio.run_coroutine_threadsafe(fake.start(HOST), loop).result(timeout=30)
        yield ThrottledGitHub(fake, url, loop)
    finally:
        asyncio.run_coroutine_threadsafe(fake.close(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()


# ---------------------------------------------------------------- the proxy, with a mirror


@contextlib.contextmanager
def mirror_proxy(fake_url: str, workdir: Path) -> Iterator[str]:
    """A fresh proxy over a fresh, empty mirror directory."""
    workdir.mkdir(parents=True)
    with token_proxy_server(fake_url, workdir, name="proxy", mirror_dir=workdir / "mirror") as proxy:
        yield proxy.url


# ---------------------------------------------------------------- cloning


@dataclass(frozen=True)
class Clone:
    seconds: float
    upstream_bytes: int  # upload-pack response bytes the fake GitHub sent during this clone


def timed_clone(url: str, destination: Path, github: ThrottledGitHub, repo: BigRepo, timeout: float) -> Clone:
    env = git_env(destination.parent / "home")
    before = github.upload_pack_bytes
    watch = Stopwatch()
    # --bare: the transfer plus index-pack, which is what a proxy can change; no checkout.
    done = subprocess.run(
        ["git", "clone", "--quiet", "--bare", url, str(destination)],
        env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    elapsed = watch.seconds
    if done.returncode != 0:
        raise RuntimeError(f"clone of {redact(url)} failed ({done.returncode}): {done.stderr.strip()}")
    head = run_git_sync("rev-parse", f"refs/heads/{BRANCH}", env=env, cwd=destination).check().stdout.strip()
    if head != repo.head:
        raise RuntimeError(f"clone of {redact(url)} has {head}, expected {repo.head}")
    run_git_sync("fsck", "--connectivity-only", env=env, cwd=destination).check()
    return Clone(elapsed, github.upload_pack_bytes - before)


def run_rounds(
    github: ThrottledGitHub, repo: BigRepo, args: argparse.Namespace, workdir: Path
) -> dict[str, list[Clone]]:
    direct_url = f"{github.url.replace('://', f'://x-access-token:{TOKEN}@')}/{REPO}.git"
    clones: dict[str, list[Clone]] = {kind: [] for kind in KINDS}
    for number in range(1, args.rounds + 1):
        scratch = workdir / f"round-{number}"
        clones["direct"].append(timed_clone(direct_url, scratch / "direct.git", github, repo, args.clone_timeout))
        with mirror_proxy(github.url, scratch / "proxy") as proxy:
            url = f"{proxy}/github.com/{REPO}.git"
            for kind in ("first", "repeat"):
                clones[kind].append(timed_clone(url, scratch / f"{kind}.git", github, repo, args.clone_timeout))
        for kind in KINDS:
            log(f"  round {number}/{args.rounds}  {kind:<7} {clones[kind][-1].seconds:7.2f}s  "
                f"{clones[kind][-1].upstream_bytes / MIB:8.2f} MiB from upstream")  # fmt: skip
        shutil.rmtree(scratch, ignore_errors=True)  # three clones and a mirror, each the repo's size
    return clones


# ---------------------------------------------------------------- results


def summarize(repo: BigRepo, clones: dict[str, list[Clone]], args: argparse.Namespace) -> dict[str, Any]:
    median = {kind: statistics.median(c.seconds for c in clones[kind]) for kind in KINDS}
    upstream = {kind: statistics.median(c.upstream_bytes for c in clones[kind]) for kind in KINDS}
    return {
        "repo": {"name": REPO, "files": repo.files, "payload_mib": repo.payload_bytes / MIB,
                 "on_disk_mib": repo.on_disk_bytes / MIB},
        "rate_mib_s": args.rate_mib,
        "rounds": args.rounds,
        "times_s": {kind: [c.seconds for c in clones[kind]] for kind in KINDS},
        "median_s": median,
        "upstream_bytes_median": upstream,
        "speedup_repeat_vs_direct": median["direct"] / median["repeat"],
        "repeat_upstream_share": upstream["repeat"] / repo.on_disk_bytes,
    }  # fmt: skip


def render_table(results: Mapping[str, Any]) -> str:
    repo, median, upstream = results["repo"], results["median_s"], results["upstream_bytes_median"]
    lines = [
        f"`{repo['name']}`: {repo['files']} random blobs, {repo['payload_mib']:.0f} MiB payload, "
        f"{repo['on_disk_mib']:.1f} MiB on disk; fake GitHub throttled to {results['rate_mib_s']:g} MiB/s; "
        f"median of {results['rounds']} rounds, each with an empty mirror.",
        "",
        "| clone | time (s) | MiB/s | from upstream | vs direct |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for kind in KINDS:
        rate = repo["on_disk_mib"] / median[kind]
        taken = upstream[kind]
        taken_text = f"{taken / MIB:.1f} MiB" if taken >= MIB / 10 else f"{taken / 1024:.1f} KiB"
        lines.append(f"| {LABELS[kind]} | {median[kind]:.2f} | {rate:.1f} | {taken_text} | "
                     f"{median['direct'] / median[kind]:.2f}× |")  # fmt: skip
    lines.append("")
    lines.append(f"Repeat clone: {results['speedup_repeat_vs_direct']:.1f}× faster than direct, "
                 f"{results['repeat_upstream_share']:.2%} of the repo's bytes from upstream.")  # fmt: skip
    return "\n".join(lines)


def benchmark(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    started = time.monotonic()
    log(f"building {REPO}: {args.size_mib} MiB of random blobs in {args.file_mib} MiB files ...")
    repo = build_big_repo(workdir / "github", args.size_mib, args.file_mib)
    log(f"  done in {time.monotonic() - started:.1f}s, {repo.on_disk_bytes / MIB:.1f} MiB on disk")
    with throttled_github(workdir / "github", args.rate_mib * MIB) as github:
        log(f"fake GitHub {github.url}, {args.rate_mib:g} MiB/s")
        clones = run_rounds(github, repo, args, workdir)
    return summarize(repo, clones, args)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print_report(in_scratch("bench-mirror-", lambda folder: benchmark(args, folder)), args.json, render_table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
