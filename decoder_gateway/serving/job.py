"""A validated synthesis request, whatever endpoint it came from."""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field

from decoder_gateway.llm.prompt import VoiceStyle
from decoder_gateway.voices.catalog import Voice

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def new_request_id(client_value: str | None = None) -> str:
    """The client's own id (X-Request-Id) when it is short and plain, else a fresh one."""
    if client_value and _REQUEST_ID.fullmatch(client_value):
        return client_value
    return uuid.uuid4().hex


@dataclass(frozen=True)
class SpeechJob:
    text: str
    segments: tuple[str, ...]  # what is generated, one LLM request each, in order
    voice: Voice
    temperature: float
    max_tokens: int
    request_id: str = field(default_factory=new_request_id)
    accepted_at: float = field(default_factory=time.monotonic)
    # A style request's labels (VOICE_DESIGN=on): its first segment writes the voice
    # (``voice`` then has no global tokens), which the later segments keep.
    style: VoiceStyle | None = None
