"""Guards at the edge: what every request must pass before anything else looks at it (the Host it names, and
whether a browser sent it). Git paths, LFS handles and the probes on the git port all pass here."""

from __future__ import annotations

import ipaddress

from aiohttp import web
from multidict import CIMultiDictProxy

from .errors import BrowserRequestRefused, MisdirectedRequest
from .logs import sanitise_for_client

_LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "[::1]"})


def check_host(request: web.Request, allowed_hosts: frozenset[str], ip_literals: bool = False) -> None:
    """DNS rebinding: a web page on `rebind.attacker.example` whose name now points at 127.0.0.1 is same-origin
    with this proxy, and a plain GET from it carries no Origin. But its Host header still names the attacker's
    domain, while git always sends the host it connected to. So only loopback names and the names the operator
    listed are served.

    `ip_literals`: any IP address too (the probes: kubelet sends the pod's IP as Host). Rebinding always carries
    the attacker's *name*, never an address, so an address is no way in."""
    hosts = request.headers.getall("Host", ())
    value = hosts[0].strip().lower() if len(hosts) == 1 else ""
    host, _, port = value.rpartition(":")
    name = host if port.isascii() and port.isdigit() else value
    if value and (name in _LOOPBACK_NAMES or value in allowed_hosts or name in allowed_hosts):
        return
    if value and ip_literals and _is_ip_literal(name):
        return
    shown = sanitise_for_client(value, 100) if value else "(none)"
    raise MisdirectedRequest(
        f"Host {shown!r} is not served by this proxy; use 127.0.0.1, localhost or [::1], "
        "or add the name to server.allowedHosts"
    )


def _is_ip_literal(name: str) -> bool:
    bare = name[1:-1] if name.startswith("[") and name.endswith("]") else name
    try:
        ipaddress.ip_address(bare)
    except ValueError:
        return False
    return True


def refuse_browsers(headers: CIMultiDictProxy[str]) -> None:
    """A web page can reach 127.0.0.1 too (DNS rebinding makes it same-origin). Browsers always mark their
    requests with Origin or Sec-Fetch-*; git never does. So such a request never gets near a token."""
    if "Origin" in headers or any(name.lower().startswith("sec-fetch-") for name in headers):
        raise BrowserRequestRefused("requests from web browsers are refused; this proxy serves git clients only")
