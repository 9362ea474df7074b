"""The voice catalog: the packaged fine-tune speakers, replaced or extended by a file.

A voice is a speaker id (the prompt's ``"{speaker_id}: {text}"``) and, usually, its
pinned :data:`GlobalTokens`; without them the model writes its own, which the gateway
then pins for the rest of the request.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, Field, ValidationError

from decoder_gateway.errors import VoiceNotFound

GLOBAL_TOKEN_COUNT = 32
GLOBAL_CODEBOOK_SIZE = 4096


def check_global_tokens(tokens: list[int]) -> list[int]:
    """``tokens`` if they can be a voice's global tokens; else ValueError saying why."""
    if len(tokens) != GLOBAL_TOKEN_COUNT:
        raise ValueError(f"needs exactly {GLOBAL_TOKEN_COUNT} global tokens, has {len(tokens)}")
    if any(not 0 <= t < GLOBAL_CODEBOOK_SIZE for t in tokens):
        raise ValueError(f"global tokens must lie in [0, {GLOBAL_CODEBOOK_SIZE})")
    return tokens


GlobalTokens = Annotated[list[int], AfterValidator(check_global_tokens)]
"""A voice's BiCodec global tokens: exactly 32 codes of its 4096-entry codebook."""


class Voice(BaseModel):
    id: str = Field(min_length=1)
    speaker_id: int = Field(ge=0)
    language: str = ""
    gender: str = ""
    global_tokens: GlobalTokens | None = None


class VoiceFile(BaseModel):
    default_voice: str | None = None
    replace: bool = False  # true: the file's voices replace the packaged ones
    voices: list[Voice]


class VoiceCatalog:
    def __init__(self, voices: list[Voice], default_voice: str) -> None:
        self._by_id = {v.id: v for v in voices}
        self._by_speaker = {v.speaker_id: v for v in voices}
        if default_voice not in self._by_id:
            raise ValueError(f"default voice {default_voice!r} is not among the voices")
        self.default_voice = default_voice

    @classmethod
    def load(cls, extra_file: Path | None = None) -> VoiceCatalog:
        packaged = _parse(
            resources.files(__package__).joinpath("voices.json").read_text(), "voices.json"
        )
        voices = {v.id: v for v in packaged.voices}
        default = packaged.default_voice or packaged.voices[0].id
        if extra_file is not None:
            extra = _parse(Path(extra_file).read_text(), str(extra_file))
            if extra.replace:
                voices = {}
            voices.update({v.id: v for v in extra.voices})
            default = extra.default_voice or (default if default in voices else extra.voices[0].id)
        return cls(list(voices.values()), default)

    def __iter__(self) -> Iterator[Voice]:
        return iter(self._by_id.values())

    def __len__(self) -> int:
        return len(self._by_id)

    @property
    def ids(self) -> list[str]:
        return list(self._by_id)

    def resolve(self, voice: str | None = None, speaker_id: int | None = None) -> Voice:
        """The voice named by id and/or speaker id; the default when neither is given."""
        by_id = self._by_id.get(voice) if voice else None
        by_speaker = self._by_speaker.get(speaker_id) if speaker_id is not None else None
        if voice and by_id is None:
            raise VoiceNotFound(
                f"unknown voice {voice!r}; valid voices: {self._listing()}", "voice"
            )
        if speaker_id is not None and by_speaker is None:
            raise VoiceNotFound(
                f"unknown speaker_id {speaker_id}; valid voices: {self._listing()}", "speaker_id"
            )
        if by_id and by_speaker and by_id is not by_speaker:
            raise VoiceNotFound(
                f"voice {voice!r} has speaker_id {by_id.speaker_id}, not {speaker_id}; "
                "give one of the two",
                "speaker_id",
            )
        return by_id or by_speaker or self._by_id[self.default_voice]

    def _listing(self) -> str:
        return ", ".join(f"{v.id} ({v.speaker_id})" for v in self._by_id.values())


def _parse(text: str, source: str) -> VoiceFile:
    try:
        return VoiceFile.model_validate(json.loads(text))
    except (ValueError, ValidationError) as err:
        raise ValueError(f"invalid voices file {source}: {err}") from None
