"""BiCodec for the gateway: the decode model, the speaker encoder and the decode runtime.

``model/`` holds the plain decode modules and their loading, ``speaker/`` the
speaker encoder (reference clip -> 32 global tokens), ``runtime/`` what decodes
with the model: spans, batching, streaming, CUDA graphs and the decode worker.
:func:`load_decoder` returns the :class:`Decoder` that the rest of the gateway uses.
"""

from decoder_gateway.codec.model.bicodec import BiCodecDecoder
from decoder_gateway.codec.model.config import BiCodecConfig
from decoder_gateway.codec.model.loading import (
    CheckpointError,
    LoadReport,
    checkpoint_layout,
    load_bicodec,
    resolve_bicodec_dir,
)
from decoder_gateway.codec.runtime.decoder import Decoder, load_decoder
from decoder_gateway.codec.runtime.graphs import WindowGraphs
from decoder_gateway.codec.runtime.spans import Span, decode_pass
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
    "Decoder",
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
    "decode_pass",
    "load_bicodec",
    "load_decoder",
    "load_speaker_encoder",
    "resolve_bicodec_dir",
    "speaker_checkpoint_layout",
]
