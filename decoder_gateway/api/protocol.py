"""Request, response and WebSocket message models of the public API.

Kept apart from the serving logic; the field names and defaults are the API that
clients already use.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    field_validator,
)

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


# Text of a request: valid Unicode. Ids and counts: JSON integers, never booleans
# (pydantic would otherwise take `true` as 1) nor strings.
Text = Annotated[str, AfterValidator(_valid_unicode)]
SegmentId = StrictStr | StrictInt
REF_AUDIO_DOC = (
    "A reference clip as a base64 data: URL (data:audio/wav;base64,...): speak in its voice, "
    "cloned for this request only (nothing is stored). `voice` then gives the speaker id."
)
DEFAULT_MAX_TOKENS_DOC = "Semantic-token budget per sentence; default min(2048, MAX_TOKENS_LIMIT)."


class SpeechStreamRequest(BaseModel):
    """``POST /v1/audio/speech/stream``."""

    text: Text = Field(description="Text to speak; split into sentences server-side.")
    voice: Text | None = Field(None, description="Voice id, e.g. 'luganda_female'.")
    speaker_id: StrictInt | None = Field(None, description="Speaker id, e.g. 248; or give `voice`.")
    temperature: float = Field(0.7, ge=0.0, le=2.0, strict=True)
    max_tokens: StrictInt | None = Field(None, ge=1, description=DEFAULT_MAX_TOKENS_DOC)
    ref_audio: str | None = Field(None, description=REF_AUDIO_DOC)


class WebSocketSpeechMessage(BaseModel):
    """One client message on ``WS /v1/audio/speech/stream/ws``."""

    model_config = ConfigDict(populate_by_name=True)

    input: Text = ""
    voice: Text | None = None
    speaker_id: StrictInt | None = None
    temperature: float = Field(0.7, ge=0.0, le=2.0, strict=True)
    max_tokens: StrictInt | None = Field(None, ge=1, description=DEFAULT_MAX_TOKENS_DOC)
    segment_id: SegmentId | None = None
    continue_: bool = Field(True, alias="continue", strict=True)
    ref_audio: str | None = Field(None, description=REF_AUDIO_DOC)
    timestamps: bool = Field(
        False, strict=True, description="Add a `segment` frame after each segment's audio."
    )


class StartMessage(BaseModel):
    type: Literal["start"] = "start"
    segment_id: str | int | None
    speaker_id: int
    voice: str
    request_id: str
    sample_rate: int = SAMPLE_RATE


class AuthReply(BaseModel):
    """Answer to ``{"type": "auth", "api_key": ...}`` on the WebSocket."""

    type: Literal["auth"] = "auth"
    status: Literal["ok"] = "ok"


class SegmentMessage(BaseModel):
    """Which text a stretch of the audio speaks (``timestamps: true``); sent after the
    segment's last audio frame. Times are seconds of the audio sent for the message."""

    type: Literal["segment"] = "segment"
    segment_id: str | int | None
    index: int
    text: str
    start_s: float
    end_s: float


class EndMessage(BaseModel):
    type: Literal["end"] = "end"
    segment_id: str | int | None
    samples: int
    duration_s: float


class ErrorMessage(BaseModel):
    type: Literal["error"] = "error"
    message: str
    code: str
    segment_id: str | int | None = None


class VoiceInfo(BaseModel):
    id: str
    speaker_id: int
    language: str
    gender: str
    cloned: bool = False


class ClonedVoiceInfo(BaseModel):
    """A cloned voice: what ``POST /v1/audio/voices`` stored."""

    id: str
    name: str
    global_tokens: list[int]
    speaker_id: int
    base_voice: str
    created_at: str
    consent: str | None = None
    ref_text: str | None = None
    language: str | None = None
    gender: str | None = None
    speaker_description: str | None = None


class ClonedVoiceResponse(BaseModel):
    voice: ClonedVoiceInfo


class VoiceDeleted(BaseModel):
    id: str
    object: Literal["voice"] = "voice"
    deleted: bool = True


class VoiceList(BaseModel):
    voices: list[VoiceInfo]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape, used by every HTTP endpoint."""

    error: ErrorDetail


# -- OpenAI-compatible speech API (routes/openai_speech.py) ----------------------

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
        "cedar) speak with the default voice. Omitted: the default voice.",
    )
    instructions: str | None = Field(
        None, description="Accepted and ignored: Spark-TTS takes no style instructions."
    )
    response_format: Literal["mp3", "opus", "aac", "flac", "wav", "pcm"] = Field(
        "mp3",
        description="mp3 (audio/mpeg), opus (Ogg, audio/ogg), aac (ADTS, audio/aac), flac, "
        "wav (PCM16; RIFF and data sizes 0xFFFFFFFF, as the length is unknown while "
        "streaming) or pcm (raw PCM16 LE, no header). All stream as they are generated.",
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
        "OpenAI's; 16000 is the model's own rate (no resampling).",
    )
    temperature: float = Field(
        0.7, ge=0.0, le=2.0, strict=True, description="Sampling temperature (extension)."
    )
    ref_audio: str | None = Field(None, description=REF_AUDIO_DOC + " (vLLM-Omni's field)")

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


class AudioVoiceInfo(VoiceInfo):
    name: str = Field(description="A display name, e.g. 'Luganda (female)'.")


class AudioVoiceList(BaseModel):
    """``GET /v1/audio/voices``: ``voices[].id`` / ``.name`` is what Open WebUI reads."""

    voices: list[AudioVoiceInfo]
    default_voice: str
    aliases: dict[str, str] = Field(
        default_factory=dict, description="VOICE_ALIASES: other names -> voice ids"
    )


# -- streaming text in: WS /v1/audio/speech/stream (routes/text_stream.py) -------------
# The messages of vLLM-Omni's streaming-text WebSocket, so that clients written for it
# work unchanged.


class SessionConfig(BaseModel):
    """``{"type": "session.config", ...}``: settings for the utterances that follow.

    vLLM-Omni's other fields (``model``, ``task_type``, ``language``, ``instructions``,
    ``ref_text``, ...) are accepted and ignored.
    """

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    type: Literal["session.config"] = "session.config"
    voice: Text | None = None
    speaker_id: StrictInt | None = None
    temperature: float = Field(0.7, ge=0.0, le=2.0, strict=True)
    max_tokens: StrictInt | None = Field(None, ge=1, description=DEFAULT_MAX_TOKENS_DOC)
    max_new_tokens: StrictInt | None = Field(None, ge=1, description="vLLM-Omni's max_tokens")
    response_format: Literal["pcm", "wav"] = Field(
        "wav", description="wav (vLLM-Omni's default): one complete WAV per sentence"
    )
    stream_audio: bool = Field(
        False, strict=True, description="PCM chunks as they are decoded, not whole sentences"
    )
    speed: float = Field(1.0, ge=0.25, le=4.0, description="Tempo factor; pitch is kept.")
    ref_audio: str | None = Field(None, description=REF_AUDIO_DOC)


class InputText(BaseModel):
    type: Literal["input.text"]
    text: Text


class AudioStart(BaseModel):
    type: Literal["audio.start"] = "audio.start"
    utterance_index: int
    sentence_index: int
    sentence_text: str
    format: Literal["pcm", "wav"]
    sample_rate: int = SAMPLE_RATE
    start_s: float = Field(description="Where this sentence starts in the utterance's audio")


class AudioDone(BaseModel):
    type: Literal["audio.done"] = "audio.done"
    utterance_index: int
    sentence_index: int
    total_bytes: int
    error: bool = False
    start_s: float
    end_s: float


class SessionDone(BaseModel):
    type: Literal["session.done"] = "session.done"
    utterance_index: int
    total_sentences: int
