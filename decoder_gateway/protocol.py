"""Request, response and WebSocket message models of the public API.

Kept apart from the serving logic; the field names and defaults are the API that
clients already use.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SAMPLE_RATE = 16000
PCM_HEADERS = {"X-Sample-Rate": str(SAMPLE_RATE), "X-Bit-Depth": "16", "X-Channels": "1"}


class SpeechStreamRequest(BaseModel):
    """``POST /v1/audio/speech/stream``."""

    text: str = Field(description="Text to speak; split into sentences server-side.")
    voice: str | None = Field(None, description="Voice id, e.g. 'luganda_female'.")
    speaker_id: int | None = Field(None, description="Speaker id, e.g. 248; or give `voice`.")
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    max_tokens: int = Field(2048, ge=1, description="Semantic-token budget per sentence.")


class WebSocketSpeechMessage(BaseModel):
    """One client message on ``WS /v1/audio/speech/stream/ws``."""

    model_config = ConfigDict(populate_by_name=True)

    input: str = ""
    voice: str | None = None
    speaker_id: int | None = None
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    max_tokens: int = Field(2048, ge=1)
    segment_id: str | int | None = None
    continue_: bool = Field(True, alias="continue")


class StartMessage(BaseModel):
    type: Literal["start"] = "start"
    segment_id: str | int | None
    speaker_id: int
    voice: str
    request_id: str
    sample_rate: int = SAMPLE_RATE


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
