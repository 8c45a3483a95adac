"""Errors a user can act on. Each type stands for one reason; `forward` alone turns them into HTTP statuses."""

from __future__ import annotations


class ProxyError(Exception):
    """Base: the message is shown to git users as `remote: <message>`, so it must never hold a secret."""


# ---- refused before anything leaves the proxy (routing)


class BadRequestPath(ProxyError):
    """The path is malformed: encoded characters, `..`, empty segments, too long."""


class NotAGitEndpoint(ProxyError):
    """Anything but the smart-HTTP and LFS endpoints; the token is only ever used for git."""


class MethodNotAllowed(ProxyError):
    """A git endpoint asked for with the wrong method."""


class HostNotAllowed(ProxyError):
    """The host is not in `upstreams`; no connection is opened."""


class AnonymousRefused(ProxyError):
    """No auth entry matches and the upstream has `anonymous: false`."""


# ---- credentials


class CredentialError(ProxyError):
    """A token could not be had for this repo; the message says why."""


# ---- upstream


class UpstreamUnreachable(ProxyError):
    """Connecting to the upstream failed (DNS, refused, TLS)."""


class UpstreamTimeout(ProxyError):
    """The upstream stopped answering within the configured timeout."""


class UpstreamRefusedAuth(ProxyError):
    """The upstream answered 401 although the proxy sent a credential."""


class UpstreamNeedsAuth(ProxyError):
    """The upstream answered 401 to a request that no auth entry covers."""


class UpstreamBadRedirect(ProxyError):
    """The upstream redirected somewhere the proxy will not follow or pass on."""
