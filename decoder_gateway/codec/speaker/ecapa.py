"""ECAPA-TDNN of BiCodec's speaker encoder, the part on the global-token path.

Magnitude mel (B, 128, T) -> frame-level latent (B, 1536, T). The attentive
pooling, ``bn`` and ``linear`` (x-vector) branch of the released network does not
feed the tokens, so it is not built; its keys are reported as skipped on load.
Module names match the checkpoint (``layer1``, ``layer2.se_res2block.1.convs.0``...).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ECAPA_CHANNELS = 512  # fixed in the released architecture, whatever the config says
RES2_SCALE = 8  # Res2 groups: 512 channels -> 8 groups of 64
SE_BOTTLENECK = 128
DILATIONS = (2, 3, 4)  # layer2, layer3, layer4


class ConvReluBN(nn.Module):
    """Conv1d -> ReLU -> BatchNorm (in that order: the norm sees rectified values)."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 1, dilation: int = 1
    ) -> None:
        super().__init__()
        padding = dilation * (kernel_size - 1) // 2  # "same" length
        self.conv = nn.Conv1d(
            in_channels, out_channels, kernel_size, padding=padding, dilation=dilation
        )
        self.bn = nn.BatchNorm1d(out_channels)

    def forward(self, x: Tensor) -> Tensor:  # (B, C_in, T) -> (B, C_out, T)
        return self.bn(F.relu(self.conv(x)))


class Res2Conv(nn.Module):
    """Res2Net's hierarchical conv: each group sees the previous group's output too.

    The last group passes through untouched, so there are ``scale - 1`` convs.
    """

    def __init__(self, channels: int, kernel_size: int, dilation: int, scale: int) -> None:
        super().__init__()
        self.scale = scale
        width = channels // scale
        padding = dilation * (kernel_size - 1) // 2
        self.convs = nn.ModuleList(
            nn.Conv1d(width, width, kernel_size, padding=padding, dilation=dilation)
            for _ in range(scale - 1)
        )
        self.bns = nn.ModuleList(nn.BatchNorm1d(width) for _ in range(scale - 1))

    def forward(self, x: Tensor) -> Tensor:  # (B, C, T) -> (B, C, T)
        groups = x.chunk(self.scale, dim=1)  # scale x (B, C / scale, T)
        outputs = []
        carried = groups[0]
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns, strict=True)):
            if i >= 1:
                carried = carried + groups[i]
            carried = bn(F.relu(conv(carried)))
            outputs.append(carried)
        outputs.append(groups[-1])
        return torch.cat(outputs, dim=1)


class SqueezeExcitation(nn.Module):
    """Channel gates from the time-averaged activations: x * sigmoid(MLP(mean_t x))."""

    def __init__(self, channels: int, bottleneck: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(channels, bottleneck)
        self.linear2 = nn.Linear(bottleneck, channels)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, T) -> (B, C, T)
        gates = torch.sigmoid(self.linear2(F.relu(self.linear1(x.mean(dim=2)))))  # (B, C)
        return x * gates.unsqueeze(-1)


class SERes2Block(nn.Module):
    """1x1 CRB -> Res2 dilated conv -> 1x1 CRB -> squeeze-excitation, plus the input."""

    def __init__(self, channels: int, dilation: int) -> None:
        super().__init__()
        self.se_res2block = nn.Sequential(
            ConvReluBN(channels, channels),
            Res2Conv(channels, kernel_size=3, dilation=dilation, scale=RES2_SCALE),
            ConvReluBN(channels, channels),
            SqueezeExcitation(channels, SE_BOTTLENECK),
        )

    def forward(self, x: Tensor) -> Tensor:  # (B, C, T) -> (B, C, T)
        return x + self.se_res2block(x)


class ECAPATDNN(nn.Module):
    """Mel (B, n_mels, T) -> ReLU(conv(cat(out2, out3, out4))) (B, 3 * 512, T)."""

    def __init__(self, n_mels: int, channels: int = ECAPA_CHANNELS) -> None:
        super().__init__()
        self.layer1 = ConvReluBN(n_mels, channels, kernel_size=5)
        self.layer2 = SERes2Block(channels, DILATIONS[0])
        self.layer3 = SERes2Block(channels, DILATIONS[1])
        self.layer4 = SERes2Block(channels, DILATIONS[2])
        self.conv = nn.Conv1d(3 * channels, 3 * channels, kernel_size=1)

    @property
    def out_channels(self) -> int:
        return self.conv.out_channels

    def forward(self, mel: Tensor) -> Tensor:  # (B, n_mels, T) -> (B, 1536, T)
        out1 = self.layer1(mel)
        out2 = self.layer2(out1)
        out3 = self.layer3(out2)
        out4 = self.layer4(out3)
        # Multi-layer feature aggregation: the first block's output is not part of it.
        return F.relu(self.conv(torch.cat((out2, out3, out4), dim=1)))
