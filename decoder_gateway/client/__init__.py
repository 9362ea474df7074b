"""A client for the gateway: :class:`GatewayClient` (async) and the command line
``python -m decoder_gateway.client`` (:func:`main`), built on it.

    async with GatewayClient("http://localhost:8001", api_key=key) as client:
        async with client.speech_stream("Oli otya?", voice="luganda_female") as answer:
            async for pcm in answer.chunks():
                ...
        async with client.speech_socket() as socket:
            frames, audio = await socket.exchange({"input": "Habari?", "segment_id": 1})

* :mod:`.gateway`: :class:`GatewayClient` (HTTP speech streams, the two WebSockets,
  voices, metrics) and :class:`SpeechResponse`;
* :mod:`.sockets`: the WebSocket sessions, :class:`SpeechSocket` (the seed WebSocket)
  and :class:`TextInSocket` (text streamed in);
* :mod:`.errors`: :class:`ClientError` and the cases a program may tell apart;
* :mod:`.cli`: the command line.

It needs neither torch nor the serving code, so it starts quickly anywhere.
"""

from decoder_gateway.client.cli import main
from decoder_gateway.client.errors import (
    ClientError,
    ConnectFailed,
    ReplyTimeout,
    ServerError,
    StreamBroken,
)
from decoder_gateway.client.gateway import (
    DEFAULT_URL,
    OPENAI_SPEECH_PATH,
    SPEECH_STREAM_PATH,
    SPEECH_WS_PATH,
    TEXT_IN_WS_PATH,
    VOICES_PATH,
    GatewayClient,
    SpeechResponse,
)
from decoder_gateway.client.sockets import SpeechSocket, TextInSocket

__all__ = [
    "DEFAULT_URL",
    "OPENAI_SPEECH_PATH",
    "SPEECH_STREAM_PATH",
    "SPEECH_WS_PATH",
    "TEXT_IN_WS_PATH",
    "VOICES_PATH",
    "ClientError",
    "ConnectFailed",
    "GatewayClient",
    "ReplyTimeout",
    "ServerError",
    "SpeechResponse",
    "SpeechSocket",
    "StreamBroken",
    "TextInSocket",
    "main",
]
