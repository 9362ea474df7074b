"""The one place where decoder forward passes run: off the event loop, batched.

Streams hand in spans and await their audio. A single worker thread owns the
decoder; while it runs one batch, the spans that arrive meanwhile queue up and go
together in the next one. That batches concurrent streams without a timer and
keeps torch off the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .codec import BiCodecDecoder, Span
from .metrics import Metrics

logger = logging.getLogger(__name__)


@dataclass
class _Job:
    spans: list[Span]
    future: asyncio.Future[list[torch.Tensor]]


class DecodeWorker:
    def __init__(
        self, decoder: BiCodecDecoder, max_batch: int = 16, metrics: Metrics | None = None
    ) -> None:
        self.decoder = decoder
        self.metrics = metrics
        self.max_batch = max_batch
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bicodec")
        self._task: asyncio.Task[None] | None = None
        self.batches = 0
        self.spans_decoded = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="decode-worker")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def decode(self, spans: list[Span]) -> list[torch.Tensor]:
        """Audio of each span (float32 CPU tensors), decoded in a shared batch."""
        if not spans:
            return []
        if self._task is None or self._task.done():
            raise RuntimeError("decode worker is not running")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Job(spans, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self._queue.get()]
            size = len(jobs[0].spans)
            while size < self.max_batch and not self._queue.empty():
                job = self._queue.get_nowait()
                jobs.append(job)
                size += len(job.spans)
            jobs = [job for job in jobs if not job.future.cancelled()]
            if not jobs:
                continue
            spans = [span for job in jobs for span in job.spans]
            started = time.perf_counter()
            try:
                audio = await loop.run_in_executor(self._executor, self.decoder.decode_spans, spans)
            except Exception as err:  # a bad batch fails its streams, not the worker
                logger.exception("decoder batch of %d spans failed", len(spans))
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(err)
                continue
            self.batches += 1
            self.spans_decoded += len(spans)
            if self.metrics is not None:
                self.metrics.decoder_batch_size.observe(len(spans))
                self.metrics.decoder_batch_seconds.observe(time.perf_counter() - started)
            offset = 0
            for job in jobs:
                part = audio[offset : offset + len(job.spans)]
                offset += len(job.spans)
                if not job.future.done():
                    job.future.set_result(part)
