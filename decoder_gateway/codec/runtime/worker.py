"""The one place where decoder passes run: off the event loop, batched across streams.

One worker thread owns the decoder; while it runs a batch, spans that arrive queue
up and go together in the next one, which batches concurrent streams without a
timer. A batch takes the queued jobs that fit the decoder's budget (the decoder
prices them), most urgent first: each job carries the moment its listener runs out
of audio, so a new request's first audio never waits behind streams seconds ahead.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from decoder_gateway.codec.model.bicodec import TokenInput
from decoder_gateway.codec.runtime.decoder import Decoder
from decoder_gateway.codec.runtime.spans import Span
from decoder_gateway.codec.runtime.streaming import StreamingConfig, StreamingSession
from decoder_gateway.errors import DecoderError
from decoder_gateway.metrics import Metrics

logger = logging.getLogger(__name__)


@dataclass(order=True)
class _QueuedSpans:
    """One caller's spans, waiting for a batch; ordered by urgency."""

    deadline: float  # time.monotonic() by which the audio is needed
    sequence: int  # first come, first served among equal deadlines
    spans: list[Span] = field(compare=False)
    future: asyncio.Future[list[torch.Tensor]] = field(compare=False)


class DecodeWorker:
    """Decodes the spans of every stream in shared batches on its one thread."""

    def __init__(
        self, decoder: Decoder, max_batch: int = 64, metrics: Metrics | None = None
    ) -> None:
        self.decoder = decoder
        self.metrics = metrics
        self.max_batch = max_batch
        self._queue: asyncio.PriorityQueue[_QueuedSpans] = asyncio.PriorityQueue()
        self._sequence = itertools.count()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bicodec")
        self._task: asyncio.Task[None] | None = None
        self.failure: BaseException | None = None  # why the worker stopped, if it did
        # Told of every batch decoded: (tokens of audio, seconds): the capacity model.
        self.on_batch: Callable[[int, float], None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="decode-worker")

    def problem(self) -> str | None:
        """Why the worker cannot decode (for /health), or None when it can."""
        if self._task is None:
            return "the decode worker has not started"
        if self._task.done():
            cause = f": {self.failure!r}" if self.failure is not None else ""
            return f"the decode worker has stopped{cause}"
        return None

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._fail_queued(DecoderError("the decode worker is shutting down"))
        # Waits for a batch in progress: in a thread, so the loop keeps serving meanwhile.
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)

    def open_stream(
        self, global_tokens: TokenInput, config: StreamingConfig | None = None
    ) -> StreamingSession:
        """A streaming session whose planned spans this worker's decoder decodes."""
        return self.decoder.open_stream(global_tokens, config)

    async def decode(self, spans: list[Span], deadline: float | None = None) -> list[torch.Tensor]:
        """Audio of each span (float32 CPU tensors), decoded in a shared batch.

        ``deadline`` (``time.monotonic()``) is when the listener runs out of audio;
        None means now.
        """
        if not spans:
            return []
        if (problem := self.problem()) is not None:
            raise DecoderError(problem)
        future = asyncio.get_running_loop().create_future()
        when = time.monotonic() if deadline is None else deadline
        self._queue.put_nowait(_QueuedSpans(when, next(self._sequence), spans, future))
        return await future

    async def _run(self) -> None:
        try:
            await self._serve()
        except asyncio.CancelledError:
            raise
        except BaseException as err:  # a bug in the worker itself: /health reports it
            self.failure = err
            logger.critical("decode worker stopped", exc_info=err)
            self._fail_queued(DecoderError(f"the decode worker has stopped: {err!r}"))
            raise

    def _fail_queued(self, error: DecoderError) -> None:
        while not self._queue.empty():
            job = self._queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(error)

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self._queue.get()]
            size, cost = len(jobs[0].spans), self.decoder.cost(jobs[0].spans)
            budget = self.decoder.batch_tokens
            while size < self.max_batch and not self._queue.empty():
                job = self._queue.get_nowait()
                job_cost = self.decoder.cost(job.spans)
                if cost + job_cost > budget:
                    self._queue.put_nowait(job)  # its place is kept: (deadline, sequence)
                    break
                jobs.append(job)
                size, cost = size + len(job.spans), cost + job_cost
            jobs = [job for job in jobs if not job.future.cancelled()]
            if not jobs:
                continue
            spans = [span for job in jobs for span in job.spans]
            started = time.perf_counter()
            try:
                audio = await loop.run_in_executor(self._executor, self.decoder.decode_spans, spans)
            except Exception as err:  # a bad batch fails its streams, not the worker
                logger.error("decoder batch of %d spans failed", len(spans), exc_info=err)
                if self.metrics is not None:
                    self.metrics.decoder_failures.inc()
                error = DecoderError(f"the audio decoder failed: {_describe(err)}")
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(error)
                continue
            elapsed = time.perf_counter() - started
            if self.metrics is not None:
                self.metrics.decoder_batch_size.observe(len(spans))
                self.metrics.decoder_batch_seconds.observe(elapsed)
            if self.on_batch is not None:
                self.on_batch(sum(span.end - span.start for span in spans), elapsed)
            offset = 0
            for job in jobs:
                part = audio[offset : offset + len(job.spans)]
                offset += len(job.spans)
                if not job.future.done():
                    job.future.set_result(part)


def _describe(err: BaseException) -> str:
    """``Type: first line``, short: enough to tell an out-of-memory from a bug."""
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
    text = f"{type(err).__name__}: {first_line}" if first_line else type(err).__name__
    return text[:200]
