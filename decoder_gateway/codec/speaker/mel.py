"""Magnitude mel spectrogram of BiCodec's speaker branch (torchaudio's ``MelSpectrogram``
with ``power=1``, Slaney scale and Slaney area norm), written without torchaudio.

The released ``model.safetensors`` does not carry the window or the filterbank, so
both are computed here and kept as non-persistent buffers: they never appear among
the checkpoint keys the loader checks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

# Slaney's mel scale: linear (3 mels per 200 Hz) below 1 kHz, logarithmic above.
_LINEAR_HZ_PER_MEL = 200.0 / 3.0
_BREAK_HZ = 1000.0
_BREAK_MEL = _BREAK_HZ / _LINEAR_HZ_PER_MEL  # 15
_LOG_STEP = math.log(6.4) / 27.0  # ln(Hz ratio) per mel above the break


@dataclass(frozen=True)
class MelConfig:
    """``mel_params`` of BiCodec's config.yaml."""

    sample_rate: int = 16000
    n_fft: int = 1024
    win_length: int = 640
    hop_length: int = 320
    f_min: float = 10.0
    f_max: float | None = None  # None: Nyquist
    n_mels: int = 128

    @classmethod
    def from_dict(cls, params: dict) -> MelConfig:
        f_max = params.get("mel_fmax")
        return cls(
            sample_rate=int(params.get("sample_rate", 16000)),
            n_fft=int(params["n_fft"]),
            win_length=int(params["win_length"]),
            hop_length=int(params["hop_length"]),
            f_min=float(params.get("mel_fmin", 0.0)),
            f_max=None if f_max is None else float(f_max),
            n_mels=int(params["num_mels"]),
        )


def hz_to_slaney_mel(hz: Tensor) -> Tensor:
    linear = hz / _LINEAR_HZ_PER_MEL
    logarithmic = _BREAK_MEL + torch.log(hz.clamp_min(_BREAK_HZ) / _BREAK_HZ) / _LOG_STEP
    return torch.where(hz >= _BREAK_HZ, logarithmic, linear)


def slaney_mel_to_hz(mel: Tensor) -> Tensor:
    linear = mel * _LINEAR_HZ_PER_MEL
    logarithmic = _BREAK_HZ * torch.exp(_LOG_STEP * (mel - _BREAK_MEL))
    return torch.where(mel >= _BREAK_MEL, logarithmic, linear)


def slaney_filterbank(config: MelConfig) -> Tensor:
    """Triangular filters (n_fft // 2 + 1, n_mels), each of unit area in Hz.

    Computed in float64 and returned as float32; explicitly on the CPU so that it
    is real even while the network around it is being built on the meta device.
    """
    options = {"dtype": torch.float64, "device": "cpu"}
    f_max = config.sample_rate / 2 if config.f_max is None else config.f_max
    bins = torch.linspace(0, config.sample_rate / 2, config.n_fft // 2 + 1, **options)
    edges_mel = torch.linspace(
        float(hz_to_slaney_mel(torch.tensor(config.f_min, **options))),
        float(hz_to_slaney_mel(torch.tensor(f_max, **options))),
        config.n_mels + 2,
        **options,
    )
    edges = slaney_mel_to_hz(edges_mel)  # (n_mels + 2,) Hz: filter m spans edges[m : m + 3]
    lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]
    offset = bins[:, None]  # (n_bins, 1)
    rising = (offset - lower) / (centre - lower)
    falling = (upper - offset) / (upper - centre)
    triangles = torch.minimum(rising, falling).clamp_min(0.0)  # (n_bins, n_mels)
    # Slaney area normalisation: divide by half the triangle's width in Hz.
    return (triangles * (2.0 / (upper - lower))).float()


class MelSpectrogram(nn.Module):
    """Audio (B, N) -> magnitude mel (B, n_mels, 1 + N // hop); no log, no clamp."""

    def __init__(self, config: MelConfig) -> None:
        super().__init__()
        self.config = config
        window = torch.hann_window(config.win_length, periodic=True, device="cpu")
        self.register_buffer("window", window, persistent=False)
        self.register_buffer("filterbank", slaney_filterbank(config), persistent=False)

    def forward(self, audio: Tensor) -> Tensor:  # (B, N) -> (B, n_mels, frames)
        cfg = self.config
        # torch.stft zero-pads the 640-sample window to n_fft, centred, as torchaudio does.
        spectrum = torch.stft(
            audio,
            n_fft=cfg.n_fft,
            hop_length=cfg.hop_length,
            win_length=cfg.win_length,
            window=self.window,
            center=True,
            pad_mode="reflect",
            normalized=False,
            onesided=True,
            return_complex=True,
        )  # (B, n_fft // 2 + 1, frames)
        magnitude = spectrum.abs()  # power 1: magnitude, not energy
        return torch.einsum("bft,fm->bmt", magnitude, self.filterbank)
