"""BiCodec's decode model: semantic tokens (50 Hz) + 32 global tokens -> 16 kHz audio.

Plain modules on windows of tokens; which windows to run, how to batch them and how
to stream is the runtime's business (:mod:`decoder_gateway.codec.runtime`). Module
names mirror the released checkpoint so that its keys load unchanged, except
``global_dequantizer``, which the checkpoint files under ``speaker_encoder`` (see
:mod:`.loading`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from decoder_gateway.codec.model.config import (
    BiCodecConfig,
    PrenetConfig,
    SpeakerConfig,
    WaveGeneratorConfig,
)
from decoder_gateway.codec.model.layers import (
    DecoderBlock,
    Snake,
    UnitSamplingBlock,
    VocosBackbone,
    WNConv1d,
    apply_mask,
)

TokenInput = Sequence[int] | np.ndarray | Tensor


class SemanticDequantizer(nn.Module):
    """Codebook row lookup (raw rows, no L2 norm) and a 1x1 projection to the latent width."""

    def __init__(self, codebook_size: int, codebook_dim: int, latent_dim: int) -> None:
        super().__init__()
        self.codebook = nn.Embedding(codebook_size, codebook_dim)
        self.out_project = WNConv1d(codebook_dim, latent_dim, kernel_size=1)

    def forward(self, semantic: Tensor) -> Tensor:  # (B, T) int64 -> (B, latent, T)
        return self.out_project(self.codebook(semantic).transpose(1, 2))


class FSQProjection(nn.Module):
    """Residual FSQ (one stage) index -> code, then ``project_out`` to the latent width."""

    def __init__(self, levels: Sequence[int], latent_dim: int) -> None:
        super().__init__()
        self.project_out = nn.Linear(len(levels), latent_dim)
        self.levels = tuple(levels)

    def forward(self, indices: Tensor) -> Tensor:  # (B, N) -> (B, N, latent)
        levels = torch.tensor(self.levels, device=indices.device)
        # Mixed-radix digits, least significant first; digit v -> (v - L/2) / (L/2).
        basis = torch.cumprod(torch.cat([levels.new_ones(1), levels[:-1]]), 0)
        digits = (indices.unsqueeze(-1) // basis) % levels  # (B, N, len(levels))
        half_width = levels // 2
        codes = (digits - half_width).to(self.project_out.weight.dtype) / half_width
        return self.project_out(codes)


class GlobalDequantizer(nn.Module):
    """32 global tokens -> speaker d-vector (B, out_dim)."""

    def __init__(self, config: SpeakerConfig) -> None:
        super().__init__()
        self.quantizer = FSQProjection(config.fsq_levels, config.latent_dim)
        self.project = nn.Linear(config.latent_dim * config.token_num, config.out_dim)

    def forward(self, global_tokens: Tensor) -> Tensor:  # (B, 32) -> (B, out_dim)
        latents = self.quantizer(global_tokens)  # (B, 32, latent)
        # Channel-major flatten: index = channel * 32 + token.
        return self.project(latents.transpose(1, 2).flatten(1))


class Prenet(nn.Module):
    """Feature decoder: z_q (B, latent, T) + d-vector -> (B, out_channels, T)."""

    def __init__(self, config: PrenetConfig) -> None:
        super().__init__()
        dim, inter = config.vocos_dim, config.vocos_intermediate_dim
        self.use_tanh_at_final = config.use_tanh_at_final
        self.linear_pre = nn.Linear(config.input_channels, dim)
        self.downsample = nn.Sequential(
            *(
                nn.Sequential(UnitSamplingBlock(), VocosBackbone(dim, dim, inter, 2))
                for _ in range(config.num_inner_backbones)
            )
        )
        self.vocos_backbone = VocosBackbone(
            dim, dim, inter, config.vocos_num_layers, condition_dim=config.condition_dim
        )
        self.linear = nn.Linear(dim, config.out_channels)

    def forward(self, z_q: Tensor, d_vector: Tensor, mask: Tensor | None) -> Tensor:
        x = self.linear_pre(z_q.transpose(1, 2))  # (B, T, dim)
        for sampler, backbone in self.downsample:
            x = backbone(sampler(x), None, mask)  # (B, T, dim)
        x = self.vocos_backbone(x.transpose(1, 2), d_vector, mask)  # (B, T, dim)
        x = self.linear(x).transpose(1, 2)  # (B, out, T)
        return torch.tanh(x) if self.use_tanh_at_final else x


class WaveGenerator(nn.Module):
    """DAC-style generator: (B, C, T) at the token rate -> (B, 1, hop * T) in (-1, 1)."""

    def __init__(self, config: WaveGeneratorConfig) -> None:
        super().__init__()
        self.rates = config.rates
        layers: list[nn.Module] = [
            WNConv1d(config.input_channel, config.channels, kernel_size=7, padding=3)
        ]
        width = config.channels
        for rate, kernel in zip(config.rates, config.kernel_sizes, strict=True):
            layers.append(DecoderBlock(width, width // 2, kernel, rate))
            width //= 2
        layers += [Snake(width), WNConv1d(width, 1, kernel_size=7, padding=3), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        first, *blocks, snake, last, tanh = self.model
        x = first(apply_mask(x, mask))
        for block, rate in zip(blocks, self.rates, strict=True):
            upsampled = None if mask is None else mask.repeat_interleave(rate, dim=-1)
            x = block(x, mask, upsampled)
            mask = upsampled
        return tanh(last(apply_mask(snake(x), mask)))


# The receptive field is counted here, next to the convs whose kernels it counts; the
# runtime reads the totals off the model.


def prenet_context_tokens(config: BiCodecConfig) -> int:
    """Tokens of context each side of a frame that the prenet reads (57 as released).

    Each VocosBackbone has one embed conv and one depthwise conv per block, all k7 (±3).
    """
    pre = config.prenet
    convs = pre.num_inner_backbones * (1 + 2) + 1 + pre.vocos_num_layers
    return 3 * convs


def generator_context_tokens(config: BiCodecConfig) -> int:
    """Tokens of context each side that the wave generator reads (10 as released).

    Walks the sample interval of token 0 back through every conv (interval arithmetic).
    """
    gen = config.generator
    unit_reach = 3 * (1 + 3 + 9)  # three k7 residual units, dilations 1, 3, 9
    lo, hi = -3, gen.hop_length - 1 + 3  # samples of token 0 through the last k7 conv
    for rate, kernel in zip(reversed(gen.rates), reversed(gen.kernel_sizes), strict=True):
        lo, hi = lo - unit_reach, hi + unit_reach
        pad = (kernel - rate) // 2
        # Output m of a transposed conv reads input i when m = rate * i - pad + k, 0 <= k < K.
        lo, hi = math.ceil((lo + pad - (kernel - 1)) / rate), (hi + pad) // rate
    lo, hi = lo - 3, hi + 3  # the first k7 conv
    return max(-lo, hi)


class BiCodecDecoder(nn.Module):
    """Decode-only BiCodec on windows of tokens.

    Load weights with :func:`.loading.load_bicodec`; decode through the runtime's
    :class:`~decoder_gateway.codec.runtime.decoder.Decoder`, which owns batching,
    streaming and CUDA graphs.
    """

    def __init__(self, config: BiCodecConfig) -> None:
        super().__init__()
        self.config = config
        self.quantizer = SemanticDequantizer(
            config.codebook_size, config.codebook_dim, config.latent_dim
        )
        self.global_dequantizer = GlobalDequantizer(config.speaker)
        self.prenet = Prenet(config.prenet)
        self.decoder = WaveGenerator(config.generator)
        self.prenet_context = prenet_context_tokens(config)
        self.generator_context = generator_context_tokens(config)

    # -- facts --------------------------------------------------------------------
    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    @property
    def hop_length(self) -> int:
        """Samples per semantic token (320)."""
        return self.config.hop_length

    @property
    def receptive_field(self) -> int:
        """Tokens of context each side for a sample-exact chunked decode (67 as released)."""
        return self.prenet_context + self.generator_context

    @property
    def activation_per_token(self) -> int:
        """Elements per token of the wave generator's widest activation (channels x
        samples per token; 96 x 320 = 30720 as released): what a batch fills memory with."""
        gen = self.config.generator
        widest, width, samples = gen.channels, gen.channels, 1
        for rate in gen.rates:
            width, samples = width // 2, samples * rate
            widest = max(widest, width * samples)
        return widest

    @property
    def device(self) -> torch.device:
        return self.quantizer.codebook.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.quantizer.codebook.weight.dtype

    # -- input checks -------------------------------------------------------------
    def check_semantic(self, semantic: TokenInput) -> Tensor:
        """Validate semantic token ids: a non-empty 1-D sequence in [0, codebook_size)."""
        ids = _as_ids(semantic, "semantic tokens")
        if ids.numel() == 0:
            raise ValueError("semantic tokens are empty: nothing to decode")
        _check_range(ids, self.config.codebook_size, "semantic token")
        return ids

    def check_global(self, global_tokens: TokenInput) -> Tensor:
        """Validate global token ids: exactly token_num (32) ids in [0, 4096)."""
        ids = _as_ids(global_tokens, "global tokens")
        expected = self.config.speaker.token_num
        if ids.numel() != expected:
            raise ValueError(f"expected exactly {expected} global tokens, got {ids.numel()}")
        _check_range(ids, self.config.speaker.codebook_size, "global token")
        return ids

    # -- the model, on windows of tokens ------------------------------------------
    def features(self, semantic: Tensor, global_tokens: Tensor, mask: Tensor | None) -> Tensor:
        """(B, T) semantic ids + (B, 32) global ids -> wave generator input (B, out_dim, T).

        ``mask`` (B, 1, T) marks the tokens of each window in a right-padded batch.
        """
        return self.prenet_features(semantic, self.speaker_d_vector(global_tokens), mask)

    def speaker_d_vector(self, global_tokens: Tensor) -> Tensor:
        """(B, 32) global ids -> the speaker d-vector (B, D) that conditions the decode."""
        return self.global_dequantizer(global_tokens)

    def prenet_features(self, semantic: Tensor, d_vector: Tensor, mask: Tensor | None) -> Tensor:
        """:meth:`features` from the speaker d-vector (B, D) rather than its tokens."""
        features = self.prenet(self.quantizer(semantic), d_vector, mask)  # (B, D, T)
        return features + d_vector.unsqueeze(-1)

    def waveform(self, features: Tensor, mask: Tensor | None) -> Tensor:
        """(B, D, T) generator input -> (B, hop * T) samples, in the model's dtype."""
        return self.decoder(features, mask)[:, 0]


def _as_ids(values: TokenInput, what: str) -> Tensor:
    if isinstance(values, Tensor):
        ids = values.detach().cpu()
    else:
        try:
            ids = torch.as_tensor(np.asarray(values))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{what} must be a sequence of integers: {err}") from None
    if ids.numel() == 0:
        return torch.zeros(0, dtype=torch.long)  # an empty list parses as float64
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"{what} must be integers, got {ids.dtype}")
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]  # accept (1, T) as produced by a tokenizer
    if ids.dim() != 1:
        raise ValueError(f"{what} must be a 1-D sequence, got shape {tuple(ids.shape)}")
    return ids.to(torch.long)


def _check_range(ids: Tensor, size: int, what: str) -> None:
    bad = (ids < 0) | (ids >= size)
    if bool(bad.any()):
        position = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{what} id {int(ids[position])} at position {position} is outside [0, {size})"
        )
