"""Models of the voice endpoints: GET /v1/voices and the library, /v1/audio/voices.

A listing entry is the same for packaged and cloned voices (``cloned`` tells them
apart); a cloned voice on its own is the library's :class:`ClonedVoiceInfo`.
"""

from __future__ import annotations

from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field

from decoder_gateway.llm.prompt import Gender, Level
from decoder_gateway.voices.catalog import GlobalTokens, Voice
from decoder_gateway.voices.library import ClonedVoiceInfo


class VoiceInfo(BaseModel):
    """A voice of ``GET /v1/voices``."""

    id: str
    speaker_id: int
    language: str
    gender: str
    cloned: bool = False

    @classmethod
    def of(cls, voice: Voice | ClonedVoiceInfo) -> Self:
        """The entry of a packaged voice (a catalog :class:`Voice`) or of a cloned one."""
        return cls(
            id=voice.id,
            speaker_id=voice.speaker_id,
            language=voice.language or "",
            gender=voice.gender or "",
            cloned=isinstance(voice, ClonedVoiceInfo),
        )


class VoiceList(BaseModel):
    voices: list[VoiceInfo]


class AudioVoiceInfo(VoiceInfo):
    """A voice of ``GET /v1/audio/voices``: also a name to show."""

    name: str = Field(description="A display name, e.g. 'Luganda (female)'.")

    @classmethod
    def of(cls, voice: Voice | ClonedVoiceInfo) -> Self:
        return cls(**VoiceInfo.of(voice).model_dump(), name=display_name(voice))


class AudioVoiceList(BaseModel):
    """``GET /v1/audio/voices``: ``voices[].id`` / ``.name`` is what Open WebUI reads."""

    voices: list[AudioVoiceInfo]
    default_voice: str
    aliases: dict[str, str] = Field(
        default_factory=dict, description="VOICE_ALIASES: other names -> voice ids"
    )


class ClonedVoiceResponse(BaseModel):
    voice: ClonedVoiceInfo


class SaveVoiceRequest(BaseModel):
    """``POST /v1/audio/voices`` as JSON: a voice given by its 32 global tokens (a
    designed candidate, or a voice made elsewhere), stored like a cloned one."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="1-64 of A-Z a-z 0-9 _ -; the voice's id")
    global_tokens: GlobalTokens = Field(description="32 BiCodec global tokens in [0, 4096)")
    gender: str | None = None
    speaker_description: str | None = None
    language: str | None = None
    consent: str | None = None
    base_voice: str | None = Field(
        None, description="A packaged voice whose speaker id the prompt uses"
    )


DEFAULT_PREVIEW_TEXT = (
    "Hello! This is how I sound when I read a sentence aloud, calmly and clearly."
)


class VoiceDesignRequest(BaseModel):
    """``POST /v1/audio/voices/design``: candidate voices for the style labels."""

    model_config = ConfigDict(extra="forbid")

    gender: Gender
    pitch: Level
    speed: Level
    text: str = Field(DEFAULT_PREVIEW_TEXT, description="The preview: one sentence")
    candidates: int = Field(3, ge=1, le=4, description="How many voices to make (1-4)")
    seed: int | None = Field(
        None, ge=0, lt=2**31, description="Repeatable candidates (candidate i: seed + i)"
    )


class DesignedCandidate(BaseModel):
    global_tokens: list[int] = Field(description="The voice: save it under a name to keep it")
    audio: str = Field(description="The preview, a data:audio/wav;base64 URL")
    duration_s: float


class VoiceDesignResponse(BaseModel):
    candidates: list[DesignedCandidate]


class VoiceDeleted(BaseModel):
    id: str
    object: Literal["voice"] = "voice"
    deleted: bool = True


def display_name(voice: Voice | ClonedVoiceInfo) -> str:
    """A cloned voice's name; a packaged voice's language (and gender), else its id."""
    if isinstance(voice, ClonedVoiceInfo):
        return voice.name
    if not voice.language:
        return voice.id
    return f"{voice.language} ({voice.gender})" if voice.gender else voice.language
