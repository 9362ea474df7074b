"""BiCodec's speaker encoder, token path only: a reference clip -> the 32 global tokens.

This is what voice cloning needs from BiCodec's encoder side:

    clip (any rate) -> 16 kHz (soxr VHQ) -> volume normalised -> tiled / cut to 6 s
      -> magnitude mel (B, 128, 301) -> ECAPA-TDNN latent (B, 1536, 301)
      -> perceiver resampler (B, 32, D) -> FSQ -> 32 ids in [0, 4096)

``load_speaker_encoder(path, device)`` is the entry point; it reads only these keys
from the BiCodec folder the decoder uses. A checkpoint without them raises
:class:`SpeakerEncoderUnavailable`, so a server can still decode with packaged voices.
"""

from __future__ import annotations

import logging
import numbers
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soxr
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from torch import Tensor, nn

from decoder_gateway.codec.model.config import BiCodecConfig
from decoder_gateway.codec.model.loading import (
    CheckpointError,
    LoadReport,
    check_shape,
    checkpoint_files,
    checkpoint_layout,
)
from decoder_gateway.codec.speaker.ecapa import ECAPATDNN
from decoder_gateway.codec.speaker.mel import MelConfig, MelSpectrogram
from decoder_gateway.codec.speaker.perceiver import PerceiverResampler

logger = logging.getLogger(__name__)

ClipInput = np.ndarray | Tensor

# Spark-TTS' top-level config.yaml (beside BiCodec/, not in it): every reference is
# brought to this length, whatever the clip's own length.
REF_SEGMENT_SECONDS = 6.0
LATENT_HOP_LENGTH = 320  # the reference length is a whole number of mel frames


class SpeakerEncoderUnavailable(CheckpointError):
    """The checkpoint has no speaker encoder: voice cloning is impossible with it."""


# -- configuration ----------------------------------------------------------------


@dataclass(frozen=True)
class SpeakerEncoderConfig:
    mel: MelConfig
    input_dim: int  # mel bands into the ECAPA network
    latent_dim: int  # perceiver width D (128 released)
    token_num: int  # perceiver latents = global tokens (32)
    fsq_levels: tuple[int, ...]  # [4] * 6 -> 4096 codes
    ref_segment_duration: float = REF_SEGMENT_SECONDS

    @property
    def sample_rate(self) -> int:
        return self.mel.sample_rate

    @property
    def ref_samples(self) -> int:
        """Reference length in samples: 96000 (6 s at 16 kHz, a multiple of 320)."""
        seconds = int(self.sample_rate * self.ref_segment_duration)
        return seconds // LATENT_HOP_LENGTH * LATENT_HOP_LENGTH

    @classmethod
    def from_yaml(cls, path: str | Path) -> SpeakerEncoderConfig:
        cfg = OmegaConf.load(path)
        if not isinstance(cfg, DictConfig) or "audio_tokenizer" not in cfg:
            raise ValueError(f"{path}: expected a BiCodec config with top key 'audio_tokenizer'")
        return cls.from_dict(OmegaConf.to_container(cfg.audio_tokenizer, resolve=True))

    @classmethod
    def from_dict(cls, tok: dict) -> SpeakerEncoderConfig:
        # The fields the decoder shares (token count, FSQ levels, widths) are parsed and
        # checked by the decoder's own config, so both halves read the file the same way.
        shared = BiCodecConfig.from_dict(tok).speaker
        try:
            mel = MelConfig.from_dict(tok["mel_params"])
            input_dim = int(tok["speaker_encoder"]["input_dim"])
        except KeyError as err:
            raise ValueError(f"BiCodec config is missing the field {err}") from None
        if input_dim != mel.n_mels:
            raise ValueError(
                f"inconsistent BiCodec config: speaker_encoder.input_dim {input_dim} "
                f"!= mel_params.num_mels {mel.n_mels}"
            )
        if mel.hop_length != LATENT_HOP_LENGTH:
            raise ValueError(f"mel_params.hop_length {mel.hop_length}: only 320 is supported")
        return cls(
            mel=mel,
            input_dim=input_dim,
            latent_dim=shared.latent_dim,
            token_num=shared.token_num,
            fsq_levels=shared.fsq_levels,
        )


# -- the reference clip (float64 numpy, as upstream) --------------------------------


def check_clip(audio: ClipInput, sample_rate: int) -> np.ndarray:
    """A mono float clip as float64 (N,), or a ValueError that says what is wrong."""
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, numbers.Integral):
        raise ValueError(f"sample_rate must be an integer number of Hz, got {sample_rate!r}")
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    if isinstance(audio, Tensor):
        audio = audio.detach().cpu()
        # numpy has no bfloat16: widen any float first.
        audio = (audio.double() if audio.is_floating_point() else audio).numpy()
    clip = np.asarray(audio)
    if clip.dtype.kind != "f":
        raise ValueError(
            f"the reference clip must be float samples in [-1, 1], got dtype {clip.dtype} "
            "(scale integer PCM by its full range first)"
        )
    if clip.ndim != 1:
        raise ValueError(
            f"the reference clip must be mono, a 1-D array; got shape {clip.shape} "
            "(take one channel first)"
        )
    if clip.size == 0:
        raise ValueError("the reference clip is empty")
    if not np.isfinite(clip).all():
        raise ValueError("the reference clip contains NaN or infinite samples")
    return clip.astype(np.float64, copy=False)


def resample(clip: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
    """soxr "VHQ" on float64 (N,), as the reference pipeline does."""
    if rate == target_rate:
        return clip
    out = soxr.resample(clip, rate, target_rate, quality="VHQ")
    if out.size == 0:
        raise ValueError(f"the reference clip ({clip.size} samples at {rate} Hz) is too short")
    return out


def normalize_volume(clip: np.ndarray, target: float = 0.2) -> np.ndarray:
    """Scale so that the loud samples (90th-99th percentile of |x| > 0.01) average ``target``.

    Quiet clips (peak below 0.1) are first brought to a 0.1 peak; the sorted
    magnitudes are deliberately not recomputed after that, as upstream.
    """
    magnitudes = np.sort(np.abs(clip))
    if magnitudes[-1] < 0.1:
        clip = clip / max(magnitudes[-1], 1e-3) * 0.1
    loud = magnitudes[magnitudes > 0.01]
    if loud.size <= 10:
        return clip  # (nearly) silent: nothing to measure
    n = loud.size
    volume = loud[int(0.9 * n) : int(0.99 * n)].mean()
    clip = clip * np.clip(target / volume, 0.1, 10)
    peak = np.abs(clip).max()
    return clip / peak if peak > 1 else clip


def fit_length(clip: np.ndarray, length: int) -> np.ndarray:
    """Tile a short clip (whole repeats, then cut) or keep the first ``length`` samples."""
    if clip.size < length:
        clip = np.tile(clip, length // clip.size + 1)
    return clip[:length]


# -- the network --------------------------------------------------------------------


class FSQEncoder(nn.Module):
    """Finite scalar quantisation, encode side: (B, N, D) -> ids (B, N).

    The decode side (``project_out``) lives in the decoder's :class:`FSQProjection`.
    """

    def __init__(self, levels: Sequence[int], dim: int) -> None:
        super().__init__()
        self.project_in = nn.Linear(dim, len(levels))
        self.levels = tuple(levels)

    def bounded(self, x: Tensor) -> Tensor:  # (B, N, D) -> (B, N, len(levels)), pre-rounding
        z = self.project_in(x)
        levels = torch.tensor(self.levels, dtype=z.dtype, device=z.device)
        half = (levels - 1) * (1 + 1e-3) / 2
        # Even levels put the grid on half-integers: shift so that round() lands on L values.
        offset = torch.where(levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half)
        return torch.tanh(z + shift) * half - offset

    def forward(self, x: Tensor) -> Tensor:  # (B, N, D) -> (B, N) int64
        levels = torch.tensor(self.levels, device=x.device)
        digits = torch.round(self.bounded(x)).long() + levels // 2  # 0 .. L - 1
        # Mixed radix, least significant digit first.
        basis = torch.cumprod(torch.cat([levels.new_ones(1), levels[:-1]]), 0)
        return (digits * basis).sum(dim=-1)


class GlobalEncoder(nn.Module):
    """Mel (B, n_mels, T) -> global ids (B, 32); named ``speaker_encoder`` in BiCodec.

    The counterpart of the decoder's ``GlobalDequantizer``, under the same key prefix.
    """

    def __init__(self, config: SpeakerEncoderConfig) -> None:
        super().__init__()
        self.speaker_encoder = ECAPATDNN(config.input_dim)
        self.perceiver_sampler = PerceiverResampler(
            dim=config.latent_dim,
            context_dim=self.speaker_encoder.out_channels,
            num_latents=config.token_num,
        )
        self.quantizer = FSQEncoder(config.fsq_levels, config.latent_dim)


class SpeakerEncoder(nn.Module):
    """Reference clip -> 32 global tokens. Build with :func:`load_speaker_encoder`.

    Each stage is a method, so that it can be checked on its own. The model is
    read-only after loading, so one instance can serve several threads.
    """

    def __init__(self, config: SpeakerEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.mel_transformer = MelSpectrogram(config.mel)
        self.speaker_encoder = GlobalEncoder(config)
        self.load_report: LoadReport | None = None  # set by load_speaker_encoder

    # -- facts --------------------------------------------------------------------
    @property
    def sample_rate(self) -> int:
        """The rate the network runs at (16 kHz); clips of any rate are resampled to it."""
        return self.config.sample_rate

    @property
    def ref_samples(self) -> int:
        return self.config.ref_samples

    @property
    def device(self) -> torch.device:
        return self.speaker_encoder.perceiver_sampler.latents.device

    # -- the clip -------------------------------------------------------------------
    def resample(self, audio: ClipInput, sample_rate: int) -> np.ndarray:
        """Checked mono clip at ``sample_rate`` -> float64 (N',) at 16 kHz."""
        return resample(check_clip(audio, sample_rate), sample_rate, self.sample_rate)

    def prepare(self, audio: ClipInput, sample_rate: int) -> Tensor:
        """Clip -> the 6 s reference, float32 (96000,) on the encoder's device."""
        clip = fit_length(normalize_volume(self.resample(audio, sample_rate)), self.ref_samples)
        return torch.from_numpy(clip.astype(np.float32)).to(self.device)

    # -- the network, stage by stage ---------------------------------------------------
    @torch.inference_mode()
    def mel(self, ref: Tensor) -> Tensor:  # (N,) or (B, N) -> (B, 128, 1 + N // 320)
        return self.mel_transformer(ref.reshape(-1, ref.shape[-1]).to(self.device))

    @torch.inference_mode()
    def latent(self, mel: Tensor) -> Tensor:  # (B, 128, T) -> (B, 1536, T)
        return self.speaker_encoder.speaker_encoder(mel.to(self.device))

    @torch.inference_mode()
    def perceiver(self, latent: Tensor) -> Tensor:  # (B, 1536, T) -> (B, 32, D)
        return self.speaker_encoder.perceiver_sampler(latent.to(self.device).transpose(1, 2))

    @torch.inference_mode()
    def quantize(self, perceived: Tensor) -> Tensor:  # (B, 32, D) -> (B, 32) int64
        return self.speaker_encoder.quantizer(perceived.to(self.device))

    @torch.inference_mode()
    def encode(self, ref: Tensor) -> Tensor:  # (N,) or (B, N) references -> (B, 32) int64
        return self.quantize(self.perceiver(self.latent(self.mel(ref))))

    def global_tokens(self, audio: ClipInput, sample_rate: int) -> list[int]:
        """A mono float clip at any rate -> its 32 global token ids."""
        return self.encode(self.prepare(audio, sample_rate))[0].tolist()

    def forward(self, ref: Tensor) -> Tensor:
        return self.encode(ref)


# -- loading --------------------------------------------------------------------------


def load_speaker_encoder(path: str | Path, device: str | torch.device = "cpu") -> SpeakerEncoder:
    """Build the speaker encoder from ``path/config.yaml`` and its keys of ``model.safetensors``.

    ``path`` is the BiCodec folder the decoder loads from. Raises
    :class:`SpeakerEncoderUnavailable` when the checkpoint has no speaker encoder, and
    :class:`CheckpointError` naming the key when one is missing or mis-shaped.
    """
    started = time.perf_counter()
    config_path, weights_path = checkpoint_files(path)

    # The network is built on the meta device (no random init); the mel window and
    # filterbank are computed on the CPU regardless, since no checkpoint carries them.
    with torch.device("meta"):
        model = SpeakerEncoder(SpeakerEncoderConfig.from_yaml(config_path))
    state, report = _read_speaker_state(weights_path, model)
    model.load_state_dict(state, strict=True, assign=True)
    model = model.to(device).eval().requires_grad_(False)
    report.seconds = time.perf_counter() - started
    model.load_report = report
    logger.info(
        "BiCodec speaker encoder loaded from %s in %.2f s: %d keys, %d skipped",
        config_path.parent,
        report.seconds,
        report.loaded_keys,
        len(report.skipped_keys),
    )
    return model


def speaker_checkpoint_layout(model: SpeakerEncoder) -> dict[str, tuple[int, ...]]:
    """The checkpoint keys and shapes the speaker encoder reads (no weight norm here)."""
    return checkpoint_layout(model)


_NETWORK_PREFIX = "speaker_encoder.speaker_encoder."


def _read_speaker_state(
    weights_path: Path, model: SpeakerEncoder
) -> tuple[dict[str, Tensor], LoadReport]:
    report = LoadReport(path=weights_path)
    expected = speaker_checkpoint_layout(model)
    state: dict[str, Tensor] = {}
    with safe_open(str(weights_path), framework="pt") as checkpoint:
        available = set(checkpoint.keys())
        missing = [key for key in expected if key not in available]
        # A decode-only export may keep a few of these keys (the quantizer's, which the
        # decoder shares); without any of the ECAPA network's there is no encoder at all.
        network = [key for key in expected if key.startswith(_NETWORK_PREFIX)]
        if all(key in missing for key in network):
            raise SpeakerEncoderUnavailable(
                f"{weights_path}: the checkpoint has no speaker encoder (none of the "
                f"{len(network)} {_NETWORK_PREFIX}* keys), so it cannot turn a reference "
                "clip into global tokens; voice cloning needs the full BiCodec checkpoint"
            )
        if missing:
            shown = ", ".join(missing[:8])
            if len(missing) > 8:
                shown += f" and {len(missing) - 8} more"
            raise CheckpointError(
                f"{weights_path}: {len(missing)} speaker-encoder key(s) missing: {shown}"
            )
        for key, shape in expected.items():
            tensor = checkpoint.get_tensor(key)
            check_shape(key, tuple(tensor.shape), shape)
            # BatchNorm's num_batches_tracked stays an integer.
            state[key] = tensor.float() if tensor.is_floating_point() else tensor
    report.loaded_keys = len(state)
    report.skipped_keys = sorted(available - set(state))
    return state, report
