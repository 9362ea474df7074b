"""Models of the voice endpoints: GET /v1/voices and the library, /v1/audio/voices.

A listing entry is the same for packaged and cloned voices (``cloned`` tells them
apart); a cloned voice on its own is the library's :class:`ClonedVoiceInfo`.
"""

from __future__ import annotations

from typing import Literal, Self

from pydantic import BaseModel, Field

from decoder_gateway.voices.catalog import Voice
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
