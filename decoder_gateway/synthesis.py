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
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch

from .codec import StreamingConfig, StreamingSession
from .decode_worker import DecodeWorker
from .errors import InvalidRequest, NoAudioGenerated, UpstreamError
from .llm import LLMClient, SamplingParams
from .prompt import speaker_prompt
from .settings import Settings
from .text import normalize_text, split_segments
from .voices import GLOBAL_TOKEN_COUNT, Voice, VoiceCatalog

logger = logging.getLogger(__name__)

_END = object()  # closes a segment's audio queue


@dataclass(frozen=True)
class SpeechJob:
    """A validated synthesis request, whatever endpoint it came from."""

    text: str
    voice: Voice
    temperature: float
    max_tokens: int
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass
class _SharedVoice:
    """Global tokens of a request's voice; pinned by segment 0 when the voice has none."""

    tokens: asyncio.Future[list[int]]


class Synthesizer:
    def __init__(
        self, settings: Settings, llm: LLMClient, worker: DecodeWorker, voices: VoiceCatalog
    ) -> None:
        self.settings = settings
        self.llm = llm
        self.worker = worker
        self.voices = voices
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
    ) -> SpeechJob:
        """Validate a request; raises InvalidRequest / VoiceNotFound with a clear message."""
        limit = self.settings.max_text_chars
        if len(text) > limit:
            raise InvalidRequest(f"text has {len(text)} characters; the limit is {limit}")
        normalized = normalize_text(text)
        if not normalized:
            raise InvalidRequest("text is empty")
        if not 0.0 <= temperature <= 2.0:
            raise InvalidRequest(f"temperature must be in [0, 2], got {temperature}")
        if not 1 <= max_tokens <= self.settings.max_tokens_limit:
            raise InvalidRequest(
                f"max_tokens must be in [1, {self.settings.max_tokens_limit}], got {max_tokens}"
            )
        return SpeechJob(text, self.voices.resolve(voice, speaker_id), temperature, max_tokens)

    async def stream(self, job: SpeechJob) -> AsyncIterator[torch.Tensor]:
        """Float32 audio chunks at ``sample_rate``, in order; raises GatewayError on failure."""
        segments = split_segments(job.text, max_chars=self.settings.max_segment_chars)
        if not segments:
            raise InvalidRequest("text has nothing to speak")
        shared = _SharedVoice(asyncio.get_running_loop().create_future())
        if job.voice.global_tokens is not None:
            shared.tokens.set_result(job.voice.global_tokens)
        queues: list[asyncio.Queue[object]] = [asyncio.Queue() for _ in segments]
        tasks: list[asyncio.Task[None]] = []
        try:
            for index in range(len(segments)):
                # Keep the segment being played and `segment_lookahead - 1` after it in flight.
                last = min(len(segments), index + self.settings.segment_lookahead)
                while len(tasks) < last:
                    i = len(tasks)
                    tasks.append(
                        asyncio.create_task(
                            self._run_segment(job, i, segments[i], shared, queues[i]),
                            name=f"segment-{job.request_id}-{i}",
                        )
                    )
                while (item := await queues[index].get()) is not _END:
                    if isinstance(item, BaseException):
                        raise item
                    yield item  # type: ignore[misc]
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if not shared.tokens.done():
                shared.tokens.cancel()

    async def _run_segment(
        self,
        job: SpeechJob,
        index: int,
        text: str,
        shared: _SharedVoice,
        queue: asyncio.Queue[object],
    ) -> None:
        try:
            # Segments after the first wait for the voice that segment 0 pins.
            pinned = job.voice.global_tokens if index == 0 else await shared.tokens
            await self._generate_segment(job, index, text, pinned, shared, queue)
            queue.put_nowait(_END)
        except asyncio.CancelledError:
            raise
        except Exception as err:
            if index == 0 and not shared.tokens.done():
                shared.tokens.set_exception(err)
                shared.tokens.exception()  # retrieved: later segments re-raise it themselves
            queue.put_nowait(err)

    async def _generate_segment(
        self,
        job: SpeechJob,
        index: int,
        text: str,
        pinned: list[int] | None,
        shared: _SharedVoice,
        queue: asyncio.Queue[object],
    ) -> None:
        prompt = speaker_prompt(job.voice, text, pinned)
        sampling = SamplingParams(
            temperature=job.temperature,
            top_p=self.settings.top_p,
            top_k=self.settings.top_k,
            repetition_penalty=self.settings.repetition_penalty,
            max_tokens=min(job.max_tokens, self._token_budget(text, pinned is None)),
        )
        decoder = self.worker.decoder
        session = None if pinned is None else StreamingSession(decoder, pinned, self.streaming)
        written_globals: list[int] = []
        request_id = f"{job.request_id}-{index}"
        async for delta in self.llm.stream_tokens(prompt, sampling, request_id=request_id):
            if session is None:
                written_globals += delta.global_tokens
                if not delta.semantic:
                    continue
                session = StreamingSession(decoder, _check_globals(written_globals), self.streaming)
                if not shared.tokens.done():
                    shared.tokens.set_result(written_globals)
            if delta.semantic:
                session.push(delta.semantic)
                await self._decode_ready(session, queue)
        if session is None or session.num_tokens == 0:
            if written_globals:
                _check_globals(written_globals)
            raise NoAudioGenerated(
                f"the model wrote no speech tokens for segment {index + 1} ({text[:60]!r})"
            )
        session.finish()
        await self._decode_ready(session, queue)

    async def _decode_ready(self, session: StreamingSession, queue: asyncio.Queue[object]) -> None:
        chunks = session.plan()
        if not chunks:
            return
        audio = await self.worker.decode([chunk.span for chunk in chunks])
        for chunk, samples in zip(chunks, audio, strict=True):
            queue.put_nowait(session.complete(chunk, samples))

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
