"""Building blocks of the BiCodec decode path, named so that ``state_dict`` keys
match the released checkpoint.

Every temporal convolution takes an optional ``mask`` (B, 1, T) of ones inside each
sequence and zeros in the padding of a batch. Multiplying the conv input by it
makes a padded batch item see exactly the zero padding that it would see alone,
so items of different lengths decode in one pass with the same result as one by
one. Per-frame layers (linears, LayerNorms, Snake) need no mask: what they write
into the padding is zeroed again before the next temporal conv.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def apply_mask(x: Tensor, mask: Tensor | None) -> Tensor:
    return x if mask is None else x * mask


class WNConv1d(nn.Conv1d):
    """A Conv1d stored weight-normed in the checkpoint (``weight_g``/``weight_v``).

    The loader folds the norm into ``weight`` once; at run time it is a plain conv.
    """


class WNConvTranspose1d(nn.ConvTranspose1d):
    """A ConvTranspose1d stored weight-normed; the norm is per *input* channel (axis 0)."""


WEIGHT_NORMED = (WNConv1d, WNConvTranspose1d)


class Snake(nn.Module):
    """x + sin²(αx) / α with one linear α per channel (plain Snake, not SnakeBeta)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))

    def forward(self, x: Tensor) -> Tensor:  # (B, C, T) -> (B, C, T)
        return x + (self.alpha + 1e-9).reciprocal() * torch.sin(self.alpha * x).pow(2)


class AdaLayerNorm(nn.Module):
    """LayerNorm without affine, then ``y * scale(c) + shift(c)``; the scale is raw, not 1+scale."""

    def __init__(self, dim: int, condition_dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.dim = dim
        self.scale = nn.Linear(condition_dim, dim)
        self.shift = nn.Linear(condition_dim, dim)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:  # (B, T, C), (B, D) -> (B, T, C)
        x = F.layer_norm(x, (self.dim,), eps=self.eps)
        return x * self.scale(cond).unsqueeze(1) + self.shift(cond).unsqueeze(1)


class ConvNeXtBlock(nn.Module):
    """Depthwise conv k7 -> (Ada)LayerNorm -> Linear -> GELU(erf) -> Linear -> gamma, residual."""

    def __init__(self, dim: int, intermediate_dim: int, condition_dim: int | None) -> None:
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm: nn.Module
        if condition_dim is None:
            self.norm = nn.LayerNorm(dim, eps=1e-6)
        else:
            self.norm = AdaLayerNorm(dim, condition_dim)
        self.pwconv1 = nn.Linear(dim, intermediate_dim)
        self.pwconv2 = nn.Linear(intermediate_dim, dim)
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor, cond: Tensor | None, mask: Tensor | None) -> Tensor:
        residual = x  # (B, C, T)
        x = self.dwconv(apply_mask(x, mask)).transpose(1, 2)  # (B, T, C)
        x = self.norm(x) if cond is None else self.norm(x, cond)
        x = self.pwconv2(F.gelu(self.pwconv1(x)))
        return residual + (self.gamma * x).transpose(1, 2)


class VocosBackbone(nn.Module):
    """embed conv k7 -> norm -> ConvNeXt blocks -> final LayerNorm.

    Input channels-first (B, C_in, T), output channels-last (B, T, dim). With a
    ``condition_dim`` every norm but the final one is an AdaLayerNorm on the d-vector.
    """

    def __init__(
        self,
        input_channels: int,
        dim: int,
        intermediate_dim: int,
        num_layers: int,
        condition_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.embed = nn.Conv1d(input_channels, dim, kernel_size=7, padding=3)
        self.norm: nn.Module
        if condition_dim is None:
            self.norm = nn.LayerNorm(dim, eps=1e-6)
        else:
            self.norm = AdaLayerNorm(dim, condition_dim)
        self.convnext = nn.ModuleList(
            ConvNeXtBlock(dim, intermediate_dim, condition_dim) for _ in range(num_layers)
        )
        self.final_layer_norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: Tensor, cond: Tensor | None, mask: Tensor | None) -> Tensor:
        x = self.embed(apply_mask(x, mask)).transpose(1, 2)  # (B, T, dim)
        x = self.norm(x) if cond is None else self.norm(x, cond)
        x = x.transpose(1, 2)  # (B, dim, T)
        for block in self.convnext:
            x = block(x, cond, mask)
        return self.final_layer_norm(x.transpose(1, 2))


class UnitSamplingBlock(nn.Module):
    """Upstream SamplingBlock at ratio 1: no parameters, channels-last in, ``3 * x`` out.

    Its conv branch and both skip branches are identities at ratio 1, and their sum
    is kept because a biased conv and a LayerNorm follow.
    """

    def forward(self, x: Tensor) -> Tensor:  # (B, T, C) -> (B, C, T)
        x = x.transpose(1, 2)
        return x + x + x


class ResidualUnit(nn.Module):
    """Snake -> WN conv k7 (dilated) -> Snake -> WN conv k1, plus the input."""

    def __init__(self, dim: int, dilation: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            Snake(dim),
            WNConv1d(dim, dim, kernel_size=7, dilation=dilation, padding=3 * dilation),
            Snake(dim),
            WNConv1d(dim, dim, kernel_size=1),
        )

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        snake1, conv7, snake2, conv1 = self.block
        return x + conv1(snake2(conv7(apply_mask(snake1(x), mask))))


class DecoderBlock(nn.Module):
    """Snake -> WN transposed conv (×stride) -> residual units with dilation 1, 3, 9."""

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int, stride: int) -> None:
        super().__init__()
        # Padding (K - S) // 2 with no output_padding gives exactly stride * T_in samples.
        self.block = nn.Sequential(
            Snake(in_dim),
            WNConvTranspose1d(
                in_dim,
                out_dim,
                kernel_size=kernel_size,
                stride=stride,
                padding=(kernel_size - stride) // 2,
            ),
            ResidualUnit(out_dim, 1),
            ResidualUnit(out_dim, 3),
            ResidualUnit(out_dim, 9),
        )

    def forward(self, x: Tensor, mask_in: Tensor | None, mask_out: Tensor | None) -> Tensor:
        snake, upsample, *units = self.block
        x = upsample(apply_mask(snake(x), mask_in))
        for unit in units:
            x = unit(x, mask_out)
        return x
