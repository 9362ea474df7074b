"""Models of the gateway's own streaming API: POST /v1/audio/speech/stream and its two
WebSockets (``/stream/ws``, one synthesis per message; ``/stream``, text streamed in).

The text-in messages are vLLM-Omni's streaming-text WebSocket's, so clients written
for it work unchanged; ``input.cancel`` / ``audio.cancelled`` (and ``cancel`` /
``cancelled`` on the seed WebSocket) are ours, for barge-in.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from decoder_gateway.api.protocol import (
    DEFAULT_MAX_TOKENS_DOC,
    GLOBAL_TOKENS_DOC,
    REF_AUDIO_DOC,
    SAMPLE_RATE,
    SAMPLE_RATE_DOC,
    SPOKEN_TEXT_DOC,
    STYLE_DOC,
    SampleRate,
    SegmentId,
    SpokenUntil,
    StyleLabels,
    Text,
)

# -- POST /v1/audio/speech/stream --------------------------------------------------


class SpeechStreamRequest(BaseModel):
    """``POST /v1/audio/speech/stream``."""

    text: Text = Field(description="Text to speak; split into sentences server-side.")
    voice: Text | None = Field(None, description="Voice id, e.g. 'luganda_female'.")
    speaker_id: StrictInt | None = Field(None, description="Speaker id, e.g. 248; or give `voice`.")
    temperature: float = Field(0.7, ge=0.0, le=2.0, strict=True)
    max_tokens: StrictInt | None = Field(None, ge=1, description=DEFAULT_MAX_TOKENS_DOC)
    ref_audio: str | None = Field(None, description=REF_AUDIO_DOC)
    style: StyleLabels | None = Field(
        None, description=STYLE_DOC + " The tokens come in the X-Voice-Global-Tokens header."
    )


# -- WS /v1/audio/speech/stream/ws -------------------------------------------------


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
    response_format: Literal["pcm", "mulaw", "alaw"] = Field(
        "pcm",
        description="pcm: PCM16 LE; mulaw / alaw: G.711, one byte per sample, no header.",
    )
    sample_rate: SampleRate | None = Field(None, description=SAMPLE_RATE_DOC)
    style: StyleLabels | None = Field(
        None, description=STYLE_DOC + " The tokens come in the start frame's global_tokens."
    )


class CancelMessage(BaseModel):
    """``{"type": "cancel", "segment_id": X}``: stop message X, in progress or waiting."""

    type: Literal["cancel"]
    segment_id: SegmentId


class CancelledMessage(BaseModel):
    """The answer to a ``cancel``: nothing of that message is sent after it.

    ``status``: ``cancelled`` (it was in progress: stopped, upstream aborted),
    ``dropped`` (it was waiting: nothing of it was sent), ``not_found`` (no message of
    that id is in progress or waiting, e.g. it has ended: nothing changed).
    """

    type: Literal["cancelled"] = "cancelled"
    segment_id: str | int
    status: Literal["cancelled", "dropped", "not_found"]
    audio_seconds: float = Field(description="Seconds of the message's audio sent")
    spoken_text: str = Field(description=SPOKEN_TEXT_DOC)
    spoken_until: SpokenUntil


class StartMessage(BaseModel):
    type: Literal["start"] = "start"
    segment_id: str | int | None
    speaker_id: int
    voice: str
    request_id: str
    sample_rate: int = SAMPLE_RATE
    global_tokens: list[int] | None = Field(
        None, description=GLOBAL_TOKENS_DOC, exclude_if=lambda value: value is None
    )


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


# -- WS /v1/audio/speech/stream: text streamed in ----------------------------------


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
    response_format: Literal["pcm", "wav", "mulaw", "alaw"] = Field(
        "wav",
        description="wav (vLLM-Omni's default): one complete WAV per sentence; pcm: PCM16 LE; "
        "mulaw / alaw: G.711, one byte per sample, no header",
    )
    sample_rate: SampleRate | None = Field(None, description=SAMPLE_RATE_DOC)
    stream_audio: bool = Field(
        False, strict=True, description="PCM chunks as they are decoded, not whole sentences"
    )
    speed: float = Field(1.0, ge=0.25, le=4.0, description="Tempo factor; pitch is kept.")
    ref_audio: str | None = Field(None, description=REF_AUDIO_DOC)
    style: StyleLabels | None = Field(
        None,
        description=STYLE_DOC + " Each utterance is one request, with a voice of its own; "
        "its tokens come in its first audio.start's global_tokens.",
    )


class InputText(BaseModel):
    type: Literal["input.text"]
    text: Text


class InputCancel(BaseModel):
    """``{"type": "input.cancel"}``: stop speaking (a barge-in); the session stays."""

    type: Literal["input.cancel"]


class AudioStart(BaseModel):
    type: Literal["audio.start"] = "audio.start"
    utterance_index: int
    sentence_index: int
    sentence_text: str
    format: Literal["pcm", "wav", "mulaw", "alaw"]
    sample_rate: int = SAMPLE_RATE
    start_s: float = Field(description="Where this sentence starts in the utterance's audio")
    global_tokens: list[int] | None = Field(
        None,
        description=GLOBAL_TOKENS_DOC + " Only on a style utterance's first sentence, whose "
        "audio.start then comes with its first audio.",
        exclude_if=lambda value: value is None,
    )


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


class AudioCancelled(BaseModel):
    """The answer to ``input.cancel``, once every utterance it stopped has stopped:
    nothing of them (no audio, no ``audio.done``, no ``session.done``) follows it."""

    type: Literal["audio.cancelled"] = "audio.cancelled"
    utterance_index: int | None = Field(
        description="The first utterance stopped (the one playing); null: nothing was "
        "playing or being written, the cancel changed nothing"
    )
    cancelled_utterances: int = Field(description="Utterances stopped: playing, waiting, written")
    audio_seconds: float = Field(description="Seconds of the first one's audio sent")
    spoken_text: str = Field(description=SPOKEN_TEXT_DOC)
    spoken_until: SpokenUntil
