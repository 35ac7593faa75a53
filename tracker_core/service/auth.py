"""Who may call the API, from where: bearer tokens, scopes, allowed hosts, cross-site refusal.

Every request passes :class:`AccessMiddleware` before any route reads it:

1. its ``Host`` must be an allowed host (else 400), so a web page cannot reach a local API
   through DNS rebinding; the default is the bound address's names plus localhost/127.0.0.1;
2. a POST (any unsafe method) from another site is refused (403): an ``Origin`` that is not
   this API's, or ``Sec-Fetch-Site`` other than ``same-origin``/``none``; one without an
   ``Authorization`` header must also say ``Content-Type: application/json`` (else 415),
   which a cross-site form or ``fetch`` cannot send without a CORS preflight this API never
   grants;
3. except on the public paths (``/health`` and the docs), a valid ``Authorization: Bearer``
   token is needed (401 with ``WWW-Authenticate: Bearer``), unless auth is off
   (:class:`AuthMode`). Each route then names the :class:`~tracker_core.service.tokens.Scope`
   it needs with :func:`requires` (403 when the token's scope does not grant it).

:func:`startup_notice` decides, once at start, whether ``serve`` may start as configured.
(No ``from __future__ import annotations`` here: FastAPI reads :func:`requires`' signature.)
"""

import enum
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Annotated, Any
from urllib.parse import urlsplit

import attrs
from fastapi import Depends, HTTPException, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from tracker_core.service.errors import ServiceConfigurationError
from tracker_core.service.gate import DatabaseGate, DatabaseUnavailable
from tracker_core.service.outage import is_outage
from tracker_core.service.settings import ServiceSettings
from tracker_core.service.tokens import Principal, Scope, TokenStore, count_active

__all__ = [
    "PUBLIC_PATHS",
    "AccessMiddleware",
    "AccessPolicy",
    "AuthMode",
    "is_loopback",
    "requires",
    "startup_notice",
]

log = logging.getLogger(__name__)

#: answered without a token: the health check, and the docs (the same for every install;
#: Swagger UI's "Authorize" button takes a token for the calls it makes)
PUBLIC_PATHS = frozenset({"/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
#: where the docs' own scripts and styles are served from (fastapi-offline's static files)
DOCS_STATIC = "/static-offline-docs"
_UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_SAME_SITE = frozenset({"same-origin", "none"})
_ANONYMOUS = Principal(None, Scope.ADMIN)
_TOKEN_HINT = (
    "send 'Authorization: Bearer <token>' (tracker-core token create makes one; the "
    "tracker-core task commands read it from $TRACKER_CORE_TOKEN or --token-file)"
)

ASGIApp = Callable[
    [MutableMapping[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
    Awaitable[None],
]


class AuthMode(enum.Enum):
    """How the API authenticates requests."""

    #: every request but the public paths needs a token (any address but loopback)
    TOKENS = "tokens"
    #: on loopback: a token is needed once one exists; until then requests need none
    LOOPBACK = "loopback"
    #: ``--insecure-no-auth``: no token needed (a token given is still checked and named)
    OFF = "off"


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address to bind) is reachable from this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _bound_names(host: str) -> set[str]:
    """The names a client of this machine may use for an API bound to ``host``."""
    names = {"localhost", "127.0.0.1", "::1"}
    if host in ("", "0.0.0.0", "::"):  # every address of this machine
        import psutil

        names |= {socket.gethostname(), socket.getfqdn()}
        for addresses in psutil.net_if_addrs().values():
            names |= {a.address.split("%", 1)[0] for a in addresses if a.family in _INET}
    else:
        names.add(host.strip("[]"))
    return {n.lower().rstrip(".") for n in names if n}


_INET = (socket.AF_INET, socket.AF_INET6)


def _host_name(header: str) -> str:
    """The host of a ``Host`` header value (``name:port``, ``[v6]:port``), lower case."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    if header.count(":") == 1:
        header = header.split(":", 1)[0]
    return header.rstrip(".")


@attrs.frozen
class AccessPolicy:
    """The access rules of one API process (see the module docstring)."""

    mode: AuthMode
    #: lower-case host names a request's ``Host`` may name; ``*`` allows any
    allowed_hosts: frozenset[str]

    @classmethod
    def for_settings(cls, settings: ServiceSettings) -> "AccessPolicy":
        if settings.insecure_no_auth:
            mode = AuthMode.OFF
        elif is_loopback(settings.host):
            mode = AuthMode.LOOPBACK
        else:
            mode = AuthMode.TOKENS
        given = {h.strip().lower().strip("[]").rstrip(".") for h in settings.allowed_hosts}
        hosts = {h for h in given if h} or _bound_names(settings.host)
        return cls(mode, frozenset(hosts))

    def host_refusal(self, host: str | None) -> str | None:
        """Why a request with this ``Host`` header is refused; None if it is allowed."""
        if "*" in self.allowed_hosts:
            return None
        if not host:
            return "the request has no Host header"
        name = _host_name(host)
        if name in self.allowed_hosts:
            return None
        return (
            f"Host {name!r} is not an allowed host of this API (allowed: "
            f"{', '.join(sorted(self.allowed_hosts))}; serve --allowed-hosts sets them)"
        )

    def cross_site_refusal(self, method: str, headers: dict[str, str]) -> tuple[int, str] | None:
        """``(status, why)`` when an unsafe request looks cross-site; None if it does not."""
        if method not in _UNSAFE:
            return None
        fetch_site = headers.get("sec-fetch-site")
        if fetch_site is not None and fetch_site.lower() not in _SAME_SITE:
            return 403, f"cross-site request refused (Sec-Fetch-Site: {fetch_site})"
        origin = headers.get("origin")
        if origin is not None:
            netloc = urlsplit(origin).netloc.lower() if origin != "null" else ""
            if netloc != headers.get("host", "").lower():
                return 403, f"cross-site request refused (Origin {origin!r} is not this API)"
        media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if "authorization" not in headers and media != "application/json":
            return 415, (
                f"a {method} without an Authorization header must be sent with "
                "Content-Type: application/json (this refuses cross-site form posts)"
            )
        return None


class AccessMiddleware:
    """The checks of the module docstring, before the application sees the request; the
    request's :class:`Principal` is left in ``request.state.principal``."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        policy: AccessPolicy,
        tokens: Callable[[], TokenStore],
        gate: DatabaseGate | None = None,
    ) -> None:
        self.app, self.policy, self.tokens, self.gate = app, policy, tokens, gate

    async def __call__(
        self,
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[Any]],
        send: Callable[[Any], Awaitable[None]],
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        method, path = scope["method"], scope["path"]
        why = self.policy.host_refusal(headers.get("host"))
        refusal = (400, why) if why else self.policy.cross_site_refusal(method, headers)
        challenge: dict[str, str] = {}
        if refusal is None and not _is_public(path):
            try:
                principal, problem = await self._checked_principal(headers.get("authorization"))
            except DatabaseUnavailable as exc:  # tokens live in the task database
                await _answer(503, str(exc), {"Retry-After": str(exc.retry_after)}, send)
                return
            if principal is None:
                refusal = (401, problem)
                error = ', error="invalid_token"' if "authorization" in headers else ""
                challenge = {"WWW-Authenticate": f'Bearer realm="tracker-core"{error}'}
            else:
                scope.setdefault("state", {})["principal"] = principal
        if refusal is not None:
            status, detail = refusal
            client = (scope.get("client") or ("?",))[0]
            log.info("refused %s %s from %s: %d %s", method, path[:200], client, status, detail)
            await _answer(status, detail, challenge, send)
            return
        await self.app(scope, receive, send)

    async def _checked_principal(self, authorization: str | None) -> tuple[Principal | None, str]:
        """:meth:`_principal`, or :class:`DatabaseUnavailable` while the task database (where
        the tokens are) does not answer."""
        if self.gate is None:
            return await self._principal(authorization)
        self.gate.check()
        try:
            return await self._principal(authorization)
        except Exception as exc:
            if is_outage(exc):
                raise self.gate.failed(exc) from exc
            raise

    async def _principal(self, authorization: str | None) -> tuple[Principal | None, str]:
        """Who sends a request with this ``Authorization`` header, or why nobody."""
        if authorization is None:
            if self.policy.mode is AuthMode.OFF:
                return _ANONYMOUS, ""
            if self.policy.mode is AuthMode.LOOPBACK and not await self.tokens().any_active():
                return _ANONYMOUS, ""
            return None, f"this API needs a token: {_TOKEN_HINT}"
        kind, _, token = authorization.strip().partition(" ")
        if kind.lower() != "bearer" or not token.strip():
            return None, f"the Authorization header is not a bearer token: {_TOKEN_HINT}"
        principal = await self.tokens().authenticate(token.strip())
        if principal is None:
            return None, "the bearer token is not valid (unknown, revoked or expired)"
        return principal, ""


def _is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(DOCS_STATIC + "/")


async def _answer(
    status: int, detail: str, headers: dict[str, str], send: Callable[[Any], Awaitable[None]]
) -> None:
    import json

    body = json.dumps({"detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def requires(needed: Scope) -> Any:
    """A route dependency: the request's :class:`Principal`, if its scope grants ``needed``
    (403 otherwise). Also declares the bearer scheme and the scope in the OpenAPI document."""
    bearer = HTTPBearer(auto_error=False, description="an API token (tracker-core token create)")
    declared = Annotated[
        HTTPAuthorizationCredentials | None, Security(bearer, scopes=[needed.value])
    ]

    async def check(request: Request, _declared: declared) -> Principal:
        principal = getattr(request.state, "principal", None)
        if not isinstance(principal, Principal):  # not through AccessMiddleware: refuse
            raise HTTPException(401, f"this API needs a token: {_TOKEN_HINT}")
        if not principal.scope.grants(needed):
            raise HTTPException(
                403,
                f"token {principal.name!r} has scope {principal.scope.value}; this needs "
                f"{needed.value}",
                headers={
                    "WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{needed}"'
                },
            )
        return principal

    return Depends(check)


async def startup_notice(settings: ServiceSettings, conninfo: str) -> tuple[int, str]:
    """``(log level, line)`` saying how the API authenticates, to log once at start. Raises
    :class:`ServiceConfigurationError` when it must not start: off loopback with no token and
    without ``--insecure-no-auth``."""
    policy = AccessPolicy.for_settings(settings)
    where = f"{settings.host}:{settings.port}"
    if policy.mode is AuthMode.OFF:
        return logging.WARNING, (
            f"authentication is OFF (--insecure-no-auth): anyone who reaches {where} can "
            "create and cancel training tasks"
        )
    active = await count_active(conninfo)
    if active:
        return logging.INFO, f"API tokens required ({active} active)"
    if policy.mode is AuthMode.LOOPBACK:
        return logging.INFO, (
            f"no API token exists: the API on loopback ({where}) takes requests without one "
            "until a token is created (tracker-core token create --name NAME)"
        )
    raise ServiceConfigurationError(
        f"--host {settings.host} is not a loopback address and no API token exists: anyone "
        "who reaches the port could run training code. Create a token first (tracker-core "
        "token create --name NAME, with the same --database or --data-dir), or pass "
        "--insecure-no-auth to run without authentication"
    )
