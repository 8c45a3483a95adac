"""The cost of a push policy on the wire: pushes of a large commit straight to the fake GitHub, through the proxy
without a policy, and through the proxy with one that allows them (force: false, so an update is checked to be a
fast-forward), taking turns. Wall time per push, and the proxy's CPU and peak RSS.

    python -m bench.push [--size-mib 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench.clone import (
    TOKEN,
    Server,
    cpu_seconds,
    fake_github_server,
    proc_status_mib,
    reset_peak_rss,
    token_proxy_server,
    write_random_files,
)
from bench.common import MIB, Stopwatch, in_scratch, log, print_report
from proxy.testing import FakeGitHub, git_env, run_git_sync

REPO = "acme/pushed"
POLICY = {"refs": ["refs/heads/agent/**"], "create": True, "delete": True, "force": False}
KINDS = ("create", "fast-forward")  # a new branch (nothing to check beyond its name), an update (ancestry checked)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.push", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=200, help="size of the pushed commit (random blobs)")
    parser.add_argument("--file-mib", type=int, default=10, help="size of each blob")
    parser.add_argument("--rounds", type=int, default=3, help="timed pushes per path and kind")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    return parser.parse_args(argv)


def prepare(root: Path, work: Path, size_mib: int, file_mib: int) -> tuple[dict[str, str], str]:
    """An upstream repo with one small commit on `main`, and a local clone with a large commit on top of it. The
    client's git: no compression (random blobs do not compress), so the transfer, not zlib, is what is timed."""
    fake = FakeGitHub(root=root)
    bare = fake.create_repo(REPO, {"README.md": b"base\n"})
    env = {**git_env(root / "home"), "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@example.com",
           "GIT_COMMITTER_NAME": "b", "GIT_COMMITTER_EMAIL": "b@example.com"}  # fmt: skip
    run_git_sync("clone", "--quiet", str(bare), str(work), env=env).check()
    write_random_files(work, -(-size_mib // file_mib), file_mib * MIB)
    run_git_sync("add", "-A", env=env, cwd=work).check()
    run_git_sync("commit", "--quiet", "-m", "large", env=env, cwd=work).check()
    base = run_git_sync("rev-parse", "HEAD~1", env=env, cwd=work).check().stdout.strip()
    return env, base


def reset_upstream(root: Path, base: str) -> None:
    """Before each push: the pushed branches back where they started (created branches gone, updated ones at
    the base commit), and what the last push brought pruned, so that every push sends the whole commit."""
    bare = root / "repos" / f"{REPO}.git"
    env = git_env(root / "home")
    for kind in KINDS:
        run_git_sync("update-ref", "-d", f"refs/heads/agent/{kind}", env=env, cwd=bare)
    run_git_sync("update-ref", "refs/heads/agent/fast-forward", base, env=env, cwd=bare).check()
    run_git_sync("reflog", "expire", "--expire=now", "--all", env=env, cwd=bare).check()
    run_git_sync("gc", "--quiet", "--prune=now", env=env, cwd=bare).check()


def timed_push(url: str, kind: str, work: Path, env: Mapping[str, str]) -> float:
    watch = Stopwatch()
    done = subprocess.run(
        ["git", "-c", "pack.compression=0", "-c", "pack.window=0", "push", "--quiet", url,
         f"HEAD:refs/heads/agent/{kind}"],
        cwd=work, env=dict(env), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    elapsed = watch.seconds
    if done.returncode != 0:
        raise RuntimeError(f"push ({kind}) failed: {done.stderr.strip()}")
    return elapsed


def benchmark(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    root, work = scratch / "github", scratch / "work"
    log(f"building a {args.size_mib} MiB commit ...")
    env, base = prepare(root, work, args.size_mib, args.file_mib)
    reset_upstream(root, base)
    with (
        fake_github_server(root, scratch) as fake,
        token_proxy_server(fake.url, scratch, name="plain") as plain,
        token_proxy_server(fake.url, scratch, name="policy", push=POLICY) as policed,
    ):
        host_port = fake.url.removeprefix("http://")
        urls = {
            "direct": f"http://x-access-token:{TOKEN}@{host_port}/{REPO}.git",
            "proxy": f"{plain.url}/github.com/{REPO}.git",
            "proxy + policy": f"{policed.url}/github.com/{REPO}.git",
        }
        servers: dict[str, Server] = {"proxy": plain, "proxy + policy": policed}
        times: dict[tuple[str, str], list[float]] = {}
        cpu: dict[tuple[str, str], list[float]] = {}
        peak: dict[tuple[str, str], float] = {}
        for number in range(-1, args.rounds):  # one warm-up round
            for kind in KINDS:
                for path, url in urls.items():
                    reset_upstream(root, base)
                    server = servers.get(path)
                    if server is not None:
                        reset_peak_rss(server.pid)
                    before = cpu_seconds(server.pid) if server is not None else None
                    elapsed = timed_push(url, kind, work, env)
                    log(
                        f"  {'warm-up' if number < 0 else f'round {number + 1}'}  {kind:<12} {path:<15} {elapsed:6.2f}s"
                    )
                    if number < 0:
                        continue
                    times.setdefault((path, kind), []).append(elapsed)
                    if server is not None and before is not None:
                        cpu.setdefault((path, kind), []).append((cpu_seconds(server.pid) or 0.0) - before)
                        peak[(path, kind)] = max(peak.get((path, kind), 0.0),
                                                 proc_status_mib(server.pid, "VmHWM") or 0.0)  # fmt: skip
    return {
        "size_mib": args.size_mib,
        "rounds": args.rounds,
        "rows": [
            {
                "path": path,
                "kind": kind,
                "median_s": statistics.median(times[(path, kind)]),
                "vs_direct": statistics.median(times[(path, kind)]) / statistics.median(times[("direct", kind)]),
                "cpu_s": statistics.median(cpu[(path, kind)]) if (path, kind) in cpu else None,
                "peak_rss_mib": peak.get((path, kind)),
            }
            for kind in KINDS
            for path in urls
        ],
    }


def render(results: Mapping[str, Any]) -> str:
    lines = [
        f"`python -m bench.push`: a {results['size_mib']} MiB commit (random blobs, uncompressed), "
        f"{results['rounds']} timed pushes per cell after one warm-up, paths taking turns, medians.",
        "",
        "| push | path | median s | vs direct | proxy CPU s | proxy peak RSS MiB |",
        "|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        cpu = "—" if row["cpu_s"] is None else f"{row['cpu_s']:.2f}"
        rss = "—" if row["peak_rss_mib"] is None else f"{row['peak_rss_mib']:.1f}"
        lines.append(
            f"| {row['kind']} | {row['path']} | {row['median_s']:.2f} | {row['vs_direct']:.2f} | {cpu} | {rss} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = in_scratch("bench-push-", lambda scratch: benchmark(args, scratch))
    print_report(results, args.json, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
