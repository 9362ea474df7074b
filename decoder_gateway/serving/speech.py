"""The serving layer's entry: a request becomes a :class:`SpeechJob`, then a
:class:`SpeechStream` of events that a transport adapts to its wire format.

Every transport does the same three things::

    job = await service.prepare(text, voice, ...)        # InvalidRequest / VoiceNotFound
    stream = await service.open(job, endpoint)           # Overloaded past the limit
    try:
        async for event in stream: ...                   # GatewayError on failure
    finally:
        await stream.aclose(cause)                       # upstream aborted, then the slot freed

Anything unexpected below is raised as a typed error (``InternalError``,
``DecoderError``), so a transport has one family of errors to convert.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from decoder_gateway.codec.runtime.worker import DecodeWorker
from decoder_gateway.errors import GatewayError, InternalError, InvalidRequest
from decoder_gateway.llm.client import LLMClient
from decoder_gateway.llm.prompt import VoiceStyle, find_markup
from decoder_gateway.metrics import Metrics
from decoder_gateway.serving.admission import Admission, AdmissionPolicy, StreamSlots
from decoder_gateway.serving.capacity import CapacityModel
from decoder_gateway.serving.events import Audio, SpeechEvent
from decoder_gateway.serving.job import SpeechJob, new_request_id
from decoder_gateway.serving.scheduler import SegmentScheduler, SegmentSource
from decoder_gateway.serving.segment import SegmentSynthesis
from decoder_gateway.serving.style import check_style_request, style_voice
from decoder_gateway.settings import Settings
from decoder_gateway.text import normalize_text, split_segments
from decoder_gateway.voices.catalog import Voice
from decoder_gateway.voices.service import VoiceService

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 2048
# Texts longer than this are split in a worker thread: splitting is pure Python and
# would hold the event loop (and every other stream) for milliseconds.
_SPLIT_INLINE_CHARS = 400


class SpeechService:
    """Shared by every endpoint; built once per process."""

    def __init__(
        self,
        settings: Settings,
        llm: LLMClient,
        worker: DecodeWorker,
        voices: VoiceService,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.voices = voices
        self.metrics = metrics
        self.worker = worker
        self.sample_rate = worker.decoder.sample_rate
        self.capacity = CapacityModel(
            tokens_per_audio_s=self.sample_rate / worker.decoder.hop_length,
            headroom=settings.admission_headroom,
        )
        worker.on_batch = self.capacity.decoded
        policy = AdmissionPolicy(
            limit=settings.max_concurrent_streams,
            by_capacity=settings.admission_control,
            queue_s=settings.admission_queue_s,
            cold_streams=settings.admission_cold_streams,
            margin_s=settings.admission_margin_s,
        )
        self.slots = StreamSlots(policy, self.capacity)
        watch_admission(metrics, self.slots)
        self.synthesis = SegmentSynthesis(settings, llm, worker, metrics, self.capacity)
        # A request that gives no max_tokens gets the default, within the limit.
        self.default_max_tokens = min(DEFAULT_MAX_TOKENS, settings.max_tokens_limit)

    async def prepare(
        self,
        text: str,
        voice: str | None = None,
        speaker_id: int | None = None,
        temperature: float = 0.7,
        max_tokens: int | None = None,
        request_id: str | None = None,
        *,
        text_param: str = "text",
        resolved_voice: Voice | None = None,
        ref_audio: str | None = None,
        style: VoiceStyle | None = None,
    ) -> SpeechJob:
        """Validate a request; raises InvalidRequest / VoiceNotFound naming the field.

        ``ref_audio`` (a base64 ``data:`` URL) clones a voice for this request only;
        the voice named beside it, if any, gives the speaker id of the prompt.
        ``style``: the request's voice is designed from these labels instead (see
        :meth:`style_voice`; no voice, speaker id or clip may come with it).
        """
        limit = self.settings.max_text_chars
        if len(text) > limit:
            raise InvalidRequest(
                f"{text_param} has {len(text)} characters; the limit is {limit}", text_param
            )
        if not normalize_text(text):
            raise InvalidRequest(f"{text_param} is empty", text_param)
        if len(text) > _SPLIT_INLINE_CHARS:
            segments = await asyncio.to_thread(self._split, text)
        else:
            segments = self._split(text)
        if not segments:  # only punctuation or symbols
            raise InvalidRequest(f"{text_param} has nothing to speak", text_param)
        for segment in segments:
            self.check_segment(segment, text_param)
        if not 0.0 <= temperature <= 2.0:
            raise InvalidRequest(f"temperature must be in [0, 2], got {temperature}", "temperature")
        max_tokens = self.check_max_tokens(max_tokens)
        if style is not None:
            voice_entry = self.style_voice(
                style, voice=voice, speaker_id=speaker_id, ref_audio=ref_audio
            )
        else:
            voice_entry = resolved_voice or await self.voices.resolve(voice, speaker_id)
            if ref_audio is not None:
                voice_entry = await self.voices.inline(ref_audio, voice_entry)
        return SpeechJob(
            text,
            segments,
            voice_entry,
            temperature,
            max_tokens,
            new_request_id(request_id),
            style=style,
        )

    def style_voice(
        self,
        style: VoiceStyle,
        *,
        voice: str | None = None,
        speaker_id: int | None = None,
        ref_audio: str | None = None,
    ) -> Voice:
        """The voice of a job with ``style``: none pinned, its first segment writes it.

        Raises InvalidRequest naming ``voice`` / ``speaker_id`` / ``ref_audio`` when one
        comes with the style, VoiceDesignUnavailable (501) with VOICE_DESIGN off.
        """
        check_style_request(
            self.settings.voice_design, voice=voice, speaker_id=speaker_id, ref_audio=ref_audio
        )
        return style_voice(style, self.voices.catalog.resolve(None))

    @staticmethod
    def check_segment(segment: str, text_param: str = "text") -> None:
        """A segment about to reach a prompt: no prompt markup in it."""
        if markup := find_markup(segment):
            raise InvalidRequest(
                f"{text_param} holds {markup!r}, markup of the model's prompt format; "
                "text with such markup is refused, not spoken",
                text_param,
            )

    def check_max_tokens(self, max_tokens: int | None) -> int:
        """The request's max_tokens (the default when None), within MAX_TOKENS_LIMIT."""
        max_tokens = self.default_max_tokens if max_tokens is None else max_tokens
        if not 1 <= max_tokens <= self.settings.max_tokens_limit:
            raise InvalidRequest(
                f"max_tokens must be in [1, {self.settings.max_tokens_limit}], got {max_tokens}",
                "max_tokens",
            )
        return max_tokens

    def _split(self, text: str) -> tuple[str, ...]:
        return tuple(split_segments(text, max_chars=self.settings.max_segment_chars))

    async def open(
        self, job: SpeechJob, endpoint: str, source: SegmentSource | None = None
    ) -> SpeechStream:
        """Admit the job (maybe after a wait; Overloaded when there is no capacity) and
        start its segments: the job's own, or those that ``source`` receives while the
        stream plays."""
        admission = Admission(
            self.slots, self.metrics, job.request_id, endpoint, self.sample_rate, job.accepted_at
        )
        await admission.admit()
        logger.info(
            "request %s: %s, voice %s, %d characters",
            job.request_id,
            endpoint,
            job.voice.id,
            len(job.text),
            extra={"request_id": job.request_id, "endpoint": endpoint},
        )
        scheduler = SegmentScheduler(
            job,
            source or SegmentSource(job.segments, closed=True),
            self.synthesis,
            self.metrics,
            self.settings.segment_lookahead,
            self.settings.stream_buffer_chunks,
            self.sample_rate,
        )
        return SpeechStream(job, admission, scheduler)


def watch_admission(metrics: Metrics, slots: StreamSlots) -> None:
    """Gauges of admission and capacity, read from ``slots`` whenever they are scraped."""

    def capacity(stage: str) -> float:
        estimate = slots.capacity.estimate()
        value = estimate.llm_tokens_per_s if stage == "llm" else estimate.decoder_tokens_per_s
        return value or 0.0

    metrics.buffer_ahead_seconds.set_function(lambda: slots.lowest_buffer() or 0.0)
    metrics.admission_queue.set_function(lambda: slots.queued)
    metrics.capacity_streams.set_function(lambda: slots.capacity.estimate().streams or 0.0)
    for stage in ("llm", "decoder"):
        metrics.capacity_tokens_per_second.labels(stage).set_function(
            lambda stage=stage: capacity(stage)
        )


class SpeechStream:
    """The events of one admitted request. Its transport must :meth:`aclose` it."""

    def __init__(self, job: SpeechJob, admission: Admission, scheduler: SegmentScheduler) -> None:
        self.job = job
        self.admission = admission
        self._scheduler = scheduler
        self._events = scheduler.events()
        self._error: BaseException | None = None
        self._closed = False

    @property
    def samples(self) -> int:
        """Samples handed to the transport so far."""
        return self.admission.samples

    @property
    def designed_tokens(self) -> list[int] | None:
        """A style request's voice: the 32 global tokens its first segment wrote, once
        known (before its first audio); None until then, and for any other request."""
        if self.job.style is None:
            return None
        voice = self._scheduler.state.voice_tokens
        if not voice.done() or voice.cancelled() or voice.exception() is not None:
            return None
        return list(voice.result())

    def segment_samples(self, index: int) -> int | None:
        """Segment ``index``'s length in samples once its generation has ended, else None."""
        return self._scheduler.state.segment_samples.get(index)

    def __aiter__(self) -> AsyncIterator[SpeechEvent]:
        return self

    async def __anext__(self) -> SpeechEvent:
        try:
            event = await anext(self._events)
        except StopAsyncIteration:
            # All audio is out: account for it and free the slot now, not after the
            # transport has flushed its last bytes.
            self.admission.completed = True
            await self.aclose()
            raise
        except GatewayError as err:
            self._error = err
            raise
        except Exception as err:
            logger.error("request %s failed", self.job.request_id, exc_info=err)
            self._error = InternalError(f"internal error: {type(err).__name__}")
            raise self._error from err
        if isinstance(event, Audio):
            self.admission.audio(event.samples.shape[0])
        return event

    async def audio(self) -> AsyncIterator[Audio]:
        """Only the audio events, for transports that send nothing else."""
        async for event in self:
            if isinstance(event, Audio):
                yield event

    def fail(self, err: BaseException) -> None:
        """Record a failure of the transport's own (an encoder's): the request's outcome."""
        if self._error is None:
            self._error = err

    async def aclose(self, cause: BaseException | None = None) -> None:
        """Stop: abort every upstream request, then free the slot and record the outcome.

        ``cause`` is why the transport stopped (SlowClient, ClientGone...); without one,
        the error the stream raised, if any, decides the outcome.
        """
        if self._closed:
            return
        self._closed = True
        try:
            await self._events.aclose()
            await self._scheduler.close()
        finally:
            self.admission.finish(cause or self._error)
