"""BiCodec detokenizer, decode path only: ``load_decoder(path, device)`` is the entry point."""

from .bicodec import BiCodecDecoder, Span
from .config import BiCodecConfig
from .loading import CheckpointError, LoadReport, checkpoint_layout, load_decoder

__all__ = [
    "BiCodecConfig",
    "BiCodecDecoder",
    "CheckpointError",
    "LoadReport",
    "Span",
    "checkpoint_layout",
    "load_decoder",
]
