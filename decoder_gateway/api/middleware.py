"""ASGI middleware that guards the server before any route runs: a bounded HTTP
body, and WebSocket handshakes only from allowed origins."""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from decoder_gateway.api.errors import error_response

# A refused body is read and dropped, up to this much and this long, before the 413
# goes out and the connection closes: a client still writing its body when the server
# closes gets a connection reset instead of the answer (most clients write the whole
# body before they read). Past these bounds the answer goes at once, reset or not.
DRAIN_MAX_BYTES = 16 * 1024 * 1024
DRAIN_MAX_S = 5.0


class BodySizeLimit:
    """413 for an HTTP body over ``max_bytes``, before any of it is parsed.

    A body over the limit is refused without being parsed: a declared
    ``Content-Length`` at once, a chunked body as soon as the bytes read pass the
    limit. Its rest is read and dropped first when that is cheap (see
    :data:`DRAIN_MAX_BYTES`), so that the client can read the answer. An accepted body
    is replayed to the app, so a route still sees the whole stream of ASGI messages
    (and the client's disconnect after it).
    """

    def __init__(
        self, app: ASGIApp, max_bytes: int, per_path: dict[str, int] | None = None
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.per_path = per_path or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.per_path.get(scope["path"].rstrip("/"), self.max_bytes)
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            if declared <= DRAIN_MAX_BYTES:
                await _drain(receive)
            await self._refuse(scope, receive, send, f"{declared} bytes", limit)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away first
                replay = [message]
                break
            body += message.get("body", b"")
            if len(body) > limit:
                if message.get("more_body", False):
                    await _drain(receive)
                await self._refuse(scope, receive, send, f"over {limit} bytes", limit)
                return
            if not message.get("more_body", False):
                replay = [{"type": "http.request", "body": bytes(body), "more_body": False}]
                break

        async def replaying_receive() -> Message:
            return replay.pop(0) if replay else await receive()

        await self.app(scope, replaying_receive, send)

    async def _refuse(
        self, scope: Scope, receive: Receive, send: Send, size: str, limit: int
    ) -> None:
        response = error_response(
            413,
            f"the request body ({size}) is over the limit of {limit} bytes",
            "request_too_large",
        )
        # What is left of the body is not read: the connection closes after the answer.
        response.headers["Connection"] = "close"
        await response(scope, receive, send)


async def _drain(receive: Receive) -> None:
    """Read and drop the rest of a request body, within the drain bounds."""
    dropped = 0
    try:
        async with asyncio.timeout(DRAIN_MAX_S):
            while dropped <= DRAIN_MAX_BYTES:
                message = await receive()
                if message["type"] != "http.request" or not message.get("more_body", False):
                    return
                dropped += len(message.get("body", b""))
    except TimeoutError:
        return


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class WebSocketOriginCheck:
    """Refuse (HTTP 403) a WebSocket handshake whose ``Origin`` is not allowed.

    Browsers send an Origin with every handshake and do not apply CORS to WebSockets,
    so without this check any web page could use the server through its visitors'
    browsers. Clients that are not browsers send no Origin and are let through.
    """

    def __init__(self, app: ASGIApp, allowed_origins: list[str]) -> None:
        self.app = app
        self.allowed = {origin.rstrip("/").lower() for origin in allowed_origins}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and "*" not in self.allowed:
            origin = dict(scope["headers"]).get(b"origin")
            if origin is not None and origin.decode("latin-1").rstrip("/").lower() not in (
                self.allowed
            ):
                await receive()  # websocket.connect
                await send({"type": "websocket.close", "code": 1008})
                return
        await self.app(scope, receive, send)
