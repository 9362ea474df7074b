"""The voice library: GET/POST /v1/audio/voices, GET/DELETE /v1/audio/voices/{name}.

Uploads are multipart/form-data in the shape of vLLM-Omni's OpenAI-compatible server:
``audio_sample`` (the clip) and ``name`` (the new voice's id), plus optional fields
that are stored and listed. The listing is also what Open WebUI reads
(``voices[].id`` / ``.name``): packaged voices first, then the cloned ones.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Request, UploadFile

from decoder_gateway.api.protocol import ErrorResponse
from decoder_gateway.api.state import get_gateway
from decoder_gateway.api.voices_protocol import (
    AudioVoiceInfo,
    AudioVoiceList,
    ClonedVoiceResponse,
    VoiceDeleted,
)
from decoder_gateway.voices.service import VoiceService

router = APIRouter(tags=["Voices"])

_ERRORS = {
    400: {"model": ErrorResponse, "description": "Bad name, not audio, silence, too short/long"},
    404: {"model": ErrorResponse, "description": "No such cloned voice"},
    409: {"model": ErrorResponse, "description": "The name is taken"},
    413: {"model": ErrorResponse, "description": "Over MAX_CLIP_BYTES"},
    501: {"model": ErrorResponse, "description": "The checkpoint has no speaker encoder"},
}
OptionalField = Annotated[str | None, Form()]


def _service(request: Request) -> VoiceService:
    return get_gateway(request).voices


@router.get("/v1/audio/voices")
async def list_audio_voices(request: Request) -> AudioVoiceList:
    """Packaged and cloned voices, with display names (``voices[].id`` / ``.name``)."""
    service = _service(request)
    voices = [*service.catalog, *await service.cloned()]  # packaged first
    return AudioVoiceList(
        voices=[AudioVoiceInfo.of(voice) for voice in voices],
        default_voice=service.catalog.default_voice,
        aliases=service.aliases,
    )


@router.post("/v1/audio/voices", status_code=201, responses=_ERRORS)
async def create_voice(
    request: Request,
    audio_sample: Annotated[UploadFile, File(description="The clip: wav, flac, mp3, ogg...")],
    name: Annotated[str, Form(description="1-64 of A-Z a-z 0-9 _ -; the voice's id")],
    consent: OptionalField = None,
    ref_text: OptionalField = None,
    language: OptionalField = None,
    gender: OptionalField = None,
    speaker_description: OptionalField = None,
    base_voice: Annotated[
        str | None, Form(description="A packaged voice whose speaker id the prompt uses")
    ] = None,
) -> ClonedVoiceResponse:
    """Clone a voice from a clip (0.5 to 60 s; the first 6 s are used) and store it."""
    audio = await audio_sample.read()
    voice = await _service(request).create(
        name,
        audio,
        audio_sample.filename,
        base_voice=base_voice,
        consent=consent,
        ref_text=ref_text,
        language=language,
        gender=gender,
        speaker_description=speaker_description,
    )
    return ClonedVoiceResponse(voice=voice)


@router.get("/v1/audio/voices/{name}", responses=_ERRORS)
async def get_voice(name: str, request: Request) -> ClonedVoiceResponse:
    """One cloned voice, with its 32 global tokens."""
    return ClonedVoiceResponse(voice=await _service(request).get(name))


@router.delete("/v1/audio/voices/{name}", responses=_ERRORS)
async def delete_voice(name: str, request: Request) -> VoiceDeleted:
    """Remove a cloned voice (packaged voices cannot be removed)."""
    await _service(request).delete(name)
    return VoiceDeleted(id=name)
