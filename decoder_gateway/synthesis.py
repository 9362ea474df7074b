"""The pipeline every endpoint shares: text -> segments -> LLM token streams -> audio.

Segments are generated concurrently, ``segment_lookahead`` at a time (vLLM batches
them), and played strictly in order: while segment i plays, segment i+1 is already
being written and decoded, so long texts finish far sooner than sentence after
sentence, with no gap between them. Within a segment, audio starts after the
first few semantic tokens (see ``codec.streaming``).

Leaving the ``stream()`` generator early (a client that goes away) cancels every
segment task, and each closes its upstream stream, so vLLM aborts the requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch

from .codec import StreamingConfig, StreamingSession
from .decode_worker import DecodeWorker
from .errors import (
    GatewayError,
    InvalidRequest,
    NoAudioGenerated,
    Overloaded,
    SlowClient,
    UpstreamError,
)
from .llm import LLMClient, SamplingParams, prompt_token_bound
from .metrics import Metrics
from .prompt import speaker_prompt
from .settings import Settings
from .text import normalize_text, split_segments
from .voices import GLOBAL_TOKEN_COUNT, Voice, VoiceCatalog

logger = logging.getLogger(__name__)

_END = object()  # closes a segment's audio queue
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def new_request_id(client_value: str | None = None) -> str:
    """The client's own id (X-Request-Id) when it is short and plain, else a fresh one."""
    if client_value and _REQUEST_ID.fullmatch(client_value):
        return client_value
    return uuid.uuid4().hex


class StreamSlots:
    """Counts active syntheses; refuses, never queues, past the limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0

    def acquire(self) -> None:
        if self.active >= self.limit:
            raise Overloaded(f"the server is at its limit of {self.limit} concurrent streams")
        self.active += 1

    def release(self) -> None:
        self.active -= 1


@dataclass(frozen=True)
class SpeechJob:
    """A validated synthesis request, whatever endpoint it came from."""

    text: str
    segments: tuple[str, ...]  # what is generated, one LLM request each, in order
    voice: Voice
    temperature: float
    max_tokens: int
    request_id: str = field(default_factory=new_request_id)
    accepted_at: float = field(default_factory=time.monotonic)


@dataclass
class _RequestState:
    """What the segment tasks of one request share."""

    # Global tokens of the voice; pinned by segment 0 when the voice has none.
    voice_tokens: asyncio.Future[list[int]]
    # When the consumer last took audio: a producer blocked on a full queue for longer
    # than the slow-client timeout since then cuts the request off.
    last_pull: float = field(default_factory=time.monotonic)
    # Playback clock for decode priority: the listener started at the first audio and
    # runs dry after `samples_decoded` samples (a lower bound for later segments).
    first_audio_at: float | None = None
    samples_decoded: int = 0

    def playback_deadline(self, sample_rate: int) -> float:
        """When this request's listener runs out of audio (now, before the first chunk)."""
        if self.first_audio_at is None:
            return time.monotonic()
        return self.first_audio_at + self.samples_decoded / sample_rate


class Synthesizer:
    def __init__(
        self,
        settings: Settings,
        llm: LLMClient,
        worker: DecodeWorker,
        voices: VoiceCatalog,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.llm = llm
        self.worker = worker
        self.voices = voices
        self.metrics = metrics
        self.slots = StreamSlots(settings.max_concurrent_streams)
        self.sample_rate = worker.decoder.sample_rate
        self.streaming = StreamingConfig(
            first_chunk_tokens=settings.stream_first_chunk_tokens,
            first_lookahead_tokens=settings.stream_first_lookahead_tokens,
            assumed_speedup=settings.stream_assumed_speedup,
            crossfade_samples=settings.stream_crossfade_samples,
        )

    def prepare(
        self,
        text: str,
        voice: str | None = None,
        speaker_id: int | None = None,
        temperature: float = 0.7,
        max_tokens: int = 2048,
        request_id: str | None = None,
    ) -> SpeechJob:
        """Validate a request; raises InvalidRequest / VoiceNotFound with a clear message."""
        limit = self.settings.max_text_chars
        if len(text) > limit:
            raise InvalidRequest(f"text has {len(text)} characters; the limit is {limit}", "text")
        if not normalize_text(text):
            raise InvalidRequest("text is empty", "text")
        segments = tuple(split_segments(text, max_chars=self.settings.max_segment_chars))
        if not segments:  # only punctuation or symbols
            raise InvalidRequest("text has nothing to speak", "text")
        if not 0.0 <= temperature <= 2.0:
            raise InvalidRequest(f"temperature must be in [0, 2], got {temperature}", "temperature")
        if not 1 <= max_tokens <= self.settings.max_tokens_limit:
            raise InvalidRequest(
                f"max_tokens must be in [1, {self.settings.max_tokens_limit}], got {max_tokens}",
                "max_tokens",
            )
        voice_entry = self.voices.resolve(voice, speaker_id)
        return SpeechJob(
            text, segments, voice_entry, temperature, max_tokens, new_request_id(request_id)
        )

    async def stream(self, job: SpeechJob, endpoint: str = "stream") -> AsyncIterator[torch.Tensor]:
        """Float32 audio chunks at ``sample_rate``, in order; raises GatewayError on failure.

        Takes a stream slot (Overloaded past the limit) and accounts for the request in
        the metrics and the log, whatever way it ends.
        """
        try:
            self.slots.acquire()
        except Overloaded:
            self.metrics.requests.labels(endpoint, "rejected").inc()
            raise
        metrics = self.metrics
        metrics.active_streams.inc()
        samples, outcome = 0, "client_disconnected"
        log = {"request_id": job.request_id, "endpoint": endpoint}
        logger.info(
            "request %s: %s, voice %s, %d characters",
            job.request_id,
            endpoint,
            job.voice.id,
            len(job.text),
            extra=log,
        )
        try:
            async for chunk in self._stream_segments(job):
                if samples == 0:
                    metrics.time_to_first_audio.labels(endpoint).observe(
                        time.monotonic() - job.accepted_at
                    )
                samples += chunk.shape[0]
                yield chunk
            outcome = "completed"
        except GatewayError as err:
            outcome = "error"
            logger.warning("request %s failed: %s", job.request_id, err.message, extra=log)
            raise
        except Exception:
            outcome = "error"
            logger.exception("request %s failed", job.request_id, extra=log)
            raise
        finally:
            self.slots.release()
            metrics.active_streams.dec()
            metrics.requests.labels(endpoint, outcome).inc()
            seconds = samples / self.sample_rate
            metrics.audio_seconds.labels(endpoint).inc(seconds)
            wall = time.monotonic() - job.accepted_at
            if outcome == "completed" and seconds > 0:
                metrics.real_time_factor.labels(endpoint).observe(wall / seconds)
            if outcome == "client_disconnected":
                metrics.client_disconnects.labels(endpoint).inc()
            logger.info(
                "request %s: %s, %.2f s of audio in %.2f s",
                job.request_id,
                outcome,
                seconds,
                wall,
                extra={**log, "outcome": outcome},
            )

    async def _stream_segments(self, job: SpeechJob) -> AsyncIterator[torch.Tensor]:
        segments = job.segments
        state = _RequestState(asyncio.get_running_loop().create_future())
        if job.voice.global_tokens is not None:
            state.voice_tokens.set_result(job.voice.global_tokens)
        buffer = self.settings.stream_buffer_chunks
        queues: list[asyncio.Queue[object]] = [asyncio.Queue(buffer) for _ in segments]
        tasks: list[asyncio.Task[None]] = []
        try:
            for index in range(len(segments)):
                # Keep the segment being played and `segment_lookahead - 1` after it in flight.
                last = min(len(segments), index + self.settings.segment_lookahead)
                while len(tasks) < last:
                    i = len(tasks)
                    tasks.append(
                        asyncio.create_task(
                            self._run_segment(job, i, segments[i], state, queues[i]),
                            name=f"segment-{job.request_id}-{i}",
                        )
                    )
                while (item := await queues[index].get()) is not _END:
                    if isinstance(item, BaseException):
                        raise item
                    state.last_pull = time.monotonic()
                    yield item  # type: ignore[misc]
                state.last_pull = time.monotonic()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if not state.voice_tokens.done():
                state.voice_tokens.cancel()

    async def _run_segment(
        self,
        job: SpeechJob,
        index: int,
        text: str,
        state: _RequestState,
        queue: asyncio.Queue[object],
    ) -> None:
        try:
            # Segments after the first wait for the voice that segment 0 pins.
            pinned = job.voice.global_tokens if index == 0 else await state.voice_tokens
            await self._generate_segment(job, index, text, pinned, state, queue)
            await self._put(queue, _END, state)
        except asyncio.CancelledError:
            raise
        except Exception as err:
            if isinstance(err, GatewayError) and err.status >= 500:
                self.metrics.upstream_errors.labels(err.code).inc()
            if index == 0 and not state.voice_tokens.done():
                state.voice_tokens.set_exception(err)
                state.voice_tokens.exception()  # retrieved: later segments re-raise it themselves
            while not queue.empty():  # make room: the error goes before anything buffered
                queue.get_nowait()
            queue.put_nowait(err)

    async def _put(self, queue: asyncio.Queue[object], item: object, state: _RequestState) -> None:
        """Queue audio for the consumer; a consumer that stops taking it is cut off."""
        timeout = self.settings.slow_client_timeout_s
        while True:
            try:
                await asyncio.wait_for(queue.put(item), timeout=timeout)
                return
            except TimeoutError:
                # A later segment waits while an earlier one plays: only a consumer that
                # has taken nothing for the whole timeout is too slow.
                if time.monotonic() - state.last_pull >= timeout:
                    raise SlowClient(
                        f"the client took no audio for {timeout:.0f} s; request cut off"
                    ) from None

    async def _generate_segment(
        self,
        job: SpeechJob,
        index: int,
        text: str,
        pinned: list[int] | None,
        state: _RequestState,
        queue: asyncio.Queue[object],
    ) -> None:
        prompt = speaker_prompt(job.voice, text, pinned)
        sampling = SamplingParams(
            temperature=job.temperature,
            top_p=self.settings.top_p,
            top_k=self.settings.top_k,
            repetition_penalty=self.settings.repetition_penalty,
            max_tokens=self._max_tokens(job, text, prompt, pinned is None),
        )
        decoder = self.worker.decoder
        session = None if pinned is None else StreamingSession(decoder, pinned, self.streaming)
        written_globals: list[int] = []
        request_id = f"{job.request_id}-{index}"
        first_token_at = last_token_at = 0.0
        # aclosing: whatever ends this loop (cancel, our own error) closes the upstream
        # stream now, not when the generator is garbage-collected.
        tokens = self.llm.stream_tokens(prompt, sampling, request_id=request_id)
        async with contextlib.aclosing(tokens):
            async for delta in tokens:
                if session is None:
                    written_globals += delta.global_tokens
                    if not delta.semantic:
                        continue
                    session = StreamingSession(
                        decoder, _check_globals(written_globals), self.streaming
                    )
                    if not state.voice_tokens.done():
                        state.voice_tokens.set_result(written_globals)
                if delta.semantic:
                    last_token_at = time.monotonic()
                    first_token_at = first_token_at or last_token_at
                    self.metrics.llm_semantic_tokens.inc(len(delta.semantic))
                    session.push(delta.semantic)
                    await self._decode_ready(session, queue, state)
        if session is None or session.num_tokens == 0:
            if written_globals:
                _check_globals(written_globals)
            raise NoAudioGenerated(
                f"the model wrote no speech tokens for segment {index + 1} ({text[:60]!r})"
            )
        if session.num_tokens > 1 and last_token_at > first_token_at:
            rate = (session.num_tokens - 1) / (last_token_at - first_token_at)
            self.metrics.llm_tokens_per_second.observe(rate)
        session.finish()
        await self._decode_ready(session, queue, state)

    async def _decode_ready(
        self, session: StreamingSession, queue: asyncio.Queue[object], state: _RequestState
    ) -> None:
        chunks = session.plan()
        if not chunks:
            return
        deadline = state.playback_deadline(self.sample_rate)
        audio = await self.worker.decode([chunk.span for chunk in chunks], deadline)
        for chunk, samples in zip(chunks, audio, strict=True):
            emitted = session.complete(chunk, samples)
            if state.first_audio_at is None:
                state.first_audio_at = time.monotonic()
            state.samples_decoded += emitted.shape[0]
            await self._put(queue, emitted, state)

    def _max_tokens(self, job: SpeechJob, text: str, prompt: str, writes_globals: bool) -> int:
        """The request's max_tokens, capped by the length budget and vLLM's context.

        vLLM refuses a request whose prompt + max_tokens exceed its max_model_len; a
        later segment refused that way would cut the audio off mid-stream.
        """
        max_tokens = min(job.max_tokens, self._token_budget(text, writes_globals))
        context = self.llm.max_model_len
        if context:
            room = context - prompt_token_bound(prompt)
            if room < 1:
                raise UpstreamError(
                    f"vLLM's max_model_len of {context} tokens leaves no room for speech "
                    "after the prompt: raise MAX_MODEL_LEN or lower MAX_SEGMENT_CHARS"
                )
            max_tokens = min(max_tokens, room)
        return max_tokens

    @staticmethod
    def _token_budget(text: str, writes_globals: bool) -> int:
        """A cap on tokens per segment from its length, against run-away generation.

        Speech runs at ~15 characters and 50 tokens per second (~3.3 tokens per
        character); 20 per character leaves six times that.
        """
        return 100 + 20 * len(text) + (GLOBAL_TOKEN_COUNT + 2 if writes_globals else 0)


def _check_globals(tokens: list[int]) -> list[int]:
    if len(tokens) != GLOBAL_TOKEN_COUNT:
        raise UpstreamError(
            f"the model wrote {len(tokens)} global tokens; BiCodec needs exactly "
            f"{GLOBAL_TOKEN_COUNT}"
        )
    return tokens
