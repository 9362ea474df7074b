"""The voice library: GET/POST /v1/audio/voices, GET/DELETE /v1/audio/voices/{name}.

Uploads are multipart/form-data in the shape of vLLM-Omni's OpenAI-compatible server:
``audio_sample`` (the clip) and ``name`` (the new voice's id), plus optional fields
that are stored and listed. The same POST with a JSON body saves a voice given by its
32 global tokens (a designed one, or one made elsewhere). The listing is also what
Open WebUI reads (``voices[].id`` / ``.name``): packaged voices first, then the cloned
ones. POST /v1/audio/voices/design makes candidate voices from style labels.
"""

from __future__ import annotations

import base64
from typing import Annotated

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from decoder_gateway.api.protocol import ErrorResponse
from decoder_gateway.api.state import get_gateway
from decoder_gateway.api.voices_protocol import (
    AudioVoiceInfo,
    AudioVoiceList,
    ClonedVoiceResponse,
    DesignedCandidate,
    SaveVoiceRequest,
    VoiceDeleted,
    VoiceDesignRequest,
    VoiceDesignResponse,
)
from decoder_gateway.errors import InvalidRequest
from decoder_gateway.llm.prompt import VoiceStyle
from decoder_gateway.serving import new_request_id
from decoder_gateway.voices.service import VoiceService

router = APIRouter(tags=["Voices"])

_ERRORS = {
    400: {"model": ErrorResponse, "description": "Bad name, not audio, silence, too short/long"},
    404: {"model": ErrorResponse, "description": "No such cloned voice"},
    409: {"model": ErrorResponse, "description": "The name is taken"},
    413: {"model": ErrorResponse, "description": "Over MAX_CLIP_BYTES"},
    501: {"model": ErrorResponse, "description": "The checkpoint has no speaker encoder"},
}
_DESIGN_ERRORS = {
    400: {"model": ErrorResponse, "description": "Unknown label, candidates out of range"},
    429: {"model": ErrorResponse, "description": "No stream slot free"},
    500: {"model": ErrorResponse, "description": "The decoder failed"},
    502: {"model": ErrorResponse, "description": "The model wrote no valid voice, twice"},
    501: {"model": ErrorResponse, "description": "VOICE_DESIGN is off (a speaker fine-tune)"},
    503: {"model": ErrorResponse, "description": "The LLM is unreachable or not ready"},
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
    # Optional here only because a JSON body (no form) saves a voice by its tokens; an
    # upload without them is refused below as the form's validation would.
    audio_sample: Annotated[
        UploadFile | None, File(description="The clip: wav, flac, mp3, ogg...")
    ] = None,
    name: Annotated[str | None, Form(description="1-64 of A-Z a-z 0-9 _ -; the voice's id")] = None,
    consent: OptionalField = None,
    ref_text: OptionalField = None,
    language: OptionalField = None,
    gender: OptionalField = None,
    speaker_description: OptionalField = None,
    base_voice: Annotated[
        str | None, Form(description="A packaged voice whose speaker id the prompt uses")
    ] = None,
) -> ClonedVoiceResponse:
    """Clone a voice from a clip (0.5 to 60 s; the first 6 s are used) and store it; or,
    with a JSON body (``name``, ``global_tokens``...), store a voice given by its tokens."""
    content_type = request.headers.get("content-type", "").lower()
    if content_type.startswith("application/json"):
        return await _save_by_tokens(request)
    if audio_sample is None:
        raise InvalidRequest("audio_sample: Field required", "audio_sample")
    if name is None:
        raise InvalidRequest("name: Field required", "name")
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


async def _save_by_tokens(request: Request) -> ClonedVoiceResponse:
    # The form parser left a JSON body unread: it is read and validated here, and its
    # errors go through the app's validation handler (400 naming the field).
    try:
        body = SaveVoiceRequest.model_validate_json(await request.body())
    except ValidationError as err:
        raise RequestValidationError(err.errors(include_url=False)) from None
    voice = await _service(request).save(
        body.name,
        body.global_tokens,
        base_voice=body.base_voice,
        consent=body.consent,
        language=body.language,
        gender=body.gender,
        speaker_description=body.speaker_description,
    )
    return ClonedVoiceResponse(voice=voice)


@router.post("/v1/audio/voices/design", responses=_DESIGN_ERRORS)
async def design_voice(body: VoiceDesignRequest, request: Request) -> VoiceDesignResponse:
    """Candidate voices for the style labels, each with a WAV preview of ``text``; keep
    one by saving its ``global_tokens`` (``POST /v1/audio/voices`` with JSON)."""
    voices = await get_gateway(request).designer.design(
        VoiceStyle(body.gender, body.pitch, body.speed),
        body.text,
        body.candidates,
        new_request_id(request.headers.get("x-request-id")),
        seed=body.seed,
    )
    return VoiceDesignResponse(
        candidates=[
            DesignedCandidate(
                global_tokens=voice.global_tokens,
                audio="data:audio/wav;base64," + base64.b64encode(voice.wav).decode("ascii"),
                duration_s=round(voice.seconds, 3),
            )
            for voice in voices
        ]
    )
