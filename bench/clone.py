"""Benchmark: time a large clone from a fake GitHub directly, through git-token-proxy, and through a plain nginx."""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import select
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bench.common import HOST, MIB, STARTUP_TIMEOUT, STOP_TIMEOUT, Stopwatch, in_scratch, log, log_tail
from proxy.testing import FakeGitHub, git_env, run_git_sync
from proxy.testing.process import free_port

REPO = "acme/big"
BRANCH = "main"
TOKEN = "bench-token-not-a-secret-0123456789"
FAKE_SERVER_SCRIPT = Path(__file__).resolve().with_name("_fake_github_server.py")

PATHS = ("direct", "proxy", "nginx")


# ---------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mib", type=int, default=200, help="total size of the random blobs (default 200)")
    parser.add_argument("--file-mib", type=int, default=2, help="size of each blob (default 2)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds, each cloning once per path (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first, to warm caches (default 1)")
    parser.add_argument("--clone-timeout", type=float, default=600.0, help="seconds before one clone is abandoned")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = parser.parse_args(argv)
    if args.size_mib < 1 or args.file_mib < 1 or args.rounds < 1 or args.warmup < 0:
        parser.error("sizes and --rounds must be positive, --warmup not negative")
    return args


# ---------------------------------------------------------------- the repo


@dataclass(frozen=True)
class BigRepo:
    head: str
    files: int
    payload_bytes: int
    on_disk_bytes: int


def build_big_repo(root: Path, size_mib: int, file_mib: int) -> BigRepo:
    """A bare `acme/big` in a FakeGitHub root: one commit of random, hence incompressible and undeltifiable, blobs."""
    fake = FakeGitHub(root=root)
    bare = fake.create_repo(REPO, branch=BRANCH)  # empty: its own files= path would hold every blob in memory
    env = git_env(root / "home")
    count = -(-size_mib // file_mib)  # ceiling division: never less payload than asked for
    with tempfile.TemporaryDirectory(dir=root) as work:
        worktree = Path(work)
        run_git_sync("init", "--quiet", f"--initial-branch={BRANCH}", env=env, cwd=worktree).check()
        write_random_files(worktree, count, file_mib * MIB)
        run_git_sync("add", "-A", env=env, cwd=worktree).check()
        run_git_sync("commit", "--quiet", "-m", "random blobs", env=env, cwd=worktree).check()
        # pack.window=0: a delta search between random blobs finds nothing and triples the set-up time.
        # The push leaves one pack in the bare repo, which upload-pack then reuses as is for every clone.
        run_git_sync("-c", "pack.window=0", "push", "--quiet", str(bare), BRANCH, env=env, cwd=worktree).check()
    head = run_git_sync("rev-parse", f"refs/heads/{BRANCH}", env=env, cwd=bare).check().stdout.strip()
    return BigRepo(head, count, count * file_mib * MIB, directory_bytes(bare / "objects"))


def write_random_files(directory: Path, count: int, size: int) -> None:
    for index in range(count):
        (directory / f"blob-{index:04d}.bin").write_bytes(os.urandom(size))


def directory_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


# ---------------------------------------------------------------- child processes


@dataclass
class Server:
    name: str
    process: subprocess.Popen[bytes]
    url: str
    log_file: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self) -> str:
        return log_tail(self.log_file)


@contextlib.contextmanager
def running(command: list[str], log_file: Path, **popen: Any) -> Iterator[subprocess.Popen[bytes]]:
    """Start a child; whatever happens afterwards, it is stopped before this block is left."""
    with log_file.open("wb") as sink:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stderr=sink, **popen)
        try:
            yield process
        finally:
            stop_process(process)


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()  # all three servers shut down cleanly on SIGTERM
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT)
    if process.stdout is not None:
        process.stdout.close()


def read_first_line(process: subprocess.Popen[bytes], timeout: float) -> str:
    """The child's first stdout line, or an error if it dies or stays silent: the parent must never hang here."""
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 0.2)
        if ready:
            return process.stdout.readline().decode().strip()
        if process.poll() is not None:
            break
    raise RuntimeError(f"process {process.args!r} printed nothing within {timeout:.0f}s (exit {process.poll()})")


# No proxies from the environment: this client must talk to 127.0.0.1 itself.
_LOCAL_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def wait_until_answering(
    url: str, process: subprocess.Popen[bytes], timeout: float = STARTUP_TIMEOUT, ca_file: Path | None = None
) -> None:
    """Poll `url` until any HTTP answer comes back; an error status still proves the server is up."""
    opener = _LOCAL_HTTP
    if ca_file is not None:
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}),
            urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=str(ca_file))),
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode} while starting")
        try:
            with opener.open(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f}s")


@contextlib.contextmanager
def fake_github_server(root: Path, workdir: Path, tls: tuple[Path, Path] | None = None) -> Iterator[Server]:
    """The fake in its own process; with `tls` (certificate, key) it serves HTTPS instead of HTTP."""
    command = [sys.executable, str(FAKE_SERVER_SCRIPT), "--root", str(root), "--token", TOKEN, "--host", HOST]
    if tls is not None:
        command += ["--cert", str(tls[0]), "--key", str(tls[1])]
    log_file = workdir / ("fake-github-tls.log" if tls else "fake-github.log")
    with running(command, log_file, stdout=subprocess.PIPE) as process:
        url = read_first_line(process, STARTUP_TIMEOUT)
        server = Server("fake-github", process, url, log_file)
        wait_until_answering(f"{url}/", process, ca_file=tls[0] if tls else None)
        yield server


def proxy_config(fake_url: str, ca_file: Path | None = None, push: Mapping[str, Any] | None = None) -> dict[str, Any]:
    config: dict[str, Any] = {
        "upstreams": [{"host": "github.com", "url": fake_url}],
        "github": {
            "appInstallation": {
                "auth": [
                    {
                        "id": "bench",
                        "type": "OAUTH_TOKEN",
                        "urlPattern": r"(?<baseUrl>github\.com)/acme/.*",
                        "token": TOKEN,
                    }
                ]
            }
        },
    }
    if ca_file is not None:
        config["tls"] = {"caFile": str(ca_file)}
    if push is not None:
        config["github"]["appInstallation"]["auth"][0]["push"] = dict(push)
    return config


def proxy_command() -> list[str]:
    # The installed console script is what users run; `python -m proxy` is the same code if it is not on PATH.
    script = shutil.which("git-token-proxy")
    return [script] if script else [sys.executable, "-m", "proxy"]


@contextlib.contextmanager
def token_proxy_server(
    fake_url: str, workdir: Path, ca_file: Path | None = None, name: str = "proxy",
    env: Mapping[str, str] | None = None, mirror_dir: Path | None = None, push: Mapping[str, Any] | None = None,
    access: Mapping[str, Any] | None = None,
) -> Iterator[Server]:  # fmt: skip
    """The proxy as users run it (the console script), with a static token for acme's repos; with `mirror_dir`, the
    mirror on; with `push`, that push policy on the entry; with `access`, that access section. `env` is added to
    this process's environment."""
    config = proxy_config(fake_url, ca_file, push)
    if access is not None:
        config["access"] = dict(access)
    if mirror_dir is not None:
        config["mirror"] = {"dir": str(mirror_dir)}
    config_file = workdir / f"{name}.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    port = free_port()
    # Another checkout (a --variant's PYTHONPATH) runs as `python -m proxy`: the installed script's entry point is
    # this tree's, which an older checkout may not have.
    launcher = [sys.executable, "-m", "proxy"] if env and "PYTHONPATH" in env else proxy_command()
    command = [
        *launcher, "serve", "--config", str(config_file), "--host", HOST, "--port", str(port),
        "--log-level", "WARNING",
    ]  # fmt: skip
    log_file = workdir / f"{name}.log"
    extra = {} if env is None else {"env": {**os.environ, **env}}
    with running(command, log_file, stdout=subprocess.DEVNULL, **extra) as process:
        url = f"http://{HOST}:{port}"
        wait_until_answering(f"{url}/healthz", process)
        yield Server("git-token-proxy", process, url, log_file)


def find_nginx() -> str | None:
    # /usr/sbin is often missing from an unprivileged user's PATH although nginx is installed there.
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")


def nginx_config(fake_url: str, port: int, prefix: Path, ca_file: Path | None = None) -> str:
    credential = base64.b64encode(f"x-access-token:{TOKEN}".encode()).decode()
    # master_process off: one process does all the work, so its VmHWM is nginx's whole footprint and one
    # SIGTERM stops it. Temp paths point into the prefix so nothing outside it is written or needs root.
    verify = (
        f"proxy_ssl_trusted_certificate {ca_file};\n            proxy_ssl_verify on;\n            "
        "proxy_ssl_session_reuse on;"
        if ca_file
        else ""
    )
    return f"""\
daemon off;
master_process off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
worker_rlimit_nofile 8192;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy_temp;
    fastcgi_temp_path {prefix}/fastcgi_temp;
    uwsgi_temp_path {prefix}/uwsgi_temp;
    scgi_temp_path {prefix}/scgi_temp;
    client_max_body_size 0;
    server {{
        listen {HOST}:{port};
        # Answered by nginx itself, so the readiness probe neither reaches the fake nor logs a 404.
        location = /nginx-health {{ return 204; }}
        location /github.com/ {{
            proxy_pass {fake_url}/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Basic {credential}";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 600s;
            {verify}
        }}
    }}
}}
"""


@contextlib.contextmanager
def nginx_server(
    nginx: str, fake_url: str, workdir: Path, ca_file: Path | None = None, name: str = "nginx"
) -> Iterator[Server]:
    prefix = workdir / name
    prefix.mkdir()
    port = free_port()
    config_file = prefix / "nginx.conf"
    config_file.write_text(nginx_config(fake_url, port, prefix, ca_file))
    # -e: the error log before the config is read, otherwise nginx tries /var/log/nginx/error.log first.
    command = [nginx, "-p", str(prefix), "-c", str(config_file), "-e", str(prefix / "error.log")]
    with running(command, prefix / "stderr.log", stdout=subprocess.DEVNULL) as process:
        url = f"http://{HOST}:{port}"
        wait_until_answering(f"{url}/nginx-health", process)
        yield Server("nginx", process, url, prefix / "error.log")


# ---------------------------------------------------------------- /proc


def proc_status_mib(pid: int, field: str) -> float | None:
    """A `kB` line of /proc/<pid>/status in MiB; VmHWM is the peak resident set since the process started."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_rss(pid: int) -> None:
    """Sets VmHWM back to the current RSS (Linux 4.0+), so that a peak read later belongs to what ran since."""
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of the process itself (not its children), from /proc/<pid>/stat."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # the command name may contain spaces; fields follow its ")"
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- cloning


def clone_urls(fake: Server, proxy: Server, nginx: Server | None) -> dict[str, str]:
    host_port = fake.url.removeprefix("http://")
    urls = {
        "direct": f"http://x-access-token:{TOKEN}@{host_port}/{REPO}.git",
        "proxy": f"{proxy.url}/github.com/{REPO}.git",
    }
    if nginx is not None:
        urls["nginx"] = f"{nginx.url}/github.com/{REPO}.git"
    return urls


def timed_clone(url: str, scratch: Path, env: Mapping[str, str], expected_head: str, timeout: float) -> float:
    """Seconds for one bare clone into a fresh directory, after checking it holds the expected commit."""
    destination = Path(tempfile.mkdtemp(dir=scratch, prefix="clone-")) / "big.git"
    try:
        watch = Stopwatch()
        # --bare: no checkout, so the time is the transfer plus index-pack, which is what a proxy can affect.
        done = subprocess.run(
            ["git", "clone", "--quiet", "--bare", url, str(destination)],
            env=dict(env), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        elapsed = watch.seconds
        if done.returncode != 0:
            raise RuntimeError(f"clone of {redact(url)} failed ({done.returncode}): {done.stderr.strip()}")
        head = run_git_sync("rev-parse", "HEAD", env=env, cwd=destination).check().stdout.strip()
        if head != expected_head:
            raise RuntimeError(f"clone of {redact(url)} has HEAD {head}, expected {expected_head}")
        return elapsed
    finally:
        shutil.rmtree(destination.parent, ignore_errors=True)  # 200 MiB per clone adds up quickly


def redact(url: str) -> str:
    return url.replace(TOKEN, "***")


def run_rounds(
    urls: Mapping[str, str], rounds: int, warmup: int, scratch: Path, env: Mapping[str, str], head: str, timeout: float
) -> dict[str, list[float]]:
    """Paths alternate inside each round, so drift (page cache, CPU clocks) hits all of them alike."""
    times: dict[str, list[float]] = {path: [] for path in urls}
    for number in range(-warmup, rounds):
        label = f"warm-up {number + warmup + 1}/{warmup}" if number < 0 else f"round {number + 1}/{rounds}"
        for path, url in urls.items():
            elapsed = timed_clone(url, scratch, env, head, timeout)
            log(f"  {label}  {path:<6} {elapsed:7.2f}s")
            if number >= 0:
                times[path].append(elapsed)
    return times


# ---------------------------------------------------------------- results


def summarize(
    repo: BigRepo, times: Mapping[str, list[float]], servers: list[Server], nginx_note: str | None, elapsed: float
) -> dict[str, Any]:
    medians = {path: statistics.median(values) for path, values in times.items()}
    ratios = {"proxy/direct": medians["proxy"] / medians["direct"]}
    if "nginx" in medians:
        ratios["proxy/nginx"] = medians["proxy"] / medians["nginx"]
    return {
        "repo": {
            "name": REPO,
            "head": repo.head,
            "files": repo.files,
            "payload_mib": repo.payload_bytes / MIB,
            "on_disk_mib": repo.on_disk_bytes / MIB,
        },
        "times_s": dict(times),
        "median_s": medians,
        "throughput_mib_s": {path: repo.on_disk_bytes / MIB / median for path, median in medians.items()},
        "ratios": ratios,
        "processes": {
            server.name: {
                "pid": server.pid,
                "peak_rss_mib": proc_status_mib(server.pid, "VmHWM"),
                "rss_now_mib": proc_status_mib(server.pid, "VmRSS"),
                "cpu_s": cpu_seconds(server.pid),
            }
            for server in servers
        },
        "nginx_skipped": nginx_note,
        "total_s": elapsed,
    }


def render_table(results: Mapping[str, Any]) -> str:
    repo, times, medians = results["repo"], results["times_s"], results["median_s"]
    paths = list(times)
    rounds = len(times[paths[0]])
    lines = [
        f"repo {repo['name']}: {repo['files']} random blobs, {repo['payload_mib']:.0f} MiB payload, "
        f"{repo['on_disk_mib']:.1f} MiB on disk; HEAD {repo['head'][:12]}",
        "",
        "clone time (s)  " + "".join(f"{path:>10}" for path in paths),
    ]
    for index in range(rounds):
        lines.append(f"round {index + 1:<10}" + "".join(f"{times[path][index]:>10.2f}" for path in paths))
    lines.append("median          " + "".join(f"{medians[path]:>10.2f}" for path in paths))
    lines.append("MiB/s (median)  " + "".join(f"{results['throughput_mib_s'][path]:>10.1f}" for path in paths))
    lines.append("")
    lines.append("ratios of medians: " + ", ".join(f"{name} {value:.2f}x" for name, value in results["ratios"].items()))
    if results["nginx_skipped"]:
        lines.append(f"nginx column skipped: {results['nginx_skipped']}")
    lines.append("")
    lines.append(f"{'process':<18}{'peak RSS MiB':>14}{'RSS now MiB':>14}{'CPU s':>10}")
    for name, stats in results["processes"].items():
        peak, now, cpu = stats["peak_rss_mib"], stats["rss_now_mib"], stats["cpu_s"]
        lines.append(f"{name:<18}{fmt(peak, 14, 1)}{fmt(now, 14, 1)}{fmt(cpu, 10, 2)}")
    lines.append("(fake-github's figures exclude the git http-backend/upload-pack children it spawns per request)")
    lines.append(f"total wall time {results['total_s']:.0f}s")
    return "\n".join(lines)


def fmt(value: float | None, width: int, decimals: int) -> str:
    return f"{value:>{width}.{decimals}f}" if value is not None else f"{'n/a':>{width}}"


# ---------------------------------------------------------------- main


def benchmark(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    started = time.monotonic()
    root = workdir / "github"
    log(f"building {REPO}: {args.size_mib} MiB of random blobs in {args.file_mib} MiB files ...")
    repo = build_big_repo(root, args.size_mib, args.file_mib)
    log(f"  done in {time.monotonic() - started:.1f}s, {repo.on_disk_bytes / MIB:.1f} MiB on disk")
    nginx = find_nginx()
    nginx_note = None if nginx else "nginx is not installed (not on PATH or in /usr/sbin)"
    scratch = workdir / "clones"
    scratch.mkdir()
    client_env = git_env(workdir / "client-home")
    with contextlib.ExitStack() as servers:
        fake = servers.enter_context(fake_github_server(root, workdir))
        proxy = servers.enter_context(token_proxy_server(fake.url, workdir))
        reverse = servers.enter_context(nginx_server(nginx, fake.url, workdir)) if nginx else None
        started_servers = [server for server in (fake, proxy, reverse) if server is not None]
        log(f"servers: {', '.join(f'{s.name} {s.url} (pid {s.pid})' for s in started_servers)}")
        try:
            times = run_rounds(
                clone_urls(fake, proxy, reverse), args.rounds, args.warmup, scratch, client_env, repo.head,
                args.clone_timeout,
            )  # fmt: skip
        except Exception:
            for server in started_servers:
                log(f"--- last lines of {server.name} log ({server.log_file}):\n{server.log_tail()}")
            raise
        # Read /proc while the servers are still alive: after they exit their status files are gone.
        results = summarize(repo, times, started_servers, nginx_note, time.monotonic() - started)
        results["server_warnings"] = {s.name: s.log_tail() for s in started_servers if s.log_tail().strip()}
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = in_scratch("bench-clone-", lambda folder: benchmark(args, folder))
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(render_table(results))
        for name, tail in results["server_warnings"].items():
            print(f"\n{name} log (last lines):\n{tail}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
