"""The decoder API, in one place: the decoders the benchmark loads, builds and describes.

Kept apart so that a change of the codec package's API touches this module's imports
only.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from decoder_gateway.codec import BiCodecConfig, BiCodecDecoder, Decoder, load_decoder
from devtools import GOLDEN_BICODEC

__all__ = [
    "Decoder",
    "decoder_parameters",
    "describe_decoder",
    "full_size_decoder",
    "load_decoder",
]


def full_size_decoder(folder: Path | None, scratch: Path) -> Path:
    """The released BiCodec architecture with random weights (bench_decoder's builder).

    ``folder``: use it if it holds a checkpoint, else build into it (kept for later
    runs); None: build into ``scratch``.
    """
    from bench_decoder import random_checkpoint  # benchmarks/, the script's own folder

    target = folder or scratch / "BiCodec-full-random"
    if (target / "model.safetensors").is_file() and (target / "config.yaml").is_file():
        return target
    started = time.perf_counter()
    random_checkpoint(target)
    seconds = time.perf_counter() - started
    print(f"(built the full-size random BiCodec in {seconds:.0f} s)", file=sys.stderr)
    return target


def decoder_parameters(folder: Path) -> int:
    """Decode-path parameters of the BiCodec in ``folder`` (built on the meta device)."""
    with torch.device("meta"):
        model = BiCodecDecoder(BiCodecConfig.from_yaml(folder / "config.yaml"))
    return sum(p.numel() for p in model.parameters())


def describe_decoder(folder: Path, decoder: Decoder) -> str:
    params = sum(p.numel() for p in decoder.model.parameters())
    which = "golden small test BiCodec" if folder.resolve() == GOLDEN_BICODEC.resolve() else ""
    label = f"{which}, " if which else ""
    return f"{folder} ({label}{params / 1e6:.2f} M decode parameters, float32, CPU)"
