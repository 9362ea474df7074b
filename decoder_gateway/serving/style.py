"""Style requests: one request's voice designed from the base model's style labels.

A speech request may give a :class:`~decoder_gateway.llm.prompt.VoiceStyle` instead
of a voice (``VOICE_DESIGN=on`` only). Its first sentence is generated with the
controllable prompt: the model writes tokens of its own, then the 32 global tokens
of a voice for the labels, then the sentence's speech. Those tokens are pinned for
every later sentence (one voice per request, as for a voice that has none) and
handed back to the client, who may save them as a voice.

A first sentence whose generation writes another number of global tokens (or no
speech after them) is tried once more before any of it is used, then the request
fails with ``VoiceDesignFailed``: never a wrong voice. No audio has been produced by
then, so the retry costs time to first audio only when it happens.

OpenAI's ``instructions`` can name the labels in words (:func:`style_from_instructions`).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import AsyncIterator
from typing import TypeVar

from decoder_gateway.errors import InvalidRequest, VoiceDesignFailed, VoiceDesignUnavailable
from decoder_gateway.llm.client import LLMClient, SamplingParams, TokenDelta
from decoder_gateway.llm.prompt import Gender, Level, VoiceStyle
from decoder_gateway.voices.catalog import GLOBAL_TOKEN_COUNT, Voice

logger = logging.getLogger(__name__)

T = TypeVar("T")
ATTEMPTS = 2  # a first sentence that writes no valid voice is tried once more


def check_style_enabled(voice_design: bool) -> None:
    """VoiceDesignUnavailable (501) saying why, when ``VOICE_DESIGN`` is off."""
    if not voice_design:
        raise VoiceDesignUnavailable(
            "style requests are off on this server (VOICE_DESIGN=off): a voice made from "
            "style labels needs a model trained on the controllable prompt, the base model "
            "SparkAudio/Spark-TTS-0.5B; the speaker fine-tunes served by default were not "
            "trained for it. Give a voice instead"
        )


def check_style_request(
    voice_design: bool,
    *,
    voice: str | None = None,
    speaker_id: int | None = None,
    ref_audio: str | None = None,
) -> None:
    """A style request names no voice besides (400 naming the field), on a server with
    design on (501)."""
    for name, value in (("voice", voice), ("speaker_id", speaker_id), ("ref_audio", ref_audio)):
        if value is not None:
            raise InvalidRequest(
                f"{name} and style were both given: style makes the request's voice, so "
                f"give one of the two",
                name,
            )
    check_style_enabled(voice_design)


def style_voice(style: VoiceStyle, default: Voice) -> Voice:
    """The voice of a style request's job: no global tokens (the first sentence writes
    them), the default voice's speaker id (which no prompt of the request uses: the
    first is the controllable one, the later ones the base model's, without one)."""
    return Voice(
        id=f"style:{style.gender}/{style.pitch}/{style.speed}",
        speaker_id=default.speaker_id,
        gender=style.gender,
    )


async def voice_first_tokens(
    llm: LLMClient,
    prompt: str,
    sampling: SamplingParams,
    request_id: str,
    priority: int | None = None,
    structured_outputs: dict[str, str] | None = None,
) -> AsyncIterator[TokenDelta]:
    """The token stream of a style request's first sentence, whose voice is checked
    before any of it is used.

    The global tokens are held back until the first speech token; the first delta
    yielded carries all 32 of them with that speech, then the rest passes through.
    ``structured_outputs`` (DESIGN_STRUCTURED_OUTPUTS) hold vLLM to the shape of a
    design. A generation that writes another count, or no speech, is closed (vLLM aborts it)
    and tried once more (request id ``<id>-retry1``); then VoiceDesignFailed.
    """
    tries: list[str] = []
    for attempt in range(ATTEMPTS):
        attempt_id = request_id if attempt == 0 else f"{request_id}-retry{attempt}"
        tokens = llm.stream_tokens(
            prompt,
            sampling,
            request_id=attempt_id,
            priority=priority,
            structured_outputs=structured_outputs,
        )
        # aclosing: a wrong voice, a cancel or the consumer closing this generator
        # closes the upstream stream at once.
        async with contextlib.aclosing(tokens):
            written: list[int] = []
            first: TokenDelta | None = None
            async for delta in tokens:
                written += delta.global_tokens
                if delta.semantic:
                    first = delta
                    break
            if first is not None and len(written) == GLOBAL_TOKEN_COUNT:
                yield TokenDelta(global_tokens=written, semantic=first.semantic)
                async for delta in tokens:
                    yield delta
                return
        tries.append(f"{len(written)} global tokens" + ("" if first else " and no speech"))
        logger.warning(
            "request %s: the style's voice, attempt %d: the model wrote %s",
            request_id,
            attempt + 1,
            tries[-1],
            extra={"request_id": request_id},
        )
    raise VoiceDesignFailed(
        f"the model did not write a voice for the style: it wrote {' then '.join(tries)} "
        f"(BiCodec needs exactly {GLOBAL_TOKEN_COUNT}, and speech after them) in both tries. "
        "Is the served model one trained for voice design (SparkAudio/Spark-TTS-0.5B)?"
    )


# -- OpenAI's instructions ------------------------------------------------------------

# Words and phrases of OpenAI's ``instructions`` that name a label, matched whole
# (lowercased; anything but letters separates words; the longest phrase wins, so
# "very slow" is very_low, not low). Everything else in the text is ignored.
GENDER_WORDS: dict[str, Gender] = {
    "female": "female",
    "woman": "female",
    "girl": "female",
    "feminine": "female",
    "male": "male",
    "man": "male",
    "boy": "male",
    "masculine": "male",
}
PITCH_PHRASES: dict[str, Level] = {
    "very low pitch": "very_low",
    "very low pitched": "very_low",
    "very deep": "very_low",
    "low pitch": "low",
    "low pitched": "low",
    "deep": "low",
    "moderate pitch": "moderate",
    "medium pitch": "moderate",
    "normal pitch": "moderate",
    "high pitch": "high",
    "high pitched": "high",
    "very high pitch": "very_high",
    "very high pitched": "very_high",
}
SPEED_PHRASES: dict[str, Level] = {
    "very slow": "very_low",
    "very slowly": "very_low",
    "slow": "low",
    "slowly": "low",
    "moderate speed": "moderate",
    "medium speed": "moderate",
    "normal speed": "moderate",
    "moderate pace": "moderate",
    "normal pace": "moderate",
    "fast": "high",
    "quick": "high",
    "quickly": "high",
    "very fast": "very_high",
    "very quick": "very_high",
    "very quickly": "very_high",
}
_LONGEST = max(len(phrase.split()) for phrase in (*PITCH_PHRASES, *SPEED_PHRASES))
_WORD = re.compile(r"[a-z]+")


def style_from_instructions(instructions: str | None) -> VoiceStyle:
    """The labels OpenAI's ``instructions`` name, word by word: a gender is required,
    pitch and speed are ``moderate`` when not named. InvalidRequest naming
    ``instructions`` when it names no gender, or two values of one label."""
    words = _WORD.findall((instructions or "").lower())
    genders: list[Gender] = []
    pitches: list[Level] = []
    speeds: list[Level] = []
    position = 0
    while position < len(words):
        for length in range(min(_LONGEST, len(words) - position), 0, -1):
            phrase = " ".join(words[position : position + length])
            if phrase in GENDER_WORDS:
                _add(genders, GENDER_WORDS[phrase])
            elif phrase in PITCH_PHRASES:
                _add(pitches, PITCH_PHRASES[phrase])
            elif phrase in SPEED_PHRASES:
                _add(speeds, SPEED_PHRASES[phrase])
            else:
                continue
            position += length
            break
        else:
            position += 1
    for attribute, labels in (("gender", genders), ("pitch", pitches), ("speed", speeds)):
        if len(labels) > 1:
            raise InvalidRequest(
                f"instructions name more than one {attribute}: {' and '.join(labels)}",
                "instructions",
            )
    if not genders:
        raise InvalidRequest(
            "voice 'design' designs the request's voice from style labels: give a style "
            "object, or instructions that name a gender (female, woman, girl, feminine; "
            "male, man, boy, masculine), and optionally a pitch (e.g. 'deep', 'high pitch') "
            "and a speed (e.g. 'slow', 'very fast')",
            "instructions",
        )
    return VoiceStyle(
        genders[0], pitches[0] if pitches else "moderate", speeds[0] if speeds else "moderate"
    )


def _add(labels: list[T], label: T) -> None:
    if label not in labels:
        labels.append(label)
