"""The gateway's two WebSockets as sessions: frames in and out, failures as ClientError.

A session wraps an open ``websockets`` connection (:attr:`Session.connection`), which
stays reachable for what the protocol wrapper does not cover (close codes, dropping the
TCP connection in a fault test).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Mapping
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from decoder_gateway.client.errors import (
    ClientError,
    ReplyTimeout,
    ServerError,
    StreamBroken,
    seconds,
)

SAMPLE_RATE = 16000  # PCM16 LE mono unless the start frame says otherwise
SAMPLE_WIDTH = 2
G711_FORMATS = ("mulaw", "alaw")  # one byte per sample


def sample_width(response_format: str | None) -> int:
    """Bytes per sample of a raw ``response_format`` (PCM16 when None)."""
    return 1 if response_format in G711_FORMATS else SAMPLE_WIDTH


Frame = dict[str, Any] | bytes  # a JSON frame, parsed, or a binary (audio) frame
Message = Mapping[str, Any] | str | bytes


class Session:
    """One WebSocket session: send messages, receive frames until a reply's last one.

    ``timeout_s``: the longest wait for one frame (None: no limit, for callers that
    bound a whole exchange themselves).
    """

    last_types: frozenset[str] = frozenset()  # frame types that end a reply

    def __init__(self, connection: ClientConnection, timeout_s: float | None = None) -> None:
        self.connection = connection
        self.timeout_s = timeout_s

    async def send(self, message: Message) -> None:
        """A mapping goes as JSON text; a str or bytes as it is (text or binary frame)."""
        data = json.dumps(message) if isinstance(message, Mapping) else message
        try:
            await self.connection.send(data)
        except ConnectionClosed as err:
            raise closed(err) from err

    async def receive(self) -> Frame:
        """The next frame: a JSON object, or the bytes of a binary frame."""
        try:
            if self.timeout_s is None:
                frame = await self.connection.recv()
            else:
                frame = await asyncio.wait_for(self.connection.recv(), self.timeout_s)
        except TimeoutError as err:
            raise ReplyTimeout(f"no reply from the server for {self.timeout_s:g} s") from err
        except ConnectionClosed as err:
            raise closed(err) from err
        if isinstance(frame, bytes):
            return frame
        try:
            data = json.loads(frame)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise ClientError(f"the server sent a frame that is not a JSON object: {frame[:200]!r}")
        return data

    async def frames(self, message: Message | None = None) -> AsyncIterator[Frame]:
        """Send ``message`` (if any), then yield frames up to and with the reply's last."""
        if message is not None:
            await self.send(message)
        while True:
            frame = await self.receive()
            yield frame
            if isinstance(frame, dict) and frame.get("type") in self.last_types:
                return

    async def close(self) -> None:
        await self.connection.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()


class SpeechSocket(Session):
    """``WS /v1/audio/speech/stream/ws``: one message per synthesis, answered by a
    ``start`` frame, binary PCM frames, and ``end`` (or ``error`` at any point, or
    ``cancelled`` after a :meth:`cancel`)."""

    last_types = frozenset({"end", "error", "cancelled"})

    def __init__(self, connection: ClientConnection, timeout_s: float | None = None) -> None:
        super().__init__(connection, timeout_s)
        self.sample_rate = SAMPLE_RATE  # of the last start frame

    async def exchange(self, message: Message | None = None) -> tuple[list[dict[str, Any]], bytes]:
        """The JSON frames and the audio of one reply (of ``message``, or one under way)."""
        frames: list[dict[str, Any]] = []
        audio = bytearray()
        async for frame in self.frames(message):
            if isinstance(frame, bytes):
                audio += frame
            else:
                frames.append(frame)
        return frames, bytes(audio)

    async def speak(
        self, text: str, *, segment_id: int | str = 1, last: bool = True, **options: Any
    ) -> AsyncIterator[bytes]:
        """Yield the PCM of ``text``; an error frame raises :class:`ServerError`.

        ``options``: the message's optional fields (voice, speaker_id, temperature,
        max_tokens, response_format, sample_rate); None leaves the server's default.
        ``last``: the server closes the session after this reply. The end frame's sample
        count is checked, so a reply that lost audio on the way fails instead of ending
        short. A :meth:`cancel` of it (from another task) ends it early, quietly.
        """
        message = {
            "input": text,
            **{key: value for key, value in options.items() if value is not None},
            "segment_id": segment_id,
            "continue": not last,
        }
        width = sample_width(options.get("response_format"))
        samples = 0
        async for frame in self.frames(message):
            if isinstance(frame, bytes):
                samples += len(frame) // width
                yield frame
                continue
            kind = frame.get("type")
            if kind == "start":
                self.sample_rate = int(frame.get("sample_rate", SAMPLE_RATE))
            elif kind == "error":
                code = f" ({frame['code']})" if frame.get("code") else ""
                raise ServerError(
                    f"server error: {frame.get('message')}{code}",
                    code=frame.get("code"),
                    retry_after=seconds(frame.get("retry_after")),
                )
            elif kind == "end" and frame.get("samples") != samples:
                raise ClientError(
                    f"received {samples} samples, the server says it sent {frame.get('samples')}"
                )

    async def cancel(self, segment_id: int | str) -> None:
        """Stop message ``segment_id`` (a barge-in), being spoken or waiting. The server
        answers ``{"type": "cancelled", "segment_id", "status", "audio_seconds",
        "spoken_text", "spoken_until"}``, after which nothing of it comes; the session
        stays open."""
        await self.send({"type": "cancel", "segment_id": segment_id})


class TextInSocket(Session):
    """``WS /v1/audio/speech/stream``, text streamed in: a ``session.config``, text in
    fragments, ``input.done``; answered by audio frames and events until ``session.done``
    (or ``audio.cancelled``, after a :meth:`cancel`)."""

    last_types = frozenset({"session.done", "audio.cancelled"})

    async def configure(self, **config: Any) -> None:
        """``session.config`` with ``config`` (voice, response_format, stream_audio, ...)."""
        await self.send({"type": "session.config", **config})

    async def write(self, text: str) -> None:
        """One fragment of the text; any size, parts of words too."""
        await self.send({"type": "input.text", "text": text})

    async def done(self) -> None:
        """The text is complete: the gateway speaks the rest and ends the session."""
        await self.send({"type": "input.done"})

    async def cancel(self) -> None:
        """Stop speaking at once (a barge-in): every utterance playing, waiting or being
        written. The server answers ``{"type": "audio.cancelled", "utterance_index",
        "cancelled_utterances", "audio_seconds", "spoken_text", "spoken_until"}``, after
        which nothing of them comes; the next text starts the next utterance."""
        await self.send({"type": "input.cancel"})


S = TypeVar("S", bound=Session)


class Opening(Generic[S]):
    """A session being opened: ``await`` it for the session, or ``async with`` it to
    have it closed at the end of the block."""

    def __init__(self, open_session: Callable[[], Awaitable[S]]) -> None:
        self._open = open_session
        self._session: S | None = None

    def __await__(self) -> Generator[Any, None, S]:
        return self._open().__await__()

    async def __aenter__(self) -> S:
        self._session = await self._open()
        return self._session

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()


def closed(err: ConnectionClosed) -> StreamBroken:
    """The session's end, as the failure of the reply that was awaited."""
    return StreamBroken(
        f"the server closed the connection before the end of the audio ({err})",
        close_code=err.rcvd.code if err.rcvd is not None else None,
        detail=str(err),
    )
