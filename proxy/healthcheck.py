"""Healthcheck: ask a running proxy's /healthz (or /readyz), found from the same config, variables and flags as
`serve`, so that Docker's HEALTHCHECK follows whatever port the proxy was given."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

from .config.environment import LoadedConfig, client_address

PID1_CMDLINE = Path("/proc/1/cmdline")


def probe_url(loaded: LoadedConfig, ready: bool) -> str:
    """The ops port when there is one (the git port then serves /healthz too, but the ops port is what probes
    are for), else the git port; a wildcard listen address is asked on loopback."""
    server = loaded.config.server
    if server.metrics_port is not None:
        return address_url(server.metrics_host or loaded.host, server.metrics_port, ready)
    return address_url(loaded.host, loaded.port, ready)


def address_url(host: str, port: int, ready: bool) -> str:
    return f"http://{client_address(host, port)}/{'readyz' if ready else 'healthz'}"


def probe(url: str, timeout: float) -> int:
    """0 when the proxy answers 200; 1 otherwise. One line either way."""
    # No proxy handler: an HTTP_PROXY in the container's environment must not carry a loopback probe away.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            print(f"{url}: {response.read(200).decode(errors='replace').strip()}")
            return 0
    except urllib.error.HTTPError as error:
        with error:
            print(f"{url}: HTTP {error.code}: {error.read(200).decode(errors='replace').strip()}")
        return 1
    except (OSError, ValueError) as error:
        reason = getattr(error, "reason", None) or error
        print(f"{url}: not answering ({reason})")
        return 1


def serve_argv_of(cmdline: bytes) -> list[str] | None:
    """The arguments after `serve` when a command line is git-token-proxy's `serve` (as the entry point, or as
    `python -m proxy`, possibly behind an init such as tini); None for any other command."""
    argv = [part.decode(errors="replace") for part in cmdline.split(b"\0") if part]
    for index, part in enumerate(argv):
        if part == "serve" and any(a.endswith("git-token-proxy") or a == "proxy" for a in argv[:index]):
            return argv[index + 1 :]
    return None


def serve_args_of_pid1() -> list[str] | None:
    try:
        return serve_argv_of(PID1_CMDLINE.read_bytes())
    except OSError:
        return None
