"""Voice design: candidate voices made from the base model's style labels.

Each candidate is one generation of the preview text with the controllable prompt.
The model writes tokens of its own first (attribute values), then the 32 global
tokens that are the voice, then the preview's semantic tokens. The global tokens
are read by id (the LLM client drops every other token), and the preview is decoded
with them by the shared decode worker, like any stream's chunks. A generation that
writes another number of global tokens is tried once more with another seed, then
the request fails with ``VoiceDesignFailed``: a wrong count would decode to no voice
at all, or worse, a voice the labels did not ask for.

With ``DESIGN_STRUCTURED_OUTPUTS`` (on by default) each generation is sent with a
grammar over token ids (:mod:`decoder_gateway.llm.grammar`), vLLM's structured
outputs: the model can then only write the design's shape, 32 global tokens among
it. The markers' ids come from vLLM's tokenizer (``/tokenize``), once per process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar

import torch

from decoder_gateway.audio.encoders import whole_wav
from decoder_gateway.audio.pcm import to_pcm16
from decoder_gateway.codec import StreamingConfig
from decoder_gateway.codec.runtime.worker import DecodeWorker
from decoder_gateway.errors import (
    InvalidRequest,
    UpstreamError,
    VoiceDesignFailed,
    VoiceDesignUnavailable,
)
from decoder_gateway.llm.client import LLMClient, SamplingParams, prompt_token_bound
from decoder_gateway.llm.grammar import DesignConstraint
from decoder_gateway.llm.prompt import VoiceStyle, controllable_prompt, find_markup
from decoder_gateway.metrics import Metrics
from decoder_gateway.serving.admission import Admission, StreamSlots
from decoder_gateway.serving.segment import token_budget
from decoder_gateway.settings import Settings
from decoder_gateway.text import normalize_text
from decoder_gateway.voices.catalog import GLOBAL_TOKEN_COUNT

logger = logging.getLogger(__name__)

MAX_CANDIDATES = 4
ATTEMPTS = 2  # a generation with a wrong count of global tokens is tried once more
# Upstream's own voice-design examples sample at 0.8: varied voices, clear speech.
DESIGN_TEMPERATURE = 0.8
# Tokens the model writes before the global ones (attribute values): room for them on
# top of the usual per-segment budget.
ATTRIBUTE_TOKENS_ALLOWANCE = 64
_SEED_LIMIT = 2**31  # vLLM takes any int; this keeps seeds plain 32-bit values

T = TypeVar("T")


@dataclass(frozen=True)
class DesignedVoice:
    """One candidate: its voice (32 global tokens) and its preview as a WAV file."""

    global_tokens: list[int]
    wav: bytes
    seconds: float


@dataclass(frozen=True)
class _Generation:
    global_tokens: list[int]
    semantic: list[int]


class VoiceDesigner:
    """Runs design requests; built once per process beside the speech service."""

    def __init__(
        self,
        settings: Settings,
        llm: LLMClient,
        worker: DecodeWorker,
        slots: StreamSlots,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.llm = llm
        self.worker = worker
        self.slots = slots
        self.metrics = metrics
        self.sample_rate = worker.decoder.sample_rate
        # The whole preview is known before it is decoded: a schedule by token counts
        # only (no first-audio budget), with the configured crossfade.
        self.streaming = StreamingConfig(crossfade_samples=settings.stream_crossfade_samples)
        self.constraint = DesignConstraint(llm, settings.design_structured_outputs)

    @property
    def enabled(self) -> bool:
        return self.settings.voice_design

    def check_enabled(self) -> None:
        if not self.enabled:
            raise VoiceDesignUnavailable(
                "voice design is off on this server (VOICE_DESIGN=off): it needs a model "
                "trained on the controllable prompt, the base model SparkAudio/Spark-TTS-0.5B; "
                "the speaker fine-tunes served by default were not trained for it. Saved "
                "voices (POST /v1/audio/voices with global_tokens) work on every model"
            )

    def check_text(self, text: str) -> str:
        """The preview text, one segment long; InvalidRequest naming ``text`` otherwise."""
        limit = self.settings.max_segment_chars
        if len(text) > limit:
            raise InvalidRequest(
                f"text has {len(text)} characters; a preview is one sentence of at most "
                f"{limit} (MAX_SEGMENT_CHARS)",
                "text",
            )
        if not normalize_text(text):
            raise InvalidRequest("text is empty", "text")
        if markup := find_markup(text):
            raise InvalidRequest(
                f"text holds {markup!r}, markup of the model's prompt format; it is refused",
                "text",
            )
        return text

    async def design(
        self,
        style: VoiceStyle,
        text: str,
        candidates: int,
        request_id: str,
        seed: int | None = None,
    ) -> list[DesignedVoice]:
        """``candidates`` voices for ``style``, generated concurrently, each with its
        preview of ``text``. ``seed`` makes the answer repeatable (candidate i samples
        with seed + i); None: a fresh random one.

        Raises VoiceDesignUnavailable (501, VOICE_DESIGN off), InvalidRequest,
        Overloaded / ShuttingDown (no slot), VoiceDesignFailed and the LLM's and the
        decoder's typed errors.
        """
        self.check_enabled()
        text = self.check_text(text)
        if not 1 <= candidates <= MAX_CANDIDATES:
            raise InvalidRequest(
                f"candidates must be in [1, {MAX_CANDIDATES}], got {candidates}", "candidates"
            )
        prompt = controllable_prompt(text, style)
        base_seed = secrets.randbelow(_SEED_LIMIT) if seed is None else seed
        # One stream slot for the whole request, not one per candidate: a speech request
        # also has several LLM requests in flight under its one slot (SEGMENT_LOOKAHEAD),
        # and the candidates are short previews with no listener to keep in real time.
        admission = Admission(
            self.slots, self.metrics, request_id, "design", self.sample_rate, time.monotonic()
        )
        await admission.admit()
        logger.info(
            "request %s: design, %d candidates, %s/%s/%s",
            request_id,
            candidates,
            style.gender,
            style.pitch,
            style.speed,
            extra={"request_id": request_id, "endpoint": "design"},
        )
        error: BaseException | None = None
        try:
            voices = await _gather_all(
                [
                    self._candidate(prompt, text, request_id, index, base_seed)
                    for index in range(candidates)
                ]
            )
        except BaseException as err:
            error = err
            raise
        else:
            admission.audio(sum(round(v.seconds * self.sample_rate) for v in voices))
            admission.completed = True
            return voices
        finally:
            admission.finish(error)

    async def _candidate(
        self, prompt: str, text: str, request_id: str, index: int, base_seed: int
    ) -> DesignedVoice:
        counts: list[int] = []
        for attempt in range(ATTEMPTS):
            # Another seed for the retry: the same one would sample the same tokens.
            seed = (base_seed + attempt * MAX_CANDIDATES + index) % _SEED_LIMIT
            generation = await self._generate(
                prompt, text, f"{request_id}-design{index}-{attempt}", seed
            )
            count = len(generation.global_tokens)
            if count == GLOBAL_TOKEN_COUNT and generation.semantic:
                audio = await self._decode(generation)
                wav = await asyncio.to_thread(_wav_file, audio, self.sample_rate)
                return DesignedVoice(
                    generation.global_tokens, wav, audio.shape[0] / self.sample_rate
                )
            counts.append(count)
            logger.warning(
                "request %s: design candidate %d, attempt %d wrote %d global tokens and %d "
                "semantic ones",
                request_id,
                index + 1,
                attempt + 1,
                count,
                len(generation.semantic),
                extra={"request_id": request_id, "endpoint": "design"},
            )
        wrote = " then ".join(map(str, counts))
        raise VoiceDesignFailed(
            f"the model did not write a voice for candidate {index + 1}: it wrote {wrote} "
            f"global tokens (BiCodec needs exactly {GLOBAL_TOKEN_COUNT}, and speech after "
            "them) in both tries. Is the served model one trained for voice design "
            "(SparkAudio/Spark-TTS-0.5B)?"
        )

    async def _generate(self, prompt: str, text: str, request_id: str, seed: int) -> _Generation:
        sampling = SamplingParams(
            temperature=DESIGN_TEMPERATURE,
            top_p=self.settings.top_p,
            top_k=self.settings.top_k,
            repetition_penalty=self.settings.repetition_penalty,
            max_tokens=self._max_tokens(text, prompt),
        )
        global_tokens: list[int] = []
        semantic: list[int] = []
        structured = await self.structured_outputs()
        tokens = self.llm.stream_tokens(
            prompt, sampling, request_id=request_id, seed=seed, structured_outputs=structured
        )
        try:
            # aclosing: a failed sibling cancels this one, and vLLM must then abort at once.
            async with contextlib.aclosing(tokens):
                async for delta in tokens:
                    global_tokens += delta.global_tokens
                    semantic += delta.semantic
        except UpstreamError as err:
            if structured is None or not str(err).startswith("vLLM refused"):
                raise
            raise UpstreamError(
                f"{err}. The design request carried a grammar in structured_outputs "
                "(DESIGN_STRUCTURED_OUTPUTS=on), which needs vLLM 0.10.2 or later with "
                "the xgrammar or guidance backend; or set DESIGN_STRUCTURED_OUTPUTS=off"
            ) from err
        return _Generation(global_tokens, semantic)

    async def structured_outputs(self) -> dict[str, str] | None:
        """vLLM's ``structured_outputs`` for a design generation (None: unconstrained)."""
        return await self.constraint.structured_outputs()

    def _max_tokens(self, text: str, prompt: str) -> int:
        budget = token_budget(text, writes_globals=True) + ATTRIBUTE_TOKENS_ALLOWANCE
        max_tokens = min(budget, self.settings.max_tokens_limit)
        if context := self.llm.max_model_len:
            room = context - prompt_token_bound(prompt)
            if room < 1:
                raise UpstreamError(
                    f"vLLM's max_model_len of {context} tokens leaves no room after the "
                    "design prompt: raise MAX_MODEL_LEN or shorten the text"
                )
            max_tokens = min(max_tokens, room)
        return max_tokens

    async def _decode(self, generation: _Generation) -> torch.Tensor:
        """The whole preview, decoded by the shared worker in the streams' chunks."""
        session = self.worker.open_stream(generation.global_tokens, self.streaming)
        session.push(generation.semantic)
        session.finish()
        chunks = session.plan()  # finished: every chunk up to the true end
        decoded = await self.worker.decode([chunk.span for chunk in chunks])
        pieces = [
            session.complete(chunk, samples) for chunk, samples in zip(chunks, decoded, strict=True)
        ]
        return torch.cat(pieces)


def _wav_file(audio: torch.Tensor, sample_rate: int) -> bytes:
    return whole_wav(to_pcm16(audio), sample_rate)


async def _gather_all(awaitables: list[Awaitable[T]]) -> list[T]:
    """Every result, or the first failure with the others cancelled (and their upstream
    requests aborted), not left running for a request that has already failed."""
    tasks = [asyncio.ensure_future(awaitable) for awaitable in awaitables]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
