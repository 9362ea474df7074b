"""Span decoding: the audio of tokens ``[start, end)`` of a sequence, as a full decode gives it.

Every decode goes through :func:`decode_spans`. Full decodes, batches and streaming
chunks are all lists of spans, so there is one code path to get right and to batch.

BiCodec is not causal, but its reach is bounded: a token's samples depend on the
prenet features of ``generator_context`` tokens each side, which depend on the
tokens ``receptive_field`` each side. So a span needs only that much of its
sequence around it, and a window clipped at the sequence's ends sees the same zero
padding there as the full decode. The prenet is cheap and runs on the wide window;
the costly wave generator runs on the narrow one.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor, nn

from decoder_gateway.codec.runtime.batching import decode_in_batches

if TYPE_CHECKING:
    from decoder_gateway.codec.runtime.incremental import DecodeStream


@dataclass(frozen=True)
class Span:
    """Audio of tokens ``[start, end)`` of ``semantic``, as a full decode of it gives it."""

    semantic: Tensor  # (T,) int64, already validated
    global_tokens: Tensor  # (32,) int64, already validated
    start: int
    end: int
    # A streaming session's spans carry its decode state: the model then reuses what
    # earlier spans of the stream settled (see :mod:`.incremental`). ``semantic[0]``
    # is token ``offset`` of the stream, and ``semantic`` ends where the stream's
    # tokens are known to end for this span (the full decode of it is the answer).
    stream: DecodeStream | None = field(default=None, compare=False, repr=False)
    offset: int = 0


class SpanModel(Protocol):
    """What span decoding needs of a model: :class:`~.bicodec.BiCodecDecoder` has it.

    A protocol rather than an import, so that the model may use this module.
    """

    @property
    def hop_length(self) -> int: ...

    @property
    def receptive_field(self) -> int: ...

    @property
    def generator_context(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def features(self, semantic: Tensor, global_tokens: Tensor, mask: Tensor | None) -> Tensor:
        """(B, T) semantic ids + (B, 32) global ids -> wave generator input (B, C, T)."""
        ...

    def waveform(self, features: Tensor, mask: Tensor | None) -> Tensor:
        """(B, C, T) -> (B, hop * T) samples in the model's dtype and device."""
        ...


@torch.inference_mode()
def decode_spans(
    model: SpanModel, spans: Sequence[Span], batch_tokens: int | None = None
) -> list[Tensor]:
    """Decode spans; each result is float32 (hop * (end - start),) on the CPU.

    ``batch_tokens``: the most tokens of generator window in one forward pass (see
    :mod:`.batching`); None: all spans in one pass.
    """
    return decode_in_batches(
        spans, model.generator_context, batch_tokens, functools.partial(_decode_batch, model)
    )


def _decode_batch(model: SpanModel, spans: Sequence[Span]) -> list[Tensor]:
    """The spans in one forward pass, padded to the longest window."""
    if not spans:
        return []
    hop = model.hop_length
    prenet_windows, gen_windows = token_windows(model, spans)
    semantic, prenet_mask = pad_batch(
        [span.semantic[a:b] for span, (a, b) in zip(spans, prenet_windows, strict=True)],
        model.device,
        model.dtype,
    )
    global_tokens = torch.stack([span.global_tokens for span in spans]).to(model.device)
    features = model.features(semantic, global_tokens, prenet_mask)  # (B, C, T_prenet)

    # The generator's window inside the prenet's: offsets relative to the prenet window.
    gen_input, gen_mask = pad_batch(
        [
            features[i, :, ga - pa : gb - pa]
            for i, ((pa, _), (ga, gb)) in enumerate(zip(prenet_windows, gen_windows, strict=True))
        ],
        model.device,
        model.dtype,
    )
    audio = model.waveform(gen_input, gen_mask).float().cpu()  # (B, hop * T_gen)
    return [
        audio[i, (span.start - ga) * hop : (span.end - ga) * hop]
        for i, (span, (ga, _)) in enumerate(zip(spans, gen_windows, strict=True))
    ]


Window = tuple[int, int]  # tokens [a, b) of a span's sequence


def token_windows(model: SpanModel, spans: Sequence[Span]) -> tuple[list[Window], list[Window]]:
    """The tokens each span's decode reads: wide for the prenet, narrow for the wave
    generator, both clipped to the sequence (whose ends are zero padding there too)."""
    gen_ctx, full_ctx = model.generator_context, model.receptive_field
    prenet_windows, gen_windows = [], []
    for span in spans:
        length = span.semantic.numel()
        if not 0 <= span.start < span.end <= length:
            raise ValueError(f"span [{span.start}, {span.end}) outside 0..{length}")
        prenet_windows.append((max(0, span.start - full_ctx), min(length, span.end + full_ctx)))
        gen_windows.append((max(0, span.start - gen_ctx), min(length, span.end + gen_ctx)))
    return prenet_windows, gen_windows


def pad_batch(
    items: Sequence[Tensor], device: torch.device, mask_dtype: torch.dtype
) -> tuple[Tensor, Tensor | None]:
    """Right-pad along the last axis; the mask (B, 1, T) is None when all lengths agree."""
    lengths = [item.shape[-1] for item in items]
    longest = max(lengths)
    if all(n == longest for n in lengths):
        return torch.stack(list(items)).to(device), None
    batch = torch.stack([nn.functional.pad(item, (0, longest - item.shape[-1])) for item in items])
    mask = torch.arange(longest).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    return batch.to(device), mask.unsqueeze(1).to(device=device, dtype=mask_dtype)
