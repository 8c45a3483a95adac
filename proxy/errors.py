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


class MisdirectedRequest(ProxyError):
    """The `Host` header names neither a loopback address nor one of `server.allowedHosts` (DNS rebinding)."""


class RequestBodyRefused(ProxyError):
    """A body the proxy must inspect (an LFS batch request) is too large, malformed, or arrived too slowly."""


class BrowserRequestRefused(ProxyError):
    """A request with browser headers (Origin, Sec-Fetch-*): git never sends them; a web page must not use tokens."""


class AnonymousRefused(ProxyError):
    """No auth entry matches and the upstream has `anonymous: false`."""


# ---- access control (who may use the proxy)


class AuthenticationRequired(ProxyError):
    """Access control is on and the client sent no valid token: the one 401 this proxy ever sends."""


class ClientForbidden(ProxyError):
    """The client's token is valid, but not for this repo."""


class ReadOnlyRefused(ProxyError):
    """A push (receive-pack, an LFS lock) through a read-only client or auth entry."""


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


class PushNotPermitted(ProxyError):
    """Upstream refused a push (403) with a token the proxy knows lacks the permission to push."""


class ProxyBusy(ProxyError):
    """No upstream connection could be had for a request body in time (server.maxUpstreamConnections)."""


class UpstreamBadRedirect(ProxyError):
    """The upstream redirected somewhere the proxy will not follow or pass on."""


class HealSuspended(CredentialError):
    """Upstream rejected a freshly minted token as well: no further mint for this installation for a while."""


class UpstreamBadResponse(ProxyError):
    """The upstream answered with something that cannot be passed on (a control character in a header)."""


class AppNotInstalled(CredentialError):
    """The GitHub App is not installed on the repo, or cannot see it."""


class JwtRejected(CredentialError):
    """GitHub refused the app's JWT: wrong key, wrong issuer, or a clock too far off."""


class RateLimited(CredentialError):
    """GitHub's API rate limit is reached for longer than it is worth waiting."""


class GitHubUnavailable(CredentialError):
    """GitHub's API failed (5xx, timeouts, connection errors) on every try."""


class GitHubRefused(CredentialError):
    """GitHub's API answered with an error that retrying will not fix (e.g. 422 for a permission not granted)."""


class MalformedAnswer(GitHubRefused):
    """GitHub said yes, but in a shape that cannot be used. After a mint, it means a token was made and lost, so
    the source pauses before minting again (a `GitHubRefused` for everyone else: a 502)."""


class InstallationGone(CredentialError):
    """Minting answered 404: the installation id is stale (the app was reinstalled)."""

    def __init__(self, installation_id: int, message: str) -> None:
        super().__init__(message)
        self.installation_id = installation_id
