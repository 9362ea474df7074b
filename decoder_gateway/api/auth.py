"""Optional API key (GATEWAY_API_KEY).

HTTP: ``Authorization: Bearer KEY`` (or ``X-API-Key: KEY``; with both, either may
carry the key) on every path but the exempt ones, checked by a pure ASGI
middleware. WebSocket: the same headers, or, for browsers that cannot set headers,
a first message ``{"type": "auth", "api_key": KEY}`` (handled by the WebSocket
route). Keys are compared in constant time.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from decoder_gateway.api.errors import error_response


def key_matches(expected: str, presented: str | None) -> bool:
    if presented is None:
        return False
    # surrogatepass: a key from JSON may hold a lone surrogate; it is a wrong key,
    # not an encoding error.
    return hmac.compare_digest(
        expected.encode("utf-8", "surrogatepass"), presented.encode("utf-8", "surrogatepass")
    )


def presented_keys(headers: Iterable[tuple[bytes, bytes]]) -> list[str]:
    """Every key in ``Authorization: Bearer`` and ``X-API-Key`` headers.

    A request is let in when any of them is right: a client (or a proxy) may add a
    header of the other kind, and which one comes first must not decide.
    """
    keys = []
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer":
                keys.append(token.strip())
        elif lowered == b"x-api-key":
            keys.append(value.decode("latin-1").strip())
    return keys


def authorized(expected: str, headers: Iterable[tuple[bytes, bytes]]) -> bool:
    return any(key_matches(expected, key) for key in presented_keys(headers))


def is_exempt(path: str, exempt: list[str]) -> bool:
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in exempt)


class APIKeyMiddleware:
    """401 in OpenAI's error shape for HTTP requests without the right key."""

    def __init__(self, app: ASGIApp, api_key: str, exempt_paths: list[str]) -> None:
        self.app = app
        self.api_key = api_key
        self.exempt_paths = exempt_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope.get("method") != "OPTIONS"  # CORS preflights carry no credentials
            and not is_exempt(scope["path"], self.exempt_paths)
            and not authorized(self.api_key, scope["headers"])
        ):
            response = error_response(
                401,
                "missing or wrong API key: send 'Authorization: Bearer <key>'",
                "invalid_api_key",
            )
            response.headers["WWW-Authenticate"] = "Bearer"
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
