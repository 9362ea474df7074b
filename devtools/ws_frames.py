"""Reading the seed WebSocket's answer to one message, for tests."""

from __future__ import annotations

import asyncio
import json

from websockets.asyncio.client import ClientConnection


async def receive_until_end(
    ws: ClientConnection, timeout_s: float = 30.0
) -> tuple[list[dict], bytes]:
    """JSON frames and the audio bytes until an ``end`` or ``error`` frame."""
    frames, audio = [], bytearray()
    while True:
        frame = await asyncio.wait_for(ws.recv(), timeout=timeout_s)
        if isinstance(frame, bytes):
            audio += frame
            continue
        frames.append(json.loads(frame))
        if frames[-1]["type"] in ("end", "error"):
            return frames, bytes(audio)
