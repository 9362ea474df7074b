"""One segment: Spark prompt -> LLM token stream -> streaming decode -> audio events.

The LLM's semantic tokens go into a :class:`~decoder_gateway.codec.StreamingSession`
as they arrive; each chunk the session can plan is decoded by the shared decode
worker (batched with other streams) and handed on at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from decoder_gateway.codec import StreamingConfig, StreamingSession
from decoder_gateway.codec.runtime.worker import DecodeWorker
from decoder_gateway.errors import NoAudioGenerated, UpstreamError
from decoder_gateway.llm.client import LLMClient, SamplingParams, prompt_token_bound
from decoder_gateway.llm.prompt import speaker_prompt
from decoder_gateway.metrics import Metrics
from decoder_gateway.serving.capacity import CapacityModel
from decoder_gateway.serving.events import Audio, SpeechEvent
from decoder_gateway.serving.job import SpeechJob
from decoder_gateway.settings import Settings
from decoder_gateway.voices.catalog import GLOBAL_TOKEN_COUNT, check_global_tokens

Emit = Callable[[SpeechEvent], Awaitable[None]]


@dataclass
class RequestState:
    """What the segments of one request share."""

    # Global tokens of the voice; pinned by segment 0 when the voice has none.
    voice_tokens: asyncio.Future[list[int]]
    # Playback clock for decode priority: the listener started at the first audio and
    # runs dry after `samples_decoded` samples (a lower bound for later segments).
    first_audio_at: float | None = None
    samples_decoded: int = 0
    sample_rate: int = field(default=16000)

    def playback_deadline(self) -> float:
        """When this request's listener runs out of audio (now, before the first chunk)."""
        if self.first_audio_at is None:
            return time.monotonic()
        return self.first_audio_at + self.samples_decoded / self.sample_rate


class SegmentSynthesis:
    """Runs segments: the per-segment LLM -> codec loop, shared by every request."""

    def __init__(
        self,
        settings: Settings,
        llm: LLMClient,
        worker: DecodeWorker,
        metrics: Metrics,
        capacity: CapacityModel,
    ) -> None:
        self.settings = settings
        self.llm = llm
        self.worker = worker
        self.metrics = metrics
        self.capacity = capacity
        self.streaming = StreamingConfig(
            first_chunk_tokens=settings.stream_first_chunk_tokens,
            first_lookahead_tokens=settings.stream_first_lookahead_tokens,
            assumed_speedup=settings.stream_assumed_speedup,
            crossfade_samples=settings.stream_crossfade_samples,
            first_audio_budget_s=_seconds(settings.stream_first_audio_budget_ms),
        )

    async def run(
        self, job: SpeechJob, index: int, text: str, state: RequestState, emit: Emit
    ) -> None:
        """Generate segment ``index`` (``text``) of ``job``, emitting its audio as decoded."""
        # Segments after the first wait for the voice that segment 0 pins.
        pinned = job.voice.global_tokens if index == 0 else await state.voice_tokens
        prompt = speaker_prompt(job.voice, text, pinned)
        sampling = SamplingParams(
            temperature=job.temperature,
            top_p=self.settings.top_p,
            top_k=self.settings.top_k,
            repetition_penalty=self.settings.repetition_penalty,
            max_tokens=self._max_tokens(job, text, prompt, pinned is None),
        )
        session = None if pinned is None else self.worker.open_stream(pinned, self.streaming)
        written_globals: list[int] = []
        first_token_at = last_token_at = 0.0
        tokens = self.llm.stream_tokens(prompt, sampling, request_id=f"{job.request_id}-{index}")
        capacity = self.capacity
        capacity.segment_started()
        # aclosing: whatever ends this loop (cancel, our own error) closes the upstream
        # stream now, so vLLM aborts the request, not when the generator is collected.
        try:
            async with contextlib.aclosing(tokens):
                async for delta in tokens:
                    if session is None:
                        written_globals += delta.global_tokens
                        if not delta.semantic:
                            continue
                        session = self.worker.open_stream(
                            _check_globals(written_globals), self.streaming
                        )
                        if not state.voice_tokens.done():
                            state.voice_tokens.set_result(written_globals)
                    if delta.semantic:
                        last_token_at = time.monotonic()
                        first_token_at = first_token_at or last_token_at
                        self.metrics.llm_semantic_tokens.inc(len(delta.semantic))
                        capacity.llm_tokens(len(delta.semantic))
                        session.push(delta.semantic, at=last_token_at)
                        await self._decode_ready(session, index, state, emit)
        finally:
            capacity.segment_ended()
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
        await self._decode_ready(session, index, state, emit)

    async def _decode_ready(
        self, session: StreamingSession, index: int, state: RequestState, emit: Emit
    ) -> None:
        chunks = session.plan()
        if not chunks:
            return
        audio = await self.worker.decode([c.span for c in chunks], state.playback_deadline())
        for chunk, samples in zip(chunks, audio, strict=True):
            emitted = session.complete(chunk, samples)
            if state.first_audio_at is None:
                state.first_audio_at = time.monotonic()
            state.samples_decoded += emitted.shape[0]
            if emitted.shape[0]:
                await emit(Audio(emitted, index))

    def _max_tokens(self, job: SpeechJob, text: str, prompt: str, writes_globals: bool) -> int:
        """The request's max_tokens, capped by the length budget and vLLM's context.

        vLLM refuses a request whose prompt + max_tokens exceed its max_model_len; a
        later segment refused that way would cut the audio off mid-stream.
        """
        max_tokens = min(job.max_tokens, token_budget(text, writes_globals))
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


def token_budget(text: str, writes_globals: bool) -> int:
    """A cap on tokens per segment from its length, against run-away generation.

    Speech runs at ~15 characters and 50 tokens per second (~3.3 tokens per
    character); 20 per character leaves six times that.
    """
    return 100 + 20 * len(text) + (GLOBAL_TOKEN_COUNT + 2 if writes_globals else 0)


def _seconds(milliseconds: float | None) -> float | None:
    return None if milliseconds is None else milliseconds / 1000


def _check_globals(tokens: list[int]) -> list[int]:
    try:
        return check_global_tokens(tokens)
    except ValueError:  # the count: the LLM client reads only ids of the global codebook
        raise UpstreamError(
            f"the model wrote {len(tokens)} global tokens; BiCodec needs exactly "
            f"{GLOBAL_TOKEN_COUNT}"
        ) from None
