"""The benchmark suite: direct, nginx (fixed header) and git-token-proxy side by side, one Markdown table.

Run: python -m bench [--quick] [--json]
Cases, all on 127.0.0.1 and bounded in time: a large clone over a plain-HTTP and a TLS upstream (paths alternate
inside each round, medians), CPU seconds per GiB of nginx and of the proxy (utime + stime from /proc/<pid>/stat,
the same way for both), peak RSS (VmHWM), warm info/refs latency, concurrent clones, idle keep-alive connections
and token look-ups. nginx is optional: without it its column says so. Progress goes to stderr, the table to stdout.
With --snapshots, also a fresh replica with a warm snapshot bucket against direct (bench/snapshots.py, issue 23).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime
import http.client
import ipaddress
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import clone, snapshots, stream, token_lookup
from bench.clone import REPO, TOKEN, Server, cpu_seconds, proc_status_mib, reset_peak_rss
from bench.common import HOST, MIB, Stopwatch, cpus, in_scratch, log, percentile, print_report
from proxy.testing import FakeGitHub, git_env

SMALL_REPO = "acme/small"
PATHS = ("direct", "nginx", "proxy")
LABELS = {"direct": "direct", "nginx": "nginx (fixed header)", "proxy": "git-token-proxy"}
GIB = 1 << 30
IDLE_TIMEOUT = 60.0  # seconds to open every idle connection
LATENCY_TIMEOUT = 10.0  # seconds for one info/refs request
README = Path(__file__).resolve().parent.parent / "README.md"
README_BEGIN, README_END = "<!-- python -m bench --readme: begin -->", "<!-- python -m bench --readme: end -->"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="smaller repo and counts: about a minute")
    parser.add_argument("--size-mib", type=int, help="size of the big repo (default 200, --quick 50)")
    parser.add_argument("--rounds", type=int, help="timed clone rounds per upstream (default 3, --quick 1)")
    parser.add_argument("--concurrent", type=int, help="concurrent clones of a small repo (default 200, --quick 50)")
    parser.add_argument("--idle", type=int, help="idle keep-alive connections (default 1000, --quick 200)")
    parser.add_argument("--latency", type=int, help="warm info/refs requests per path (default 300, --quick 60)")
    parser.add_argument("--lookups", type=int, help="warm token look-ups (default 100000, --quick 20000)")
    parser.add_argument("--stream-mib", type=int, help="size of the bare upstream's answer (default 512, --quick 128)")
    parser.add_argument("--no-tls", action="store_true", help="skip the TLS-upstream clones")
    parser.add_argument("--no-stream", action="store_true", help="skip the bare-upstream streaming case")
    parser.add_argument("--only-clone", action="store_true", help="only the big clones (for profiling runs)")
    parser.add_argument("--snapshots", action="store_true", help="also a fresh replica with a warm snapshot bucket")
    parser.add_argument(
        "--variant", action="append", default=[], metavar="LABEL:NAME=VALUE,...",
        help="one more proxy column, the same proxy started with these extra environment variables (PYTHONPATH=a "
        "checkout to compare two versions in one run, alternating); may be repeated",
    )  # fmt: skip
    parser.add_argument("--clone-timeout", type=float, default=300.0, help="seconds before one clone is abandoned")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")
    parser.add_argument(
        "--readme", action="store_true",
        help=f"also write the table (without --variant columns) into README.md between {README_BEGIN} and {README_END}",
    )  # fmt: skip
    args = parser.parse_args(argv)
    try:
        args.variants = {label: dict(pair.split("=", 1) for pair in assignments.split(",") if pair)
                         for label, _, assignments in (v.partition(":") for v in args.variant)}  # fmt: skip
    except ValueError:
        parser.error("--variant takes LABEL:NAME=VALUE[,NAME=VALUE...]")
    defaults = {"size_mib": (200, 50), "stream_mib": (512, 128), "rounds": (3, 1), "concurrent": (200, 50),
                "idle": (1000, 200), "latency": (300, 60), "lookups": (100_000, 20_000)}  # fmt: skip
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    return args


# ---------------------------------------------------------------- the world


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (as IP and as DNS name: nginx checks names only), made for this run."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address(HOST)), x509.DNSName(HOST)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert, key_file = directory / "upstream.crt", directory / "upstream.key"
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert, key_file


@dataclass
class Stack:
    """One upstream (plain or TLS) and the three ways to reach it."""

    kind: str
    fake: Server
    proxy: Server
    nginx: Server | None
    env: dict[str, str]
    variants: dict[str, Server] = field(default_factory=dict)

    def servers(self) -> dict[str, Server]:
        found = {"proxy": self.proxy}
        if self.nginx is not None:
            found["nginx"] = self.nginx
        return found | self.variants

    def paths(self) -> list[str]:
        return [path for path in PATHS if path != "nginx" or self.nginx is not None] + list(self.variants)

    def clone_url(self, path: str, repo: str) -> str:
        if path == "direct":
            scheme, _, host_port = self.fake.url.partition("://")
            return f"{scheme}://x-access-token:{TOKEN}@{host_port}/{repo}.git"
        return f"{self.servers()[path].url}/github.com/{repo}.git"


@contextlib.contextmanager
def stack(
    kind: str, root: Path, workdir: Path, nginx: str | None, tls: tuple[Path, Path] | None,
    variants: Mapping[str, Mapping[str, str]],
) -> Iterator[Stack]:  # fmt: skip
    ca = tls[0] if tls else None
    env = git_env(workdir / f"client-{kind}")
    if ca is not None:
        env["GIT_SSL_CAINFO"] = str(ca)
    with contextlib.ExitStack() as servers:
        fake = servers.enter_context(clone.fake_github_server(root, workdir, tls))
        proxy = servers.enter_context(clone.token_proxy_server(fake.url, workdir, ca, name=f"proxy-{kind}"))
        reverse = (
            servers.enter_context(clone.nginx_server(nginx, fake.url, workdir, ca, f"nginx-{kind}")) if nginx else None
        )
        log(f"{kind}: fake {fake.url}, proxy {proxy.url} (pid {proxy.pid})"
            + (f", nginx {reverse.url} (pid {reverse.pid})" if reverse else ""))  # fmt: skip
        others = {
            label: servers.enter_context(clone.token_proxy_server(fake.url, workdir, ca, f"{label}-{kind}", extra))
            for label, extra in variants.items()
        }
        yield Stack(kind, fake, proxy, reverse, env, others)


# ---------------------------------------------------------------- cases


@dataclass
class CloneResult:
    times: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)  # seconds, one figure per timed clone
    bytes_per_clone: int = 0
    peak_rss: dict[str, float | None] = field(default_factory=dict)


def clone_rounds(world: Stack, repo: clone.BigRepo, args: argparse.Namespace, scratch: Path) -> CloneResult:
    result = CloneResult(times={path: [] for path in world.paths()}, bytes_per_clone=repo.on_disk_bytes)
    pids = {path: server.pid for path, server in world.servers().items()}
    result.cpu = {path: [] for path in pids}
    for pid in pids.values():
        reset_peak_rss(pid)  # the peak while cloning, not the idle-connections case's before it
    for number in range(-1, args.rounds):  # one warm-up round
        for path in world.paths():
            before = cpu_seconds(pids[path]) if path in pids else None
            elapsed = clone.timed_clone(world.clone_url(path, REPO), scratch, world.env, repo.head, args.clone_timeout)
            label = "warm-up" if number < 0 else f"round {number + 1}/{args.rounds}"
            log(f"  {world.kind} {label:<10} {path:<6} {elapsed:7.2f}s")
            if number < 0:
                continue
            result.times[path].append(elapsed)
            if before is not None:
                result.cpu[path].append((cpu_seconds(pids[path]) or 0.0) - before)
    result.peak_rss = {path: proc_status_mib(pid, "VmHWM") for path, pid in pids.items()}
    return result


def info_refs_latency(world: Stack, count: int) -> dict[str, list[float]]:
    """Warm GET info/refs on one keep-alive connection per path, the paths taking turns; milliseconds."""
    credential = base64.b64encode(f"x-access-token:{TOKEN}".encode()).decode()
    targets: dict[str, tuple[str, str, dict[str, str]]] = {}
    headers = {"Git-Protocol": "version=2", "User-Agent": "git/2.bench"}
    for path in world.paths():
        url = world.fake.url if path == "direct" else world.servers()[path].url
        prefix = "" if path == "direct" else "/github.com"
        extra = {"Authorization": f"Basic {credential}"} if path == "direct" else {}
        targets[path] = (url.removeprefix("http://"), f"{prefix}/{SMALL_REPO}.git/info/refs?service=git-upload-pack",
                         headers | extra)  # fmt: skip
    connections = {
        path: http.client.HTTPConnection(hp, timeout=LATENCY_TIMEOUT) for path, (hp, _, _) in targets.items()
    }
    samples: dict[str, list[float]] = {path: [] for path in targets}
    try:
        order = list(targets)
        for number in range(-5, count):  # five warm-up requests open the connections and warm every cache
            # Each round starts one path later: the request that follows another path's waits on upstream tidying
            # up after it (a fixed order gave whichever path came second about 0.2 ms more, every time).
            for path in order[number % len(order) :] + order[: number % len(order)]:
                _, target, sent = targets[path]
                watch = Stopwatch()
                connections[path].request("GET", target, headers=sent)
                answer = connections[path].getresponse()
                answer.read()
                elapsed = watch.ms
                if answer.status != 200:
                    raise RuntimeError(f"info/refs through {path} answered {answer.status}")
                if number >= 0:
                    samples[path].append(elapsed)
    finally:
        for connection in connections.values():
            connection.close()
    return samples


def concurrent_clones(world: Stack, path: str, count: int, scratch: Path, timeout: float) -> tuple[float, int]:
    """`count` clones of the small repo at once; wall time and how many failed (or were still running at the end)."""
    url = world.clone_url(path, SMALL_REPO)
    target = Path(tempfile.mkdtemp(dir=scratch, prefix=f"many-{path}-"))
    watch = Stopwatch()
    processes = [
        subprocess.Popen(["git", "clone", "--quiet", "--bare", url, str(target / f"{index}.git")], env=world.env,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for index in range(count)
    ]  # fmt: skip
    errors = 0
    for process in processes:
        try:
            errors += process.wait(timeout=max(0.1, timeout - watch.seconds)) != 0
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            errors += 1
    elapsed = watch.seconds
    shutil.rmtree(target, ignore_errors=True)
    return elapsed, errors


async def _hold_idle(host_port: str, path: str, count: int) -> tuple[list[asyncio.StreamWriter], int]:
    host, _, port = host_port.rpartition(":")
    request = f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nUser-Agent: git/2.bench\r\n\r\n".encode()
    writers, failed = [], 0

    async def one() -> None:
        nonlocal failed
        try:
            reader, writer = await asyncio.open_connection(host, int(port))
            writers.append(writer)
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)  # fmt: skip
            await reader.readexactly(length)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            failed += 1

    for start in range(0, count, 100):  # in batches, so the listen backlog never overflows
        await asyncio.gather(*(one() for _ in range(start, min(count, start + 100))))
    return writers, failed


def idle_connections(server: Server, path: str, count: int) -> dict[str, float | int | None]:
    """RSS of the server before and while `count` keep-alive connections, each after one answered request, sit idle."""

    async def run() -> dict[str, float | int | None]:
        before = proc_status_mib(server.pid, "VmRSS")
        writers, failed = await asyncio.wait_for(
            _hold_idle(server.url.removeprefix("http://"), path, count), IDLE_TIMEOUT
        )
        await asyncio.sleep(0.5)
        after = proc_status_mib(server.pid, "VmRSS")
        for writer in writers:
            writer.close()
        return {"rss_before_mib": before, "rss_after_mib": after, "failed": failed}

    return asyncio.run(run())


# ---------------------------------------------------------------- the run


def machine() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    return (
        f"{cpus()} cores (nproc), {model}; Python {platform.python_version()}; {platform.system()} {platform.release()}"
    )


def benchmark(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    started = time.monotonic()
    root = workdir / "github"
    log(f"building {REPO}: {args.size_mib} MiB of random blobs ...")
    repo = clone.build_big_repo(root, args.size_mib, 2)
    FakeGitHub(root=root).create_repo(SMALL_REPO, {"README.md": b"small\n", "src/main.c": b"int main(){}\n" * 50})
    nginx = clone.find_nginx()
    results: dict[str, Any] = {
        "machine": machine(), "repo_mib": repo.on_disk_bytes / MIB, "args": vars(args),
        "nginx": nginx or "not installed (not on PATH or in /usr/sbin): its column is skipped",
        "clone": {}, "cpu_s_per_gib": {}, "peak_rss_mib": {},
    }  # fmt: skip
    scratch = workdir / "clones"
    scratch.mkdir()
    kinds: list[tuple[str, tuple[Path, Path] | None]] = [("plain", None)]
    if not args.no_tls:
        kinds.append(("tls", self_signed(workdir)))
    for kind, tls in kinds:
        with stack(kind, root, workdir, nginx, tls, args.variants) as world:
            # The clones come first, while each server is fresh: RSS that a case leaves behind (a thousand idle
            # connections' worth, say) stays with the process, and would be counted as the clones' peak.
            outcome = clone_rounds(world, repo, args, scratch)
            results["clone"][kind] = outcome.times
            # The median clone's CPU: chunk sizes, hence CPU per byte, vary with how the processes happen to be
            # scheduled, and a median shrugs off the odd clone.
            gib = outcome.bytes_per_clone / GIB
            results["cpu_s_per_gib"][kind] = {path: statistics.median(cpu) / gib for path, cpu in outcome.cpu.items()}
            results["cpu_s_per_clone"] = results.get("cpu_s_per_clone", {}) | {kind: outcome.cpu}
            results["peak_rss_mib"][kind] = outcome.peak_rss
            log(f"  {kind}: CPU s/GiB {results['cpu_s_per_gib'][kind]}, peak RSS {outcome.peak_rss}")
            if kind == "plain" and not args.only_clone:
                samples = info_refs_latency(world, args.latency)
                results["latency_ms"] = {path: {"p50": percentile(v, 0.5), "p99": percentile(v, 0.99)}
                                         for path, v in samples.items()}  # fmt: skip
                log(f"  info/refs latency: {results['latency_ms']}")
                results["concurrent"] = {}
                for server in world.servers().values():
                    reset_peak_rss(server.pid)
                for path in world.paths():
                    elapsed, errors = concurrent_clones(world, path, args.concurrent, scratch, args.clone_timeout)
                    results["concurrent"][path] = {"s": elapsed, "errors": errors}
                    log(f"  {args.concurrent} concurrent clones via {path}: {elapsed:.1f}s, {errors} errors")
                results["peak_rss_after_concurrent_mib"] = {
                    path: proc_status_mib(server.pid, "VmHWM") for path, server in world.servers().items()
                }
                probes = {"nginx": "/nginx-health"}
                results["idle"] = {name: idle_connections(server, probes.get(name, "/healthz"), args.idle)
                                   for name, server in world.servers().items()}  # fmt: skip
                log(f"  idle connections: {results['idle']}")
    if not args.only_clone and not args.no_stream:
        streamed = stream.stream_rounds(workdir, nginx, args.stream_mib, max(3, args.rounds), args.variants)
        results["stream"] = {
            mode: {"cpu_s_per_gib": {path: statistics.median(v) for path, v in r.cpu_s_per_gib.items()},
                   "s": {path: statistics.median(v) for path, v in r.seconds.items()}}
            for mode, r in streamed.items()
        }  # fmt: skip
    if args.snapshots:
        settings = snapshots.parse_args(["--rounds", str(args.rounds), "--clone-timeout", str(args.clone_timeout)])
        results["snapshots"] = snapshots.measure(repo, root, settings, workdir / "snapshots")
    if not args.only_clone:
        cold_ms, warm, static, _ = asyncio.run(token_lookup.figures(args.lookups))
        results["token_lookup"] = {"cold_ms": cold_ms, "warm_us": statistics.median(warm) / 1000,
                                   "static_us": statistics.median(static) / 1000}  # fmt: skip
    results["total_s"] = time.monotonic() - started
    return results


def render(results: Mapping[str, Any], variants: bool = True) -> str:
    args = results["args"]
    nginx_ok = not str(results["nginx"]).startswith("not installed")
    variant_paths: list[str] = list(args["variants"]) if variants else []
    paths = [path for path in PATHS if path != "nginx" or nginx_ok] + variant_paths
    rows: list[list[str]] = []

    def row(name: str, values: Mapping[str, str]) -> None:
        rows.append([name, *(values.get(path, "—") for path in paths)])

    for kind, times in results["clone"].items():
        medians = {path: statistics.median(values) for path, values in times.items()}
        upstream = "plain-HTTP" if kind == "plain" else "TLS"
        row(f"clone {results['repo_mib']:.0f} MiB, {upstream} upstream: median s",
            {path: f"{value:.2f}" for path, value in medians.items()})  # fmt: skip
        row(
            f"clone time vs direct ({upstream})",
            {path: f"{value / medians['direct']:.2f}" for path, value in medians.items()},
        )
        row(f"CPU s/GiB ({upstream})", {path: f"{value:.2f}" for path, value in results["cpu_s_per_gib"][kind].items()})
        row(f"peak RSS MiB, VmHWM ({upstream})",
            {path: f"{value:.1f}" for path, value in results["peak_rss_mib"][kind].items()
             if value is not None})  # fmt: skip
    for mode, figures in results.get("stream", {}).items():
        row(f"stream {args['stream_mib']} MiB from a bare upstream ({stream.MODE_LABELS[mode]}): CPU s/GiB",
            {path: f"{value:.2f}" for path, value in figures["cpu_s_per_gib"].items()})  # fmt: skip
        row(
            "  its wall time vs direct (the relay pinned to one core)",
            {path: f"{value / figures['s']['direct']:.2f}" for path, value in figures["s"].items()},
        )
    if "latency_ms" in results:
        latency = results["latency_ms"]
        direct = latency["direct"]
        row("warm info/refs p50 / p99 ms", {path: f"{v['p50']:.2f} / {v['p99']:.2f}" for path, v in latency.items()})
        row("  overhead vs direct p50 / p99 ms", {
            path: f"{v['p50'] - direct['p50']:+.2f} / {v['p99'] - direct['p99']:+.2f}"
            for path, v in latency.items() if path != "direct"})  # fmt: skip
    if "concurrent" in results:
        row(f"{args['concurrent']} concurrent clones: s, errors",
            {path: f"{v['s']:.1f} s, {v['errors']}" for path, v in results["concurrent"].items()})  # fmt: skip
        row(
            "  peak RSS MiB during them",
            {path: f"{v:.1f}" for path, v in results["peak_rss_after_concurrent_mib"].items()},
        )
    if "idle" in results:
        row(f"{args['idle']} idle keep-alive conns: RSS MiB before → after",
            {path: f"{v['rss_before_mib']:.1f} → {v['rss_after_mib']:.1f}"
             + (f" ({v['failed']} failed)" if v["failed"] else "") for path, v in results["idle"].items()})  # fmt: skip
    if "snapshots" in results:
        for name, values in snapshots.suite_rows(results["snapshots"]):
            row(name, values)
    if "token_lookup" in results:
        lookup = results["token_lookup"]
        row(
            "token look-up: warm App / static / cold mint",
            {"proxy": f"{lookup['warm_us']:.1f} µs / {lookup['static_us']:.1f} µs / {lookup['cold_ms']:.0f} ms"},
        )
    header = ["", *(LABELS.get(path, path) for path in paths)]
    lines = [
        f"Machine: {results['machine']}.",
        f"`python -m bench{' --quick' if args['quick'] else ''}{' --snapshots' if args.get('snapshots') else ''}`: "
        f"{args['rounds']} timed round(s) after one warm-up, "
        f"paths alternating, medians; CPU = utime+stime of the one nginx / proxy process from /proc/<pid>/stat "
        "over one clone, median clone.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(cells) + " |" for cells in rows),
        "",
    ]
    if not nginx_ok:
        lines.append(f"nginx: {results['nginx']}")
    lines.append(f"total wall time {results['total_s']:.0f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = in_scratch("bench-suite-", lambda folder: benchmark(args, folder))
    print_report(results, args.json, render)
    if args.readme:
        write_into_readme(render(results, variants=False))
    return 0


def write_into_readme(table: str, readme: Path = README) -> None:
    """Replaces what lies between the two markers, so that the README's figures are this command's, unedited."""
    text = readme.read_text()
    before, begin, rest = text.partition(README_BEGIN)
    _, end, after = rest.partition(README_END)
    if not begin or not end:
        raise SystemExit(f"{readme} has no {README_BEGIN} ... {README_END} section to write the table into")
    readme.write_text(f"{before}{README_BEGIN}\n{table}\n{README_END}{after}")
    log(f"wrote the table into {readme}")


if __name__ == "__main__":
    sys.exit(main())
