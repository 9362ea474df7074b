"""BiCodec detokenizer, decode path only: ``load_decoder(path, device)`` is the entry point."""

from .bicodec import BiCodecDecoder
from .config import BiCodecConfig
from .loading import (
    CheckpointError,
    LoadReport,
    checkpoint_layout,
    load_decoder,
    resolve_bicodec_dir,
)
from .spans import Span, decode_spans
from .streaming import PlannedChunk, StreamingConfig, StreamingSession

__all__ = [
    "BiCodecConfig",
    "BiCodecDecoder",
    "CheckpointError",
    "LoadReport",
    "PlannedChunk",
    "Span",
    "StreamingConfig",
    "StreamingSession",
    "checkpoint_layout",
    "decode_spans",
    "load_decoder",
    "resolve_bicodec_dir",
]
