"""Guards at the edge: what every request must pass before anything else looks at it (the Host it names, and
whether a browser sent it). Git paths, LFS handles and the probes on the git port all pass here."""

from __future__ import annotations

import ipaddress
import logging
import time
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from multidict import CIMultiDictProxy

from ..errors import BadRequestPath, BrowserRequestRefused, MisdirectedRequest
from ..logs import sanitise_for_client

log = logging.getLogger("git_token_proxy.edge")

_LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "[::1]"})


def admit(request: web.Request, allowed_hosts: frozenset[str]) -> None:
    """What every request to a git path or an LFS handle must pass before anything looks at who sent it: not an
    absolute-form target, not a browser, a Host this proxy serves, and no body on a GET."""
    refuse_absolute_form(request)
    refuse_browsers(request.headers)
    check_host(request, allowed_hosts)
    refuse_body_on_get(request)


def refuse_body_on_get(request: web.Request) -> None:
    """git never sends a body with a GET. One that came with a body could only be an attempt to have the proxy
    put two requests on one upstream exchange (and a GET may be sent twice, after a token was renewed)."""
    if request.method == "GET" and request.body_exists:
        raise BadRequestPath("a GET request must not carry a body")


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
    if "%" in bare:
        return False  # an IPv6 zone id is text of any kind: not an address a probe would name
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


# ---------------------------------------------------------------- git pointed at the proxy the wrong way

_NOT_A_FORWARD_PROXY = (
    "git uses this proxy as an HTTP proxy (http.proxy or HTTP(S)_PROXY); it is not one. Point git at it with: %s"
)
HINT_EVERY = 60.0  # one log line a minute per kind of mistake: a build farm repeats it a thousand times


def insteadof_line(request: web.BaseRequest) -> str:
    """The `git config` line for the address this request reached the proxy on."""
    return f'git config --global url."http://{_local_address(request)}/github.com/".insteadOf "https://github.com/"'


def _local_address(request: web.BaseRequest) -> str:
    sockname = request.transport.get_extra_info("sockname") if request.transport is not None else None
    if not isinstance(sockname, tuple) or len(sockname) < 2:
        return "127.0.0.1:8080"
    host, port = str(sockname[0]), int(sockname[1])
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Hints:
    """Log lines, at most one a minute for each mistake, that tell an operator how git was pointed wrong."""

    def __init__(self) -> None:
        self._said_at: dict[str, float] = {}

    def say(self, kind: str, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._said_at.get(kind, -HINT_EVERY) >= HINT_EVERY:
            self._said_at[kind] = now
            log.warning(message, *args)


HINTS = web.AppKey("hints", Hints)


def refuse_absolute_form(request: web.Request) -> None:
    """`GET http://github.com/...`: git uses the proxy as an HTTP proxy (http.proxy, HTTP_PROXY) for an http://
    URL. The fix is insteadOf, not allowedHosts (whose hint the Host check would otherwise give)."""
    if request.raw_path.startswith("/"):
        return
    request.app[HINTS].say("absolute-form", f"a request for an absolute URL: {_NOT_A_FORWARD_PROXY}",
                           insteadof_line(request))  # fmt: skip
    raise BadRequestPath(
        "git-token-proxy is not an HTTP proxy: unset http.proxy / HTTP(S)_PROXY for it and point git at it with "
        f"url.insteadOf: {insteadof_line(request)}"
    )


def connect_refusal(request: web.Request) -> web.Response:
    """CONNECT carries an authority, not a path: git sends it when the proxy is its HTTP proxy for https:// URLs.
    curl shows git only `CONNECT tunnel failed, response 405`, so the log line is where the fix is read."""
    request.app[HINTS].say("connect", f"a CONNECT request: {_NOT_A_FORWARD_PROXY}", insteadof_line(request))
    text = (
        "CONNECT is not supported: git-token-proxy is not an HTTP proxy. Unset http.proxy / HTTPS_PROXY for it and "
        f"point git at it with url.insteadOf: {insteadof_line(request)}\n"
    )
    return web.Response(status=405, text=text)


class TlsOnPlainPort(AbstractAccessLogger):
    """aiohttp answers a TLS handshake on a plain-HTTP port with a 400 and logs it at debug only; git then says
    `gnutls_handshake() failed` (or `wrong version number`), which names nothing of the proxy. The only place
    the proxy sees it is this access-log hook, called for every answer: it looks at one status code, and says the
    fix for that one. (The audit line is the proxy's own log of requests.)"""

    def __init__(self, logger: logging.Logger, log_format: str) -> None:
        super().__init__(logger, log_format)
        self._hints = Hints()

    @property
    def enabled(self) -> bool:
        return True

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        if response.status != 400 or not isinstance(response, web.Response):
            return
        if b"HTTPS traffic on an HTTP port" not in (response.body if isinstance(response.body, bytes) else b""):
            return
        said = "a TLS handshake on the plain-HTTP port from %s: the insteadOf URL says https://, but the proxy speaks"
        self._hints.say("tls", f"{said} plain HTTP. Use: %s", request.remote, insteadof_line(request))


# What every runner of the proxy app passes to aiohttp's AppRunner: the hook above instead of an access log.
RUNNER_ARGS: dict[str, Any] = {"access_log_class": TlsOnPlainPort, "access_log": log}
