"""Typed access to the objects the lifespan built, for every route (HTTP and WebSocket)."""

from __future__ import annotations

from starlette.requests import HTTPConnection

from decoder_gateway.serving.gateway import Gateway


def get_gateway(connection: HTTPConnection) -> Gateway:
    """The gateway of the app serving ``connection`` (a Request or a WebSocket)."""
    return connection.app.state.gateway
