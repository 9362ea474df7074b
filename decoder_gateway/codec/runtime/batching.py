"""Which spans share a forward pass: batches bounded by the work they hold, not a count.

Every forward pass reads all the decoder's weights (about 600 MB as released), so a
small window is bound by that read and batching small windows shares it. A large
batch, though, has activations that no longer fit the cache: on a CPU, one batch of
16 one-second windows ran at 0.6x the speed of the same windows one by one.
The measure of a batch is therefore the tokens its wave generator runs over
(``len(batch) * longest window``, padding included), and a batch holds as many spans
as fit a budget for the device. ``benchmarks/bench_decoder.py --only batch`` prints
the speed of each budget against one by one; the defaults are its fastest (64
tokens of the released decoder on a CPU).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from decoder_gateway.codec.runtime.spans import Span

# What a pass may hold, in elements of the generator's widest activation (channels x
# samples per token: 96 x 320 = 30720 as released), so that a narrower decoder batches
# proportionally more tokens. CPU: 64 tokens of the released decoder, the fastest
# budget on a 2-core AVX-512 host (bench_decoder.py --only batch, a mixed load: 1.13x
# one by one at 64, the same at 128-256, 0.71x at 1024, 0.58x in one pass). CUDA:
# batching pays for as long as the batch fits; 4096 tokens of the released decoder is
# 64 streams' chunks (not measured yet: gpu_check.sh prints the same table there).
RELEASED_ACTIVATION_PER_TOKEN = 96 * 320
CPU_BATCH_ELEMENTS = 64 * RELEASED_ACTIVATION_PER_TOKEN
CUDA_BATCH_ELEMENTS = 4096 * RELEASED_ACTIVATION_PER_TOKEN


def default_batch_tokens(device: torch.device | str, activation_per_token: int) -> int:
    """The batch budget (tokens of generator window per pass) for ``device`` and a
    decoder whose widest generator activation has ``activation_per_token`` elements."""
    elements = CUDA_BATCH_ELEMENTS if torch.device(device).type == "cuda" else CPU_BATCH_ELEMENTS
    return max(1, elements // activation_per_token)


def span_cost(span: Span, generator_context: int) -> int:
    """Tokens of wave-generator window that decoding ``span`` runs over.

    A plain span runs its whole window. A stream's span runs about its own tokens:
    its settled state covers the context before, and the provisional tail after
    is short (in a one-off CPU measurement, not a benchmark section, 8 streams of
    5-token chunks ran fastest 4-8 to a batch).
    """
    if span.stream is not None:
        return span.end - span.start
    length = span.semantic.numel()
    return min(length, span.end + generator_context) - max(0, span.start - generator_context)


def split_batches(costs: Sequence[int], budget: int) -> list[list[int]]:
    """Indices of ``costs`` grouped into batches of padded cost within ``budget``.

    Sorted by cost first, so that windows of like length share a batch (a batch is
    padded to its longest). A window over the budget goes alone.
    """
    batches: list[list[int]] = []
    current: list[int] = []
    for index in sorted(range(len(costs)), key=lambda i: costs[i]):
        # Sorted: the newcomer is the longest, so the padded cost is count x its cost.
        if current and (len(current) + 1) * costs[index] > budget:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def decode_in_batches(
    spans: Sequence[Span],
    generator_context: int,
    batch_tokens: int | None,
    decode_batch: Callable[[Sequence[Span]], list[Tensor]],
    max_batch: int | None = None,
) -> list[Tensor]:
    """``decode_batch`` over passes within ``batch_tokens`` (None: one pass) and of at
    most ``max_batch`` spans; the results in the order of ``spans``."""
    if not spans:
        return []
    if batch_tokens is None:
        batches = [list(range(len(spans)))]
    else:
        costs = [span_cost(span, generator_context) for span in spans]
        batches = split_batches(costs, batch_tokens)
    size = max_batch or len(spans)
    results: list[Tensor | None] = [None] * len(spans)
    for batch in batches:
        for start in range(0, len(batch), size):
            part = batch[start : start + size]
            for i, audio in zip(part, decode_batch([spans[i] for i in part]), strict=True):
                results[i] = audio
    return results  # type: ignore[return-value]
