"""What the streaming HTTP routes share: the first audio before the status, a
deadline on every send, and closing the request's stream whatever happens."""

from __future__ import annotations

import asyncio
import logging

from fastapi import Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from decoder_gateway.errors import ClientGone, SlowClient, StreamAborted
from decoder_gateway.serving import Audio, SpeechJob, SpeechService, SpeechStream

logger = logging.getLogger(__name__)


async def _disconnected(request: Request) -> None:
    # The body is already read: the next message is the client going away.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def start_stream(
    service: SpeechService, job: SpeechJob, endpoint: str, request: Request
) -> tuple[SpeechStream, Audio]:
    """Admit ``job`` and wait for its first audio before the response starts, so that
    errors up to then are proper HTTP errors. A client that leaves meanwhile stops
    the synthesis (and its upstream requests) at once, not at the first audio."""
    stream = await service.open(job, endpoint)
    first = asyncio.ensure_future(anext(stream.audio()))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({first, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not first.done():
            first.cancel()
            await asyncio.gather(first, return_exceptions=True)
            raise ClientGone("the client closed the request before the first audio")
        return stream, first.result()
    except BaseException as err:
        await stream.aclose(err)
        raise
    finally:
        gone.cancel()


class SpeechResponse(Response):
    """Sends ``response`` (streaming the audio of ``stream``) with a deadline on every
    send, then closes ``stream``, however the response ended.

    A client that stops reading but keeps its connection open blocks a send once its
    receive window and our buffers are full: after ``send_timeout_s`` it is cut off
    (SlowClient), its upstream requests are aborted and its slot is freed.
    """

    def __init__(self, response: Response, stream: SpeechStream, send_timeout_s: float) -> None:
        # A Response for FastAPI (returned as is); everything is delegated to `response`.
        self.status_code = response.status_code
        self.background = response.background
        self.raw_headers = response.raw_headers
        self.response = response
        self.stream = stream
        self.send_timeout_s = send_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stalled: SlowClient | None = None

        async def send_with_deadline(message: Message) -> None:
            nonlocal stalled
            try:
                await asyncio.wait_for(send(message), self.send_timeout_s)
            except TimeoutError:
                stalled = SlowClient(
                    f"the client took no audio for {self.send_timeout_s:g} s; request cut off"
                )
                raise stalled from None

        cause: BaseException | None = None
        try:
            await self.response(scope, receive, send_with_deadline)
        except BaseException as err:
            cause = err
            if stalled is not None:  # the server closes the connection; one log line
                raise StreamAborted(stalled.message) from None
            raise
        finally:
            # Upstream requests are aborted before the slot is freed.
            await self.stream.aclose(stalled or _stream_cause(cause))


def _stream_cause(err: BaseException | None) -> BaseException | None:
    """StreamAborted carries the stream's own error, which the stream has recorded."""
    if isinstance(err, StreamAborted):
        return None
    return err
