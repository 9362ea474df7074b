"""One segment: Spark prompt -> LLM token stream -> streaming decode -> audio events.

The LLM's semantic tokens go into a :class:`~decoder_gateway.codec.StreamingSession`
as they arrive; each chunk the session can plan is decoded by the shared decode
worker (batched with other streams) and handed on at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from decoder_gateway.codec import StreamingConfig, StreamingSession
from decoder_gateway.codec.runtime.worker import DecodeWorker
from decoder_gateway.errors import NoAudioGenerated, UpstreamError
from decoder_gateway.llm.client import LLMClient, SamplingParams, prompt_token_bound
from decoder_gateway.llm.grammar import DesignConstraint
from decoder_gateway.llm.prompt import base_prompt, controllable_prompt, speaker_prompt
from decoder_gateway.metrics import Metrics
from decoder_gateway.serving.capacity import CapacityModel
from decoder_gateway.serving.events import Audio, SpeechEvent
from decoder_gateway.serving.job import SpeechJob
from decoder_gateway.serving.style import voice_first_tokens
from decoder_gateway.settings import Settings
from decoder_gateway.voices.catalog import GLOBAL_TOKEN_COUNT, check_global_tokens

Emit = Callable[[SpeechEvent], Awaitable[None]]
PRIORITY_STEP_S = 0.1  # LLM_PRIORITY: a segment's priority counts its listener's buffer
PRIORITY_STEPS = 600  # in these steps, up to a minute


@dataclass
class RequestState:
    """What the segments of one request share."""

    # Global tokens of the voice; pinned by segment 0 when the voice has none.
    voice_tokens: asyncio.Future[list[int]]
    # Playback clock, for decode priority and for the chunk plan: the listener
    # started at the first audio and plays the segments' decoded samples in order.
    first_audio_at: float | None = None
    samples_decoded: dict[int, int] = field(default_factory=dict)  # by segment
    sample_rate: int = field(default=16000)
    # Each segment's length in samples, once its generation has ended (the decoder makes
    # exactly hop_length samples per token): how far into a sentence a cancel came.
    segment_samples: dict[int, int] = field(default_factory=dict)
    # Set once a segment's LLM stream has ended (or failed): the next may start.
    _written: dict[int, asyncio.Event] = field(default_factory=dict)

    def written(self, index: int) -> asyncio.Event:
        """Set when segment ``index`` has all its tokens (or will get no more)."""
        return self._written.setdefault(index, asyncio.Event())

    def playback_deadline(self, index: int) -> float:
        """When the listener runs out of the audio decoded up to segment ``index``'s
        (now, before the first chunk): the deadline of that segment's next chunk."""
        if self.first_audio_at is None:
            return time.monotonic()
        samples = sum(n for segment, n in self.samples_decoded.items() if segment <= index)
        return self.first_audio_at + samples / self.sample_rate


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
        self.design_constraint = DesignConstraint(llm, settings.design_structured_outputs)
        self.streaming = StreamingConfig(
            first_chunk_tokens=settings.stream_first_chunk_tokens,
            first_lookahead_tokens=settings.stream_first_lookahead_tokens,
            assumed_speedup=settings.stream_assumed_speedup,
            crossfade_samples=settings.stream_crossfade_samples,
            first_audio_budget_s=_seconds(settings.stream_first_audio_budget_ms),
            min_buffer_s=settings.stream_min_buffer_ms / 1000,
            target_buffer_s=settings.stream_target_buffer_ms / 1000,
        )

    async def run(
        self, job: SpeechJob, index: int, text: str, state: RequestState, emit: Emit
    ) -> None:
        """Generate segment ``index`` (``text``) of ``job``, emitting its audio as decoded."""
        # A style request's first segment writes its voice for the labels.
        style = job.style if index == 0 else None
        pinned: list[int] | None = None
        if style is not None:
            prompt = controllable_prompt(text, style)
        else:
            # Segments after the first wait for the voice that segment 0 pins.
            pinned = job.voice.global_tokens if index == 0 else await state.voice_tokens
            if self.settings.voice_design and pinned is not None:
                # The base model (VOICE_DESIGN) was trained without a speaker id before
                # the text.
                prompt = base_prompt(text, pinned)
            else:
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
        request_id, priority = f"{job.request_id}-{index}", self._priority(state, index)
        if style is not None:
            # Its voice is checked (and retried once) before any of its tokens is used.
            structured = await self.design_constraint.structured_outputs()
            tokens = voice_first_tokens(
                self.llm, prompt, sampling, request_id, priority, structured
            )
        else:
            tokens = self.llm.stream_tokens(
                prompt, sampling, request_id=request_id, priority=priority
            )
        capacity = self.capacity
        capacity.segment_started()
        ended = False

        def tokens_ended() -> None:
            """All tokens are in (or none will come): the next segment may start."""
            nonlocal ended
            if not ended:
                ended = True
                capacity.segment_ended()
                state.written(index).set()

        # Read ahead: tokens keep coming in while a chunk decodes, and the next chunk is
        # planned from all of them. Read between decodes, a stream would plan from the
        # few tokens that make a chunk at all, and never get ahead of its listener.
        # aclosing: whatever ends this loop (cancel, our own error) closes the upstream
        # stream now, so vLLM aborts the request, not when the generator is collected.
        try:
            async with contextlib.aclosing(read_ahead(tokens, tokens_ended)) as arrivals:
                async for batch in arrivals:
                    pushed = False
                    for arrived_at, delta in batch:
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
                            last_token_at = arrived_at
                            first_token_at = first_token_at or last_token_at
                            self.metrics.llm_semantic_tokens.inc(len(delta.semantic))
                            capacity.llm_tokens(len(delta.semantic))
                            session.push(delta.semantic, at=arrived_at)
                            pushed = True
                    if pushed and session is not None:
                        await self._decode_ready(session, index, state, emit)
        finally:
            tokens_ended()
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
        state.segment_samples[index] = session.num_tokens * session.hop
        await self._decode_ready(session, index, state, emit)

    async def _decode_ready(
        self, session: StreamingSession, index: int, state: RequestState, emit: Emit
    ) -> None:
        deadline = state.playback_deadline(index)
        # The listener's buffer: while it is short, the LLM's lead goes to audio first.
        playing = state.first_audio_at is not None
        chunks = session.plan(buffer_s=deadline - time.monotonic() if playing else None)
        if not chunks:
            return
        audio = await self.worker.decode([c.span for c in chunks], deadline)
        for chunk, samples in zip(chunks, audio, strict=True):
            emitted = session.complete(chunk, samples)
            if state.first_audio_at is None:
                state.first_audio_at = time.monotonic()
            decoded = state.samples_decoded
            decoded[index] = decoded.get(index, 0) + emitted.shape[0]
            if emitted.shape[0]:
                await emit(Audio(emitted, index))

    def _priority(self, state: RequestState, index: int) -> int | None:
        """vLLM's priority for segment ``index`` (lower: sooner), with LLM_PRIORITY: the
        audio its listener has left before this segment is needed, in 100 ms steps (0
        for a request's first segment, or one whose listener is already waiting)."""
        if not self.settings.llm_priority:
            return None
        ahead = state.playback_deadline(index - 1) - time.monotonic() if index else 0.0
        return max(0, min(PRIORITY_STEPS, int(ahead / PRIORITY_STEP_S)))

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


T = TypeVar("T")
_END = object()


@dataclass
class _Failed:
    error: Exception


async def read_ahead(
    items: AsyncIterator[T], on_end: Callable[[], None]
) -> AsyncIterator[list[tuple[float, T]]]:
    """``items`` read by a task of their own: each step yields every item that arrived
    since the last step, with its arrival time (``time.monotonic()``).

    ``on_end`` is called once the items have ended, failed or been abandoned. An error
    of ``items`` is raised after the items that came before it. Closing this generator
    stops the reader, which closes ``items``.
    """
    queue: asyncio.Queue[tuple[float, T] | _Failed | object] = asyncio.Queue()

    async def read() -> None:
        try:
            async with contextlib.aclosing(items):
                async for item in items:
                    queue.put_nowait((time.monotonic(), item))
        except Exception as err:  # handed to the consumer, in order
            queue.put_nowait(_Failed(err))
        else:
            queue.put_nowait(_END)
        finally:
            on_end()

    reader = asyncio.create_task(read())
    try:
        while True:
            waiting = [await queue.get()]
            while not queue.empty():
                waiting.append(queue.get_nowait())
            arrived = [item for item in waiting if isinstance(item, tuple)]
            if arrived:
                yield arrived
            last = waiting[-1]
            if isinstance(last, _Failed):
                raise last.error
            if last is _END:
                return
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
