"""Segments generated ahead of playback, played strictly in order.

``segment_lookahead`` segments are in flight at once (vLLM batches them): while
segment i plays, segment i+1 is already being written and decoded, so a long text
finishes far sooner than sentence after sentence, with no gap between them. Each
segment task fills a bounded queue (backpressure: a consumer that takes audio
slowly slows its producers, it never makes them buffer without limit).

:meth:`SegmentScheduler.close` cancels every segment task and waits for them, so
their upstream requests are aborted when it returns; the serving layer calls it
before it releases the request's slot.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from ..errors import (
    GatewayError,
    InternalError,
    NoAudioGenerated,
    UpstreamError,
    UpstreamUnavailable,
)
from ..metrics import Metrics
from .events import Audio, SegmentEnd, SegmentStart, SpeechEvent
from .job import SpeechJob
from .segment import RequestState, SegmentSynthesis

logger = logging.getLogger(__name__)

_END = object()  # closes a segment's queue
_UPSTREAM_ERRORS = (UpstreamError, UpstreamUnavailable, NoAudioGenerated)


class SegmentScheduler:
    """The segments of one job: :meth:`events` in play order, :meth:`close` to stop."""

    def __init__(
        self,
        job: SpeechJob,
        synthesis: SegmentSynthesis,
        metrics: Metrics,
        lookahead: int,
        buffer_chunks: int,
        sample_rate: int,
    ) -> None:
        self.job = job
        self.synthesis = synthesis
        self.metrics = metrics
        self.lookahead = lookahead
        self.state = RequestState(
            asyncio.get_running_loop().create_future(), sample_rate=sample_rate
        )
        if job.voice.global_tokens is not None:
            self.state.voice_tokens.set_result(job.voice.global_tokens)
        self._queues: list[asyncio.Queue[object]] = [
            asyncio.Queue(buffer_chunks) for _ in job.segments
        ]
        self._tasks: list[asyncio.Task[None]] = []

    async def events(self) -> AsyncIterator[SpeechEvent]:
        """SegmentStart, Audio..., SegmentEnd for each segment; raises GatewayError."""
        segments = self.job.segments
        for index, text in enumerate(segments):
            while len(self._tasks) < min(len(segments), index + self.lookahead):
                self._start(len(self._tasks))
            yield SegmentStart(index, text)
            played = 0
            while (item := await self._queues[index].get()) is not _END:
                if isinstance(item, GatewayError):
                    raise item
                assert isinstance(item, Audio)
                played += item.samples.shape[0]
                yield item
            yield SegmentEnd(index, played)

    async def close(self) -> None:
        """Cancel every segment task and wait until each has closed its upstream stream."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if not self.state.voice_tokens.done():
            self.state.voice_tokens.cancel()

    def _start(self, index: int) -> None:
        task = asyncio.create_task(
            self._produce(index), name=f"segment-{self.job.request_id}-{index}"
        )
        self._tasks.append(task)

    async def _produce(self, index: int) -> None:
        queue = self._queues[index]
        try:
            await self.synthesis.run(self.job, index, self.state, queue.put)
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
