"""Which spans share a forward pass: passes bounded by the work they hold, not a count.

Every pass reads all the decoder's weights, so batching small windows shares that
read; but a large batch's activations no longer fit the cache and run slower than
one by one. So a pass holds as many spans as fit a budget of generator-window
tokens (padding included), chosen per device (figures: docs/performance.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from decoder_gateway.codec.runtime.spans import Span

# What a pass may hold, in elements of the generator's widest activation (channels x
# samples per token), so that a narrower decoder batches proportionally more tokens:
# 64 tokens of the released decoder on a CPU (the fastest of `bench_decoder.py --only
# batch`), 4096 on CUDA (batching pays for as long as the batch fits).
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
    its settled state covers the context before, and the provisional tail after is
    short.
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
    costs: Sequence[int],
    budget: int,
    decode_pass: Callable[[Sequence[Span]], list[Tensor]],
    max_batch: int | None = None,
) -> list[Tensor]:
    """``decode_pass`` over passes of padded cost within ``budget`` (``costs``: one per
    span) and of at most ``max_batch`` spans; the results in the order of ``spans``."""
    if not spans:
        return []
    size = max_batch or len(spans)
    results: list[Tensor | None] = [None] * len(spans)
    for batch in split_batches(costs, budget):
        for start in range(0, len(batch), size):
            part = batch[start : start + size]
            for i, audio in zip(part, decode_pass([spans[i] for i in part]), strict=True):
                results[i] = audio
    return results  # type: ignore[return-value]
