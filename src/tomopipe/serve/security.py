"""Who may talk to ``tomopipe serve``, as one ASGI middleware in front of every route.

- Without a token (the default, bound to 127.0.0.1) only loopback clients are served, and the
  ``Host`` header must name a loopback host (``localhost``, ``127.x.x.x``, ``[::1]``): a page of
  another site whose name an attacker points at 127.0.0.1 (DNS rebinding) is refused.
- With a token (any other address) every request must carry it: the ``X-Tomopipe-Token``
  header, the ``tomopipe_token`` cookie, or ``?token=`` in the URL (which sets the cookie,
  ``HttpOnly; SameSite=Strict``, so the pages' own requests carry it).
- Writes (any method but GET/HEAD/OPTIONS) must come from the server's own pages: an ``Origin``
  header equal to this server's origin, ``Sec-Fetch-Site`` (when sent) ``same-origin``, and a JSON
  body (``Content-Type: application/json``, which a cross-origin form cannot send).
- Files are never served by a user-given path: pages come from a fixed list of package files and
  data by run / set / item ids (``app.py``); nothing here needs to check paths.

Every refusal is a 403 (401 for a missing token) with a JSON ``{"error": ...}`` saying why.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import secrets
from http.cookies import SimpleCookie
from urllib.parse import parse_qs

TOKEN_HEADER = "x-tomopipe-token"
TOKEN_COOKIE = "tomopipe_token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"content-security-policy",
     b"default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'"),
]


def new_token() -> str:
    """A random URL-safe token (256 bits)."""
    return secrets.token_urlsafe(32)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, IPv6 with or without brackets) is this machine's loopback."""
    host = host.strip().strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_name(host_header: str) -> str:
    """The name part of a ``Host`` header: ``"127.0.0.1:8000"`` -> ``"127.0.0.1"``, ``"[::1]:80"`` -> ``"[::1]"``."""
    host_header = host_header.strip()
    if host_header.startswith("["):
        return host_header[: host_header.find("]") + 1] if "]" in host_header else host_header
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


class SecurityMiddleware:
    """ASGI middleware enforcing the rules of this module (``token`` None: localhost only)."""

    def __init__(self, app, token: str | None = None):
        self.app = app
        self.token = token

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        refusal, set_cookie = self._check(scope, headers)
        if refusal is not None:
            status, message = refusal
            body = json.dumps({"error": message}).encode()
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode()), *SECURITY_HEADERS]})
            await send({"type": "http.response.body", "body": body})
            return

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                extra = list(SECURITY_HEADERS)
                if set_cookie:
                    extra.append((b"set-cookie", f"{TOKEN_COOKIE}={self.token}; Path=/; HttpOnly; "
                                                 f"SameSite=Strict".encode()))
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _check(self, scope, headers: dict[str, str]) -> tuple[tuple[int, str] | None, bool]:
        """``((status, reason) or None, whether to set the token cookie)``."""
        host = headers.get("host", "")
        set_cookie = False
        if self.token is None:
            client = (scope.get("client") or ("", 0))[0]
            if not is_loopback(client):
                return (403, f"this server answers only this machine (client {client}); start it with "
                             f"--host and use the token it prints"), False
            if not is_loopback(host_name(host)):
                return (403, f"Host {host!r} is not this machine's loopback name (DNS rebinding?)"), False
        else:
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            cookies = SimpleCookie()
            try:
                cookies.load(headers.get("cookie", ""))
            except Exception:  # a malformed cookie header is treated as no cookie
                cookies = SimpleCookie()
            offered = [headers.get(TOKEN_HEADER), cookies[TOKEN_COOKIE].value if TOKEN_COOKIE in cookies else None,
                       *query.get("token", [])]
            valid = [value for value in offered if value and hmac.compare_digest(value, self.token)]
            if not valid:
                return (401, "a token is required: open the URL that 'tomopipe serve' printed (…?token=…)"), False
            set_cookie = bool(query.get("token")) and TOKEN_COOKIE not in cookies
        if scope["method"] not in SAFE_METHODS:
            scheme = scope.get("scheme", "http")
            own_origin = f"{scheme}://{host}"
            origin = headers.get("origin")
            if origin is None:
                return (403, "writes need the Origin header of this server's pages"), False
            if origin != own_origin:
                return (403, f"write refused: Origin {origin!r} is not this server ({own_origin!r})"), False
            site = headers.get("sec-fetch-site")
            if site is not None and site not in ("same-origin", "none"):
                return (403, f"write refused: Sec-Fetch-Site {site!r}"), False
            content_type = headers.get("content-type", "").split(";")[0].strip().lower()
            if content_type != "application/json":
                return (403, f"writes take a JSON body (Content-Type application/json, got {content_type!r})"), False
        return None, set_cookie
