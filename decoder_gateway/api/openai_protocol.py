"""Models of OpenAI's speech API (POST /v1/audio/speech, GET /v1/models), so that
OpenAI's clients and Open WebUI work unchanged; our extensions are marked."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, StrictInt, field_validator

from decoder_gateway.api.protocol import REF_AUDIO_DOC, STYLE_DOC, ErrorDetail, StyleLabels, Text

OPENAI_MAX_INPUT_CHARS = 4096


class OpenAISpeechRequest(BaseModel):
    """``POST /v1/audio/speech``: OpenAI's request, plus ``sample_rate`` and ``temperature``."""

    model: str | None = Field(
        None,
        description="Accepted and not checked: the gateway serves one model (see GET /v1/models; "
        "'tts-1' and 'tts-1-hd' are aliases of it).",
    )
    input: Text = Field(
        min_length=1,
        max_length=OPENAI_MAX_INPUT_CHARS,
        description="Text to speak, at most 4096 characters; split into sentences server-side.",
    )
    voice: Text | None = Field(
        None,
        description="A voice id of GET /v1/audio/voices (also as {'id': ...}). OpenAI's built-in "
        "names (alloy, ash, ballad, coral, echo, fable, nova, onyx, sage, shimmer, verse, marin, "
        "cedar) speak with the default voice. Omitted: the default voice. 'design' "
        "(VOICE_DESIGN=on): a voice designed for this request from style or instructions.",
    )
    instructions: str | None = Field(
        None,
        description="With voice 'design' (VOICE_DESIGN=on) and no style: the style labels in "
        "words (a gender, e.g. 'female' or 'man'; optionally a pitch, e.g. 'deep', 'high "
        "pitch', and a speed, e.g. 'slow', 'very fast'). Otherwise accepted and ignored.",
    )
    response_format: Literal["mp3", "opus", "aac", "flac", "wav", "pcm", "mulaw", "alaw"] = Field(
        "mp3",
        description="mp3 (audio/mpeg), opus (Ogg, audio/ogg), aac (ADTS, audio/aac), flac, "
        "wav (PCM16; RIFF and data sizes 0xFFFFFFFF, as the length is unknown while "
        "streaming), pcm (raw PCM16 LE, no header), or G.711 for telephony: mulaw "
        "(audio/basic) and alaw (audio/x-alaw-basic), one byte per sample, no header, "
        "8 kHz by default. All stream as they are generated.",
    )
    speed: float = Field(
        1.0, ge=0.25, le=4.0, description="Tempo factor; pitch is kept. 1.0 leaves audio as is."
    )
    stream_format: Literal["audio", "sse"] = Field(
        "audio",
        description="audio: the file's bytes. sse: server-sent events "
        "speech.audio.delta {audio: base64 of the file's next bytes} then speech.audio.done.",
    )
    sample_rate: StrictInt | None = Field(
        None,
        gt=0,
        description="Output sample rate (extension): 8000, 11025, 12000, 16000, 22050, 24000, "
        "32000, 44100 or 48000 (opus: 8000, 12000, 16000, 24000, 48000). Default 24000, as "
        "OpenAI's (mulaw and alaw: 8000); 16000 is the model's own rate (no resampling).",
    )
    temperature: float = Field(
        0.7, ge=0.0, le=2.0, strict=True, description="Sampling temperature (extension)."
    )
    ref_audio: str | None = Field(None, description=REF_AUDIO_DOC + " (vLLM-Omni's field)")
    style: StyleLabels | None = Field(
        None,
        description=STYLE_DOC + " Extension; with it, voice is omitted or 'design' (OpenAI's "
        "SDK always sends one). The tokens come in the X-Voice-Global-Tokens header.",
    )

    @field_validator("voice", mode="before")
    @classmethod
    def _voice_object(cls, value: object) -> object:
        """OpenAI also takes a custom voice as ``{"id": "..."}``."""
        if isinstance(value, dict) and set(value) == {"id"}:
            return value["id"]
        return value


class SpeechUsage(BaseModel):
    """Usage of a speech request.

    ``input_tokens`` counts the input's characters (the text is tokenized by vLLM,
    not here); ``output_tokens`` the speech tokens written, 50 per second of audio
    before any speed change.
    """

    input_tokens: int
    output_tokens: int
    total_tokens: int


class SpeechAudioDelta(BaseModel):
    type: Literal["speech.audio.delta"] = "speech.audio.delta"
    audio: str = Field(description="Base64 of the next bytes of the audio file.")


class SpeechAudioDone(BaseModel):
    type: Literal["speech.audio.done"] = "speech.audio.done"
    usage: SpeechUsage


class SpeechStreamError(BaseModel):
    """The SSE event sent instead of ``speech.audio.done`` when synthesis fails mid-stream."""

    type: Literal["error"] = "error"
    error: ErrorDetail


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "decoder-gateway"


class ModelList(BaseModel):
    """``GET /v1/models`` in OpenAI's shape."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class AudioModelList(BaseModel):
    """``GET /v1/audio/models``, the shape Open WebUI reads."""

    models: list[ModelCard]
