"""Float audio -> PCM16 bytes (clipped, little-endian)."""

from __future__ import annotations

import numpy as np
import torch

PCM_SAMPLE_WIDTH = 2  # bytes per sample, int16


def to_pcm16(audio: torch.Tensor | np.ndarray) -> bytes:
    """(N,) float in [-1, 1] -> N little-endian int16 samples.

    Values are clipped first: ``x * 32767`` on an unclipped 1.0001 wraps to -32768.
    """
    samples = audio.numpy() if isinstance(audio, torch.Tensor) else np.asarray(audio)
    scaled = np.clip(samples, -1.0, 1.0) * 32767.0
    return np.rint(scaled).astype("<i2").tobytes()
