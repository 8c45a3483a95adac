"""Errors a user can act on. Each type stands for one reason and carries the HTTP status git gets for it (as
aiohttp's `web_exceptions` do); every reason the proxy gives lives here."""

from __future__ import annotations


class ProxyError(Exception):
    """Base: the message is shown to git users as `remote: <message>`, so it must never hold a secret. `status`
    is what git gets; a subclass that says nothing has its parent's. 4xx: the request (or its client) is refused;
    5xx: something upstream of the proxy failed, and the reason says what."""

    status = 502


# ---- refused before anything leaves the proxy (routing)


class BadRequestPath(ProxyError):
    """The path is malformed: encoded characters, `..`, empty segments, too long."""

    status = 400


class NotAGitEndpoint(ProxyError):
    """Anything but the smart-HTTP and LFS endpoints; the token is only ever used for git."""

    status = 404


class MethodNotAllowed(ProxyError):
    """A git endpoint asked for with the wrong method."""

    status = 405


class HostNotAllowed(ProxyError):
    """The host is not in `upstreams`; no connection is opened."""

    status = 403


class MisdirectedRequest(ProxyError):
    """The `Host` header names neither a loopback address nor one of `server.allowedHosts` (DNS rebinding)."""

    status = 421


class RequestBodyRefused(ProxyError):
    """A body the proxy must inspect (an LFS batch request) is too large, malformed, or arrived too slowly."""

    status = 400


class BrowserRequestRefused(ProxyError):
    """A request with browser headers (Origin, Sec-Fetch-*): git never sends them; a web page must not use tokens."""

    status = 403


class AnonymousRefused(ProxyError):
    """No auth entry matches and the upstream has `anonymous: false`."""

    status = 403


# ---- access control (who may use the proxy)


class AuthenticationRequired(ProxyError):
    """Access control is on and the client sent no valid token: the one 401 this proxy ever sends."""

    status = 401


class TokenRefused(AuthenticationRequired):
    """A JWT was presented and refused: a bad signature, expired, the wrong audience, a failing claims rule, ...
    A 401 like every refusal of a credential, with the reason as its one line."""

    status = 401


class ClientForbidden(ProxyError):
    """The client's token is valid, but not for this repo."""

    status = 403


class ReadOnlyRefused(ProxyError):
    """A push (receive-pack, an LFS lock) through a read-only client or auth entry."""

    status = 403


# ---- credentials


class CredentialError(ProxyError):
    """A token could not be had for this repo; the message says why."""

    status = 502


# ---- upstream


class UpstreamUnreachable(ProxyError):
    """Connecting to the upstream failed (DNS, refused, TLS)."""

    status = 502


class UpstreamTimeout(ProxyError):
    """The upstream stopped answering within the configured timeout."""

    status = 504


class UpstreamRefusedAuth(ProxyError):
    """The upstream answered 401 although the proxy sent a credential."""

    status = 502


class UpstreamNeedsAuth(ProxyError):
    """The upstream answered 401 to a request that no auth entry covers."""

    status = 403


class PushRefused(ProxyError):
    """A push policy refuses what an LFS request would do (an upload, a lock on a ref outside the policy). A
    receive-pack push it refuses is answered in git's own words instead (`[remote rejected]`, see forward.push)."""

    status = 403


class PushNotPermitted(ProxyError):
    """Upstream refused a push (403) with a token the proxy knows lacks the permission to push."""

    status = 403


class ProxyBusy(ProxyError):
    """No upstream connection could be had for a request body in time (server.maxUpstreamConnections)."""

    status = 503


class UpstreamBadRedirect(ProxyError):
    """The upstream redirected somewhere the proxy will not follow or pass on."""

    status = 502


class HealSuspended(CredentialError):
    """Upstream rejected a freshly minted token as well: no further mint for this installation for a while."""

    status = 502


class UpstreamBadResponse(ProxyError):
    """The upstream answered with something that cannot be passed on (a control character in a header)."""

    status = 502


class AppNotInstalled(CredentialError):
    """The GitHub App is not installed on the repo, or cannot see it."""

    status = 403


class JwtRejected(CredentialError):
    """GitHub refused the app's JWT: wrong key, wrong issuer, or a clock too far off."""

    status = 502


class RateLimited(CredentialError):
    """GitHub's API rate limit is reached for longer than it is worth waiting."""

    status = 503


class GitHubUnavailable(CredentialError):
    """GitHub's API failed (5xx, timeouts, connection errors) on every try."""

    status = 503


class GitHubRefused(CredentialError):
    """GitHub's API answered with an error that retrying will not fix (e.g. 422 for a permission not granted)."""

    status = 502


class MalformedAnswer(GitHubRefused):
    """GitHub said yes, but in a shape that cannot be used. After a mint, it means a token was made and lost, so
    the source pauses before minting again (a `GitHubRefused` for everyone else: a 502)."""

    status = 502


class InstallationGone(CredentialError):
    """Minting answered 404: the installation id is stale (the app was reinstalled)."""

    status = 502

    def __init__(self, installation_id: int, message: str) -> None:
        super().__init__(message)
        self.installation_id = installation_id


# ---- LFS objects through the proxy (lfs.proxyObjects)


class HandleRefused(ProxyError):
    """An /_lfs/ handle that is unknown, expired, or was given to another client."""

    status = 404


class StorageRefused(ProxyError):
    """The storage host answered a handle's request with anything but success (its body is not passed on: an
    S3 error quotes the signature it refused)."""

    status = 502
