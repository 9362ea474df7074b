"""What the serving layer yields: transport-free events of one request, in play order.

A transport adapts them to its wire format (PCM bytes, an encoded file, SSE events,
WebSocket frames). Failures are not events: they are raised as typed
:class:`~decoder_gateway.errors.GatewayError` s, converted by the web edge (``api/errors.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SegmentStart:
    """Segment ``index`` (one sentence or clause, one LLM request) starts playing."""

    index: int
    text: str


@dataclass(frozen=True)
class Audio:
    """The next samples to play: float32 (n,) at the decoder's sample rate."""

    samples: torch.Tensor
    segment: int


@dataclass(frozen=True)
class SegmentEnd:
    """Segment ``index`` is complete; ``samples`` of audio were played for it."""

    index: int
    samples: int


SpeechEvent = SegmentStart | Audio | SegmentEnd
