"""Wire types every API shares: request text, the error shapes, the audio format.

Each API's own models sit beside its routes (``stream_protocol``, ``openai_protocol``,
``voices_protocol``); the field names and defaults are what clients already send.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, StrictStr

from decoder_gateway.audio.encoders import SAMPLE_RATES
from decoder_gateway.llm.prompt import Gender, Level, VoiceStyle

SAMPLE_RATE = 16000
PCM_HEADERS = {"X-Sample-Rate": str(SAMPLE_RATE), "X-Bit-Depth": "16", "X-Channels": "1"}


def _valid_unicode(text: str) -> str:
    """JSON may carry lone UTF-16 surrogates (``"\\ud800"``), which no text can hold."""
    for position, char in enumerate(text):
        if "\ud800" <= char <= "\udfff":
            raise ValueError(
                f"holds a lone UTF-16 surrogate (U+{ord(char):04X}) at character {position}; "
                "send valid Unicode"
            )
    return text


def _offered_rate(rate: int) -> int:
    if rate not in SAMPLE_RATES:
        raise ValueError(f"must be one of {', '.join(map(str, SAMPLE_RATES))}")
    return rate


# Text of a request: valid Unicode. Ids and counts: JSON integers, never booleans
# (pydantic would otherwise take `true` as 1) nor strings.
Text = Annotated[str, AfterValidator(_valid_unicode)]
SegmentId = StrictStr | StrictInt
# An output rate of the WebSockets' audio (those of /v1/audio/speech also depend on
# the codec, checked there).
SampleRate = Annotated[StrictInt, AfterValidator(_offered_rate)]
SAMPLE_RATE_DOC = (
    "Output sample rate: 8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100 or 48000. "
    "Default: 8000 for mulaw and alaw, else 16000 (the model's own rate, not resampled)."
)
SpokenUntil = Literal["sentence", "word"]
SPOKEN_TEXT_DOC = (
    "The text whose audio was sent: whole sentences, then the words of the sentence cut "
    "off whose share of its characters lies within the share of its audio sent (an "
    "estimate, once that sentence's length is known; else it stops at the last whole one)."
)
REF_AUDIO_DOC = (
    "A reference clip as a base64 data: URL (data:audio/wav;base64,...): speak in its voice, "
    "cloned for this request only (nothing is stored). `voice` then gives the speaker id."
)
DEFAULT_MAX_TOKENS_DOC = "Semantic-token budget per sentence; default min(2048, MAX_TOKENS_LIMIT)."


VOICE_GLOBAL_TOKENS_HEADER = "X-Voice-Global-Tokens"
STYLE_DOC = (
    "Instead of a voice (VOICE_DESIGN=on; else 501): the base model's style labels. The "
    "first sentence is generated with the controllable prompt, and the 32 global tokens "
    "it writes are the voice of every later sentence; they are returned so that the "
    "voice can be saved (POST /v1/audio/voices with global_tokens)."
)
GLOBAL_TOKENS_DOC = (
    "A style request's voice: the 32 global tokens its first sentence wrote (save them "
    "with POST /v1/audio/voices to keep the voice). Absent for any other request."
)


class StyleLabels(BaseModel):
    """``style``: a voice described by the base model's labels, those of
    ``POST /v1/audio/voices/design``."""

    model_config = ConfigDict(extra="forbid")

    gender: Gender
    pitch: Level
    speed: Level

    def to_style(self) -> VoiceStyle:
        return VoiceStyle(self.gender, self.pitch, self.speed)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape, used by every HTTP endpoint."""

    error: ErrorDetail


class ErrorMessage(BaseModel):
    """A WebSocket ``error`` frame; the connection stays open."""

    type: Literal["error"] = "error"
    message: str
    code: str
    segment_id: str | int | None = None
    # Seconds to wait before retrying, on a refusal for capacity (too_many_streams).
    retry_after: int | None = Field(None, exclude_if=lambda value: value is None)


class AuthReply(BaseModel):
    """Answer to ``{"type": "auth", "api_key": ...}`` on the WebSocket."""

    type: Literal["auth"] = "auth"
    status: Literal["ok"] = "ok"
