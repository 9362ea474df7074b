"""BiCodec detokenizer, decode path only: ``load_decoder(path, device)`` is the entry point."""

from .bicodec import BiCodecDecoder
from .config import BiCodecConfig
from .graphs import WindowGraphs
from .loading import (
    CheckpointError,
    LoadReport,
    checkpoint_layout,
    load_decoder,
    resolve_bicodec_dir,
)
from .spans import Span, decode_spans
from .speaker import (
    SpeakerEncoder,
    SpeakerEncoderConfig,
    SpeakerEncoderUnavailable,
    load_speaker_encoder,
    speaker_checkpoint_layout,
)
from .streaming import PlannedChunk, StreamingConfig, StreamingSession

__all__ = [
    "BiCodecConfig",
    "BiCodecDecoder",
    "CheckpointError",
    "LoadReport",
    "PlannedChunk",
    "Span",
    "SpeakerEncoder",
    "SpeakerEncoderConfig",
    "SpeakerEncoderUnavailable",
    "StreamingConfig",
    "StreamingSession",
    "WindowGraphs",
    "checkpoint_layout",
    "decode_spans",
    "load_decoder",
    "load_speaker_encoder",
    "resolve_bicodec_dir",
    "speaker_checkpoint_layout",
]
