"""Who may talk to this app: an access token for private deployments, and an identity
cookie for each browser (so that a recording goes to the browser that made it alone).

Private deployments: one access token in front of everything but `/status` and `/metrics`.

    app = TokenGate(app, token="...")       # an ASGI app wrapping an ASGI app

A browser opens `/?token=...` once: the gate sets an HttpOnly cookie and redirects
to the same page without the token in its address, and the cookie carries it from
then on (the page, Gradio's routes, WebRTC offers, downloads, the page's own
websocket). Programs pass `?token=...` or `Authorization: Bearer ...`. Without it an
HTTP request gets 401, with a wrong one 403; a websocket upgrade is refused (403)
before any handshake. `/status` stays open, for health checks and load balancers, and so
does `/metrics`, for Prometheus (`wire.server.add_metrics_route` can give it a token of its own).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from http.cookies import SimpleCookie
from urllib.parse import parse_qsl, urlencode

log = logging.getLogger(__name__)

COOKIE = "moshi_token"
BROWSER_COOKIE = "moshi_browser"
OPEN_PATHS = frozenset({"/status", "/metrics"})  # /metrics may have a token of its own
COOKIE_MAX_AGE_S = 30 * 24 * 3600

_REFUSALS = {
    401: "This Moshi is private: open it with ?token=... (or send Authorization: Bearer ...).",
    403: "This Moshi is private, and that token is not its token.",
}


def presented_token(scope: dict) -> tuple[str | None, str]:
    """The token a request carries, and where: the URL's `token`, the cookie, or a bearer header."""
    query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
    if query.get("token"):
        return query["token"], "query"
    headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope.get("headers", [])}
    authorization = headers.get("authorization", "")
    if authorization.lower().startswith("bearer "):
        return authorization[7:].strip(), "header"
    cookie = SimpleCookie()
    try:
        cookie.load(headers.get("cookie", ""))
    except Exception:  # a malformed Cookie header carries no token
        return None, ""
    if COOKIE in cookie:
        return cookie[COOKIE].value, "cookie"
    return None, ""


def _cookie_value(token: bytes) -> str:
    """What the cookie holds: a digest of the token (cookie-safe, and not the token itself)."""
    return hashlib.sha256(b"moshi-access:" + token).hexdigest()


class TokenGate:
    """ASGI middleware: `app` answers only requests that carry `token` (see the module)."""

    def __init__(self, app, token: str) -> None:
        if not token:
            raise ValueError("an empty access token would let everyone in")
        self.app = app
        self._token = token.encode()
        self._cookie = _cookie_value(self._token).encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        token, where = presented_token(scope)
        expected = self._cookie if where == "cookie" else self._token
        if token is not None and hmac.compare_digest(token.encode(), expected):
            if where == "query" and scope["type"] == "http" and scope["method"] == "GET":
                await self._remember(scope, send)  # a browser's first visit: keep it in a cookie
                return
            await self.app(scope, receive, send)
            return
        status = 401 if token is None else 403
        log.info("refused %s %s: %s", scope["type"], scope["path"], "no token" if token is None else "wrong token")
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": _REFUSALS[status][:120]})
            return
        body = _REFUSALS[status].encode()
        headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
        if status == 401:
            headers.append((b"www-authenticate", b'Bearer realm="moshi"'))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _remember(self, scope, send) -> None:
        """Set the cookie and send the browser to the same address without the token in it."""
        query = [(key, value) for key, value in parse_qsl(scope.get("query_string", b"").decode("latin-1"))
                 if key != "token"]
        location = scope.get("root_path", "") + scope["path"] + ("?" + urlencode(query) if query else "")
        cookie = f"{COOKIE}={self._cookie.decode()}; Path=/; HttpOnly; SameSite=Lax; Max-Age={COOKIE_MAX_AGE_S}"
        if _is_https(scope):
            cookie += "; Secure"
        await send({"type": "http.response.start", "status": 303,
                    "headers": [(b"location", location.encode()), (b"set-cookie", cookie.encode()),
                                (b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})


def _is_https(scope: dict) -> bool:
    headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope.get("headers", [])}
    return scope.get("scheme") == "https" or headers.get("x-forwarded-proto", "").split(",")[0].strip() == "https"


def cookie_value(headers, name: str) -> str | None:
    """The value of cookie `name` in a request's headers (a mapping with a `cookie` entry)."""
    cookie = SimpleCookie()
    try:
        cookie.load(headers.get("cookie", ""))
    except Exception:  # a malformed Cookie header carries nothing
        return None
    return cookie[name].value if name in cookie else None


class BrowserIdentity:
    """ASGI middleware: every browser gets a random, HttpOnly identity cookie on its first HTTP
    request (the page), which it then sends with every request it makes to this app."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        if cookie_value(headers, BROWSER_COOKIE):
            await self.app(scope, receive, send)
            return
        identity = secrets.token_urlsafe(18)
        cookie = f"{BROWSER_COOKIE}={identity}; Path=/; HttpOnly; SameSite=Lax; Max-Age={COOKIE_MAX_AGE_S}"
        if _is_https(scope):
            cookie += "; Secure"

        async def send_with_cookie(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", cookie.encode())]}
            await send(message)

        await self.app(scope, receive, send_with_cookie)
