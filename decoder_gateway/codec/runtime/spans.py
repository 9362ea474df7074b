"""Spans: the audio of tokens ``[start, end)`` of a sequence, as a full decode gives it.

Full decodes, batches and streaming chunks are all lists of spans, so there is one
thing to get right and to batch. BiCodec is not causal, but its reach is bounded: a
span needs only ``receptive_field`` tokens of its sequence each side for the prenet
(cheap, run on the wide window) and ``generator_context`` for the costly wave
generator (run on the narrow one). A window clipped at the sequence's ends sees the
same zero padding there as the full decode.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from decoder_gateway.codec.model.bicodec import BiCodecDecoder
from decoder_gateway.codec.runtime.stream_state import DecodeStream


@dataclass(frozen=True)
class Span:
    """Audio of tokens ``[start, end)`` of ``semantic``, as a full decode of it gives it."""

    semantic: Tensor  # (T,) int64, already validated
    global_tokens: Tensor  # (32,) int64, already validated
    start: int
    end: int
    # A streaming session's spans carry its decode state: the decoder then reuses what
    # earlier spans of the stream settled (see :mod:`.incremental`). ``semantic[0]``
    # is token ``offset`` of the stream, and ``semantic`` ends where the stream's
    # tokens are known to end for this span (the full decode of it is the answer).
    stream: DecodeStream | None = field(default=None, compare=False, repr=False)
    offset: int = 0


Window = tuple[int, int]  # tokens [a, b) of a span's sequence


@torch.inference_mode()
def decode_pass(model: BiCodecDecoder, spans: Sequence[Span]) -> list[Tensor]:
    """The spans' windows in one forward pass, padded to the longest (their streams
    unused); each result is float32 (hop * (end - start),) on the CPU."""
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


def token_windows(
    model: BiCodecDecoder, spans: Sequence[Span]
) -> tuple[list[Window], list[Window]]:
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
