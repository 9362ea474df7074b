"""Segments generated ahead of playback, played strictly in order.

Up to ``segment_lookahead`` segments are in flight at once: while segment i plays,
segment i+1 is already being written and decoded, so there is no gap between them.
But the LLM writes one segment of a request at a time: segment i+1 starts once
segment i has all its tokens. vLLM shares its throughput among the sequences it
runs, so a second sequence of the same request would slow the first, the one the
listener is waiting for, and every other stream's too; one at a time, a stream asks
of the LLM no more than its own pace, which is what admission counts on. Each
segment task fills a bounded queue (backpressure: a consumer that takes audio
slowly slows its producers, it never makes them buffer without limit).

Segments come from a :class:`SegmentSource`: a whole text's, all at once, or those of
text that a client streams in, as the segmenter releases them.

:meth:`SegmentScheduler.close` cancels every segment task and waits for them, so
their upstream requests are aborted when it returns; the serving layer calls it
before it releases the request's slot.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable

from decoder_gateway.errors import (
    GatewayError,
    InternalError,
    NoAudioGenerated,
    UpstreamError,
    UpstreamUnavailable,
)
from decoder_gateway.metrics import Metrics
from decoder_gateway.serving.events import Audio, SegmentEnd, SegmentStart, SpeechEvent
from decoder_gateway.serving.job import SpeechJob
from decoder_gateway.serving.segment import RequestState, SegmentSynthesis

logger = logging.getLogger(__name__)

_END = object()  # closes a segment's queue
_UPSTREAM_ERRORS = (UpstreamError, UpstreamUnavailable, NoAudioGenerated)


class SegmentSource:
    """The segments of one request, in order: all known at once (a whole text), or
    arriving while it plays (text streamed in by a client), until :meth:`close`."""

    def __init__(self, segments: Iterable[str] = (), closed: bool = False) -> None:
        self._segments = list(segments)
        self._closed = closed
        self._changed = asyncio.Event()

    def add(self, segment: str) -> None:
        if self._closed:
            raise RuntimeError("add() after close()")
        self._segments.append(segment)
        self._wake()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """No more segments: readers past the last one get None."""
        self._closed = True
        self._wake()

    async def get(self, index: int) -> str | None:
        """Segment ``index`` once it is there; None when the source closed before it."""
        while index >= len(self._segments) and not self._closed:
            changed = self._changed
            await changed.wait()
        return self._segments[index] if index < len(self._segments) else None

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()


class SegmentScheduler:
    """The segments of one job: :meth:`events` in play order, :meth:`close` to stop.

    A launcher task starts each segment as soon as its text is there, the one before
    has all its tokens, and it is within ``lookahead`` of the one playing;
    :meth:`events` plays them in order.
    """

    def __init__(
        self,
        job: SpeechJob,
        source: SegmentSource,
        synthesis: SegmentSynthesis,
        metrics: Metrics,
        lookahead: int,
        buffer_chunks: int,
        sample_rate: int,
    ) -> None:
        self.job = job
        self.source = source
        self.synthesis = synthesis
        self.metrics = metrics
        self.lookahead = lookahead
        self.buffer_chunks = buffer_chunks
        self.state = RequestState(
            asyncio.get_running_loop().create_future(), sample_rate=sample_rate
        )
        if job.voice.global_tokens is not None:
            self.state.voice_tokens.set_result(job.voice.global_tokens)
        self._queues: dict[int, asyncio.Queue[object]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._launcher: asyncio.Task[None] | None = None
        self._playing = 0
        self._advanced = asyncio.Event()

    async def events(self) -> AsyncIterator[SpeechEvent]:
        """SegmentStart, Audio..., SegmentEnd for each segment; raises GatewayError."""
        if self._launcher is None:
            self._launcher = asyncio.create_task(
                self._launch(), name=f"segments-{self.job.request_id}"
            )
        index = 0
        while (text := await self.source.get(index)) is not None:
            self._playing = index
            self._advanced.set()
            yield SegmentStart(index, text)
            played = 0
            queue = self._queue(index)
            while (item := await queue.get()) is not _END:
                if isinstance(item, GatewayError):
                    raise item
                assert isinstance(item, Audio)
                played += item.samples.shape[0]
                yield item
            yield SegmentEnd(index, played)
            index += 1

    async def close(self) -> None:
        """Cancel every segment task and wait until each has closed its upstream stream."""
        tasks = [*self._tasks, *([self._launcher] if self._launcher else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if not self.state.voice_tokens.done():
            self.state.voice_tokens.cancel()

    async def _launch(self) -> None:
        """Start each segment once its text is there, the LLM has written the one
        before, and it is close enough to playback."""
        index = 0
        while (text := await self.source.get(index)) is not None:
            if index:
                await self.state.written(index - 1).wait()
            while index >= self._playing + self.lookahead:
                self._advanced.clear()
                await self._advanced.wait()
            self._tasks.append(
                asyncio.create_task(
                    self._produce(index, text), name=f"segment-{self.job.request_id}-{index}"
                )
            )
            index += 1

    def _queue(self, index: int) -> asyncio.Queue[object]:
        if index not in self._queues:
            self._queues[index] = asyncio.Queue(self.buffer_chunks)
        return self._queues[index]

    async def _produce(self, index: int, text: str) -> None:
        queue = self._queue(index)
        try:
            await self.synthesis.run(self.job, index, text, self.state, queue.put)
            await queue.put(_END)
        except asyncio.CancelledError:
            raise
        except Exception as err:
            typed = err if isinstance(err, GatewayError) else self._internal(index, err)
            if isinstance(typed, _UPSTREAM_ERRORS):
                self.metrics.upstream_errors.labels(typed.code).inc()
            voice = self.state.voice_tokens
            if index == 0 and not voice.done():
                voice.set_exception(typed)
                voice.exception()  # retrieved: later segments re-raise it themselves
            while not queue.empty():  # make room: the error goes before anything buffered
                queue.get_nowait()
            queue.put_nowait(typed)
        finally:
            self.state.written(index).set()  # also when it failed before its LLM stream

    def _internal(self, index: int, err: Exception) -> InternalError:
        logger.error(
            "request %s, segment %d: unexpected %s",
            self.job.request_id,
            index,
            type(err).__name__,
            exc_info=err,
            extra={"request_id": self.job.request_id},
        )
        return InternalError(f"internal error while synthesizing: {type(err).__name__}")
