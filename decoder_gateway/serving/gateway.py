"""The gateway's long-lived objects, built once at start-up (``app.build_gateway``) and
reached by the routes through ``api.state``."""

from __future__ import annotations

from dataclasses import dataclass

from decoder_gateway.codec import Decoder
from decoder_gateway.codec.runtime.worker import DecodeWorker
from decoder_gateway.llm.client import LLMClient
from decoder_gateway.metrics import Metrics
from decoder_gateway.serving.design import VoiceDesigner
from decoder_gateway.serving.speech import SpeechService
from decoder_gateway.settings import Settings
from decoder_gateway.voices.service import VoiceService


@dataclass
class Gateway:
    """What the routes need, built once per process."""

    settings: Settings
    voices: VoiceService
    llm: LLMClient
    decoder: Decoder
    worker: DecodeWorker
    speech: SpeechService
    metrics: Metrics
    designer: VoiceDesigner
