"""Server: where the proxy listens and how it guards its port; readiness."""

from __future__ import annotations

import ipaddress

from pydantic import Field

from .base import ConfigError, Model
from .units import Duration, PositiveDuration, Size


class ServerConfig(Model):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    # Without access.clients, anyone who can reach the port uses the tokens: only loopback is allowed by default.
    allow_unauthenticated: bool = False
    # A request's headers must be complete this long after the connection opened (or the last response): a client
    # dribbling bytes (slowloris) is cut off. Also the idle timeout of keep-alive connections.
    header_timeout: PositiveDuration = 15.0
    # Concurrent connections to upstreams, all hosts together; requests beyond it wait for a free one.
    max_upstream_connections: int = Field(default=512, ge=1)
    # On SIGTERM: stop accepting, let transfers finish for this long, then exit.
    shutdown_grace: PositiveDuration = 30.0
    # On SIGTERM, keep accepting this long first, with /readyz at 503 "draining" (on the git port too), so that a
    # load balancer stops sending new clones before the listener closes. 0: close at once.
    drain_delay: Duration = 0.0
    # /metrics, /healthz and /readyz on a port of their own (which stays up while git traffic drains).
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    metrics_host: str | None = None  # default: server.host
    # Host names (with or without :port) that clients may use besides loopback ones: a request whose Host header
    # names anything else is refused, so a web page cannot reach the proxy through DNS rebinding.
    allowed_hosts: list[str] = Field(default_factory=list)
    # A client that reads nothing of its response for this long has its transfer aborted on both sides, so that a
    # stuck client cannot hold an upstream connection for ever.
    write_timeout: PositiveDuration = 300.0
    # A request body still arriving must average at least this many bytes a second over each 30 s (or writeTimeout,
    # if shorter): a client dripping a byte now and then is never quiet for writeTimeout, but would hold an upstream
    # connection for as long as it likes. 0: no floor.
    min_body_rate: Size = 1024
    # A client that holds up an answer (bytes wait for it to read them) must read at least this many bytes a second
    # over each such 30 s: a client that reads a trickle is never quiet for writeTimeout, and would hold an upstream
    # connection for hours. 4 KiB/s is slower than any link git is used over. 0: no floor.
    min_answer_rate: Size = 4096

    def refuse_unsafe_bind(self, host: str, has_clients: bool) -> None:
        if has_clients or self.allow_unauthenticated or is_loopback(host):
            return
        raise ConfigError(
            f"server.host {host!r} is not a loopback address and access control is off: every process that can "
            "reach it could use this proxy's GitHub tokens. Configure access.clients or access.issuers, or set "
            "server.allowUnauthenticated: true if the network itself is the boundary (e.g. a pod's own interface)."
        )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ReadinessConfig(Model):
    # /readyz also needs a recent successful GET /app for every app entry.
    check_github: bool = Field(default=False, alias="checkGitHub")
    interval: PositiveDuration = 60.0  # how often that check runs
    max_age: PositiveDuration = 300.0  # how recent a success must be
