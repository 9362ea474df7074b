"""What the streaming HTTP routes share: waiting for the first audio, and aborting."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import torch
from fastapi import Request

from ..errors import InvalidRequest


class ClientGone(InvalidRequest):
    status, code = 499, "client_closed_request"


async def _disconnected(request: Request) -> None:
    # The body is already read: the next message is the client going away.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def first_audio(request: Request, audio: AsyncIterator[torch.Tensor]) -> torch.Tensor:
    """The first chunk, awaited before the response starts so that errors up to then
    are proper HTTP errors. A client that leaves meanwhile cancels the synthesis (and
    with it the upstream request) at once, not when the first audio is ready."""
    first = asyncio.ensure_future(anext(audio))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({first, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not first.done():
            first.cancel()
            await asyncio.gather(first, return_exceptions=True)
            raise ClientGone("the client closed the request before the first audio")
        return first.result()
    except BaseException:
        await audio.aclose()
        raise
    finally:
        gone.cancel()
