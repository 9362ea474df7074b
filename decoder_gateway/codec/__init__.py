"""BiCodec detokenizer, decode path only: ``load_decoder(path, device)`` is the entry point."""

from decoder_gateway.codec.model.bicodec import BiCodecDecoder
from decoder_gateway.codec.model.config import BiCodecConfig
from decoder_gateway.codec.model.loading import (
    CheckpointError,
    LoadReport,
    checkpoint_layout,
    load_decoder,
    resolve_bicodec_dir,
)
from decoder_gateway.codec.runtime.graphs import WindowGraphs
from decoder_gateway.codec.runtime.spans import Span, decode_spans
from decoder_gateway.codec.runtime.streaming import PlannedChunk, StreamingConfig, StreamingSession
from decoder_gateway.codec.speaker.encoder import (
    SpeakerEncoder,
    SpeakerEncoderConfig,
    SpeakerEncoderUnavailable,
    load_speaker_encoder,
    speaker_checkpoint_layout,
)

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
