"""Benchmark: mirror snapshots (issue 23's measurement). A fresh replica (empty mirror.dir) whose bucket holds a
snapshot, against a clone straight from a fake GitHub throttled to 16 MiB/s, on a 200 MiB repo: the speed-up, and
the share of the pack bytes taken from upstream (the issue aims at >= 4x and <= 5 %). Also what a publish costs the
replica that publishes (its CPU, children included, and its wall time), what a restore alone takes, and a second
clone through the same replica (served from its mirror: the client's own index-pack, and upload-pack).

The bucket is a real SeaweedFS on loopback; the proxies are the console script, as users run it. `python -m bench
--snapshots` runs it as part of the suite.

Run: python -m bench.snapshots [--size-mib 200] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import shutil
import statistics
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from bench.clone import (
    REPO,
    TOKEN,
    BigRepo,
    build_big_repo,
    proxy_command,
    proxy_config,
    running,
    wait_until_answering,
)
from bench.common import HOST, MIB, Stopwatch, cpus, in_scratch, log, print_report
from bench.mirror import Clone, ThrottledGitHub, parse_throttled_clone_args, throttled_github, timed_clone
from proxy.config import MirrorConfig
from proxy.config.mirror import SnapshotsConfig
from proxy.metrics import Metrics
from proxy.mirror.gitrun import MirrorGit
from proxy.mirror.objectstore import ObjectStore, StaticCredentials
from proxy.mirror.snapshots import Snapshots
from proxy.mirror.store import MirrorStore
from proxy.testing.process import free_port
from proxy.testing.s3 import ADMIN, SeaweedS3

KEY = f"github.com/{REPO}"
BUCKET = "bench-snapshots"
PUBLISH_WAIT = 600.0  # seconds for the first replica's background publish


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return parse_throttled_clone_args(__doc__, argv, size_mib=200, clone_timeout=900.0, fresh="replica")


# ---------------------------------------------------------------- a replica with snapshots


def aws_env() -> dict[str, str]:
    """The standard AWS chain, from the environment only: SeaweedFS's admin keys, no files, no instance metadata."""
    return {**ADMIN.env(), "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
            "AWS_EC2_METADATA_DISABLED": "true"}  # fmt: skip


def snapshots_settings(s3: SeaweedS3, prefix: str = "fleet") -> dict[str, Any]:
    return {"url": f"s3://{BUCKET}/{prefix}", "endpoint": s3.endpoint}


@contextlib.contextmanager
def replica(fake_url: str, s3: SeaweedS3, workdir: Path) -> Iterator[str]:
    """A proxy process over an empty mirror.dir, with snapshots in the bench's bucket."""
    workdir.mkdir(parents=True)
    config = proxy_config(fake_url)
    config["mirror"] = {"dir": str(workdir / "mirror"), "snapshots": snapshots_settings(s3)}
    config_file = workdir / "proxy.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    port = free_port()
    command = [*proxy_command(), "serve", "--config", str(config_file), "--host", HOST, "--port", str(port),
               "--log-level", "INFO"]  # fmt: skip
    with running(command, workdir / "proxy.log", stdout=subprocess.DEVNULL, env={**os.environ, **aws_env()}) as proc:
        url = f"http://{HOST}:{port}"
        wait_until_answering(f"{url}/healthz", proc)
        yield url


def wait_for_manifest(s3: SeaweedS3, seconds: float = PUBLISH_WAIT) -> None:
    deadline = time.monotonic() + seconds
    while not any(key.endswith("manifest.json") for key in s3.keys(BUCKET, "fleet/")):
        if time.monotonic() > deadline:
            raise RuntimeError("the first replica published no snapshot")
        time.sleep(0.2)


# ---------------------------------------------------------------- publish and restore, measured in this process


@dataclass(frozen=True)
class Cost:
    seconds: float
    cpu_seconds: float  # this process and the children it reaped (git bundle create, index-pack, ...)
    worst_loop_lag_ms: float  # the longest the event loop was held meanwhile: what requests on it would wait
    result: str


def cpu_now() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


async def measured(work: Any) -> tuple[Any, float, float, float]:
    worst, running_ = 0.0, True

    async def probe() -> None:
        nonlocal worst
        while running_:
            started = time.perf_counter()
            await asyncio.sleep(0.005)
            worst = max(worst, time.perf_counter() - started - 0.005)

    prober = asyncio.create_task(probe())
    watch, cpu = Stopwatch(), cpu_now()
    try:
        result = await work
    finally:
        running_ = False
        await prober
    return result, watch.seconds, cpu_now() - cpu, worst * 1000


@dataclass
class Parts:
    """What one replica's Snapshots is made of, as `Mirror` builds it, over a mirror directory and a prefix."""

    mirrors: MirrorStore
    store: ObjectStore
    snapshots: Snapshots

    @classmethod
    async def make(cls, s3: SeaweedS3, mirror_dir: Path, prefix: str) -> Parts:
        settings = SnapshotsConfig.model_validate(snapshots_settings(s3, prefix))
        mirrors = MirrorStore(mirror_dir)
        store = ObjectStore(BUCKET, endpoint=s3.endpoint, credentials=StaticCredentials(ADMIN.access_key,
                                                                                       ADMIN.secret_key))  # fmt: skip
        snapshots = Snapshots(settings, store, MirrorGit(mirrors.home, None), mirrors, Metrics(),
                              MirrorConfig(dir=mirror_dir).max_size)  # fmt: skip
        await store.put_bytes("warm-up", b"")  # the client's one-time start-up is no part of what is measured
        await mirrors.prepare()
        return cls(mirrors, store, snapshots)


async def publish_cost(s3: SeaweedS3, mirror_dir: Path, rounds: int) -> list[Cost]:
    """The publishing replica's work: bundle, hash, upload, manifest. Each round into a fresh prefix, so that it
    publishes rather than finds its snapshot there."""
    costs = []
    for number in range(rounds):
        parts = await Parts.make(s3, mirror_dir, f"cost-{number}")
        try:
            result, seconds, cpu, lag = await measured(parts.snapshots.publisher.publish(parts.mirrors.slot(KEY)))
        finally:
            await parts.snapshots.close()
        costs.append(Cost(seconds, cpu, lag, result))
        log(f"  publish {number + 1}/{rounds}: {result}, {seconds:.2f}s, {cpu:.2f}s CPU, loop held {lag:.0f} ms")
    return costs


async def restore_cost(s3: SeaweedS3, workdir: Path, rounds: int) -> list[Cost]:
    costs = []
    for number in range(rounds):
        parts = await Parts.make(s3, workdir / f"restore-{number}", "fleet")
        try:
            incoming = await parts.mirrors.incoming_path(parts.mirrors.slot(KEY))
            restored, seconds, cpu, lag = await measured(parts.snapshots.restore(KEY, incoming))
        finally:
            await parts.snapshots.close()
        costs.append(Cost(seconds, cpu, lag, "restored" if restored else "failed"))
        log(f"  restore {number + 1}/{rounds}: {seconds:.2f}s, {cpu:.2f}s CPU, loop held {lag:.0f} ms")
        shutil.rmtree(workdir / f"restore-{number}", ignore_errors=True)
    return costs


# ---------------------------------------------------------------- the rounds

KINDS = ("direct", "fresh", "repeat")
LABELS = {
    "direct": "direct from the fake GitHub",
    "fresh": "fresh replica, warm bucket (restore, delta, serve)",
    "repeat": "the same replica again (served from its mirror)",
}
AIM_SPEEDUP, AIM_UPSTREAM_SHARE = 4.0, 0.05  # issue 23's acceptance


def fresh_replica_rounds(
    github: ThrottledGitHub, s3: SeaweedS3, repo: BigRepo, args: argparse.Namespace, workdir: Path
) -> dict[str, list[Clone]]:
    direct_url = f"{github.url.replace('://', f'://x-access-token:{TOKEN}@')}/{REPO}.git"
    clones: dict[str, list[Clone]] = {kind: [] for kind in KINDS}
    for number in range(1, args.rounds + 1):
        scratch = workdir / f"round-{number}"
        clones["direct"].append(timed_clone(direct_url, scratch / "direct.git", github, repo, args.clone_timeout))
        with replica(github.url, s3, scratch / "replica") as proxy:
            url = f"{proxy}/github.com/{REPO}.git"
            for kind in ("fresh", "repeat"):
                clones[kind].append(timed_clone(url, scratch / f"{kind}.git", github, repo, args.clone_timeout))
        for kind in KINDS:
            log(f"  round {number}/{args.rounds}  {kind:<6} {clones[kind][-1].seconds:7.2f}s  "
                f"{clones[kind][-1].upstream_bytes / MIB:8.2f} MiB from upstream")  # fmt: skip
        shutil.rmtree(scratch, ignore_errors=True)
    return clones


def benchmark(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    log(f"building {REPO}: {args.size_mib} MiB of random blobs in {args.file_mib} MiB files ...")
    repo = build_big_repo(workdir / "github", args.size_mib, args.file_mib)
    return measure(repo, workdir / "github", args, workdir)


def measure(repo: BigRepo, github_root: Path, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """The whole measurement over `repo`, already built in a FakeGitHub root (the suite shares its own)."""
    workdir.mkdir(parents=True, exist_ok=True)
    with SeaweedS3(workdir / "s3") as s3, throttled_github(github_root, args.rate_mib * MIB) as github:
        s3.make_bucket(BUCKET)
        log(f"fake GitHub {github.url} at {args.rate_mib:g} MiB/s; SeaweedFS {s3.endpoint}")
        log("the first replica fills from upstream and publishes ...")
        with replica(github.url, s3, workdir / "publisher") as proxy:
            first = timed_clone(f"{proxy}/github.com/{REPO}.git", workdir / "first.git", github, repo,
                                args.clone_timeout)  # fmt: skip
            wait_for_manifest(s3)
        log(f"  first clone {first.seconds:.2f}s; snapshot published")
        # A push after the snapshot: a fresh replica restores, then fetches this delta from upstream, as in a fleet.
        repo = replace(repo, head=github.fake.commit(REPO, "after-the-snapshot.txt", b"a new commit\n"))
        publishes = asyncio.run(publish_cost(s3, workdir / "publisher" / "mirror", args.rounds))
        restores = asyncio.run(restore_cost(s3, workdir, args.rounds))
        clones = fresh_replica_rounds(github, s3, repo, args, workdir)
    return summarize(repo, first, clones, publishes, restores, args)


def summarize(
    repo: BigRepo, first: Clone, clones: dict[str, list[Clone]], publishes: list[Cost], restores: list[Cost],
    args: argparse.Namespace,
) -> dict[str, Any]:  # fmt: skip
    median = {kind: statistics.median(c.seconds for c in runs) for kind, runs in clones.items()}
    upstream = {kind: statistics.median(c.upstream_bytes for c in runs) for kind, runs in clones.items()}

    def costs(runs: list[Cost]) -> dict[str, float]:
        return {"seconds": statistics.median(c.seconds for c in runs),
                "cpu_seconds": statistics.median(c.cpu_seconds for c in runs),
                "worst_loop_lag_ms": max(c.worst_loop_lag_ms for c in runs)}  # fmt: skip

    speedup = median["direct"] / median["fresh"]
    share = upstream["fresh"] / upstream["direct"]  # of the pack bytes a direct clone takes from upstream
    return {
        "repo": {"name": REPO, "payload_mib": repo.payload_bytes / MIB, "on_disk_mib": repo.on_disk_bytes / MIB},
        "rate_mib_s": args.rate_mib,
        "rounds": args.rounds,
        "cpus": cpus(),
        "first_fill_s": first.seconds,
        "times_s": {kind: [c.seconds for c in runs] for kind, runs in clones.items()},
        "median_s": median,
        "upstream_bytes_median": upstream,
        "speedup_fresh_vs_direct": speedup,
        "fresh_upstream_share": share,
        "aim_met": speedup >= AIM_SPEEDUP and share <= AIM_UPSTREAM_SHARE,
        "publish": costs(publishes),
        "restore": costs(restores),
    }


def render_table(results: Mapping[str, Any]) -> str:
    repo, median, upstream = results["repo"], results["median_s"], results["upstream_bytes_median"]
    publish, restore = results["publish"], results["restore"]
    aim = "met" if results["aim_met"] else "not met"
    lines = [
        f"`{repo['name']}`: {repo['payload_mib']:.0f} MiB of random blobs, {repo['on_disk_mib']:.1f} MiB on disk, and "
        f"one small commit pushed after the snapshot; fake GitHub throttled to {results['rate_mib_s']:g} MiB/s; "
        f"bucket: SeaweedFS on loopback; {results['cpus']} cores; median of {results['rounds']} rounds, each with a "
        "fresh replica.",
        "",
        "| clone | time (s) | from upstream | vs direct |",
        "| --- | ---: | ---: | ---: |",
        *(
            f"| {LABELS[kind]} | {median[kind]:.2f} | {amount(upstream[kind])} | {times_faster(median, kind)} |"
            for kind in KINDS
        ),
        "",
        f"Fresh replica: {results['speedup_fresh_vs_direct']:.2f}× faster than direct, "
        f"{percent(results['fresh_upstream_share'])} of a direct clone's pack bytes from upstream (the aim, ≥ "
        f"{AIM_SPEEDUP:g}× and ≤ {percent(AIM_UPSTREAM_SHARE)}: {aim}).",
        f"Restore alone (download streamed into git index-pack --strict, refs, checks): {restore['seconds']:.2f} s, "
        f"{restore['cpu_seconds']:.2f} s of CPU; event loop held at most {restore['worst_loop_lag_ms']:.0f} ms.",
        f"Publish (bundle, sha256, upload, manifest): {publish['seconds']:.2f} s, {publish['cpu_seconds']:.2f} s of "
        f"CPU on the publishing replica; event loop held at most {publish['worst_loop_lag_ms']:.0f} ms.",
        f"The publishing replica's own first clone (its mirror filled from upstream): {results['first_fill_s']:.2f} s.",
    ]
    return "\n".join(lines)


def times_faster(median: Mapping[str, float], kind: str) -> str:
    return f"{median['direct'] / median[kind]:.2f}×"


def percent(share: float) -> str:
    return f"{share * 100:.2g} %"  # two significant digits: a delta of a few hundred bytes is no "0.000 %"


def amount(size: float) -> str:
    return f"{size / MIB:.1f} MiB" if size >= MIB / 10 else f"{size / 1024:.1f} KiB"


def suite_rows(results: Mapping[str, Any]) -> list[tuple[str, dict[str, str]]]:
    """What `python -m bench --snapshots` adds to the suite's table: rows of (name, {column: cell})."""
    median, publish = results["median_s"], results["publish"]
    where = f"{results['repo']['on_disk_mib']:.0f} MiB at {results['rate_mib_s']:g} MiB/s"
    return [
        (f"fresh replica, warm bucket ({where}): median s",
         {"direct": f"{median['direct']:.2f}", "proxy": f"{median['fresh']:.2f}"}),
        ("  its speed-up vs direct; pack bytes from upstream",
         {"proxy": f"{results['speedup_fresh_vs_direct']:.2f}×; {percent(results['fresh_upstream_share'])}"}),
        ("  snapshot publish on the publishing replica: s, CPU s",
         {"proxy": f"{publish['seconds']:.2f} s, {publish['cpu_seconds']:.2f} s"}),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print_report(in_scratch("bench-snapshots-", lambda folder: benchmark(args, folder)), args.json, render_table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
