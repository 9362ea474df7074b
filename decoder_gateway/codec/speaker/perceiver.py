"""Perceiver resampler of BiCodec's speaker encoder: a variable-length frame sequence
-> a fixed set of 32 latent vectors, by learned queries that attend to the clip.

Module names match the checkpoint (``latents``, ``proj_context``,
``layers.{k}.0.to_q``, ``layers.{k}.1.0``, ``norm.gamma``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HEADS = 8
DIM_HEAD = 64
DEPTH = 2
FF_MULT = 4


class Attention(nn.Module):
    """Multi-head attention of the queries over ``cat(queries, context)``, no biases."""

    def __init__(self, dim: int, heads: int = HEADS, dim_head: int = DIM_HEAD) -> None:
        super().__init__()
        self.heads = heads
        inner = heads * dim_head
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, queries: Tensor, context: Tensor) -> Tensor:
        # queries (B, Nq, D), context (B, T, D) -> (B, Nq, D)
        # The queries attend to themselves as well as to the clip.
        context = torch.cat((queries, context), dim=1)  # (B, Nq + T, D)
        q = self._split_heads(self.to_q(queries))  # (B, H, Nq, dh)
        k, v = (self._split_heads(t) for t in self.to_kv(context).chunk(2, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1 / sqrt(dh) = 1/8; (B, H, Nq, dh)
        return self.to_out(out.transpose(1, 2).flatten(2))

    def _split_heads(self, x: Tensor) -> Tensor:  # (B, N, H * dh) -> (B, H, N, dh)
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)


class GEGLU(nn.Module):
    """a * gelu(gate) from the two halves of the last axis (exact erf GELU)."""

    def forward(self, x: Tensor) -> Tensor:  # (..., 2H) -> (..., H)
        a, gate = x.chunk(2, dim=-1)
        return F.gelu(gate) * a


def feed_forward(dim: int, mult: int = FF_MULT) -> nn.Sequential:
    """Linear -> GEGLU -> Linear; hidden width 2/3 of ``mult * dim`` (the GLU convention)."""
    hidden = int(dim * mult * 2 / 3)  # 341 for D = 128
    return nn.Sequential(nn.Linear(dim, 2 * hidden), GEGLU(), nn.Linear(hidden, dim))


class RMSNorm(nn.Module):
    """x / ||x|| * sqrt(D) * gamma over the last axis."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=-1) * self.scale * self.gamma


class PerceiverResampler(nn.Module):
    """Frames (B, T, context_dim) -> latents (B, num_latents, dim)."""

    def __init__(self, dim: int, context_dim: int, num_latents: int, depth: int = DEPTH) -> None:
        super().__init__()
        self.proj_context = nn.Linear(context_dim, dim)
        self.latents = nn.Parameter(torch.zeros(num_latents, dim))
        self.layers = nn.ModuleList(
            nn.ModuleList([Attention(dim), feed_forward(dim)]) for _ in range(depth)
        )
        self.norm = RMSNorm(dim)

    def forward(self, frames: Tensor) -> Tensor:  # (B, T, C) -> (B, N, D)
        context = self.proj_context(frames)  # (B, T, D)
        queries = self.latents.expand(frames.shape[0], -1, -1)  # (B, N, D)
        for attention, ff in self.layers:
            queries = queries + attention(queries, context)
            queries = queries + ff(queries)
        return self.norm(queries)
