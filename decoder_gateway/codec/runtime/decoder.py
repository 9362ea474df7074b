"""The decoder: the BiCodec model and the runtime around it, the one object that decodes.

The model only runs windows of tokens. What a deployment decides (the batch budget
and the price of spans against it, CUDA graphs, the streams' stages) lives here, in
one place, and so does the choice of path for each batch: graphed windows, the
streams' settled state, or plain windows.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from decoder_gateway.codec.model.bicodec import BiCodecDecoder, TokenInput
from decoder_gateway.codec.model.loading import LoadReport, load_bicodec
from decoder_gateway.codec.runtime.batching import (
    decode_in_batches,
    default_batch_tokens,
    span_cost,
)
from decoder_gateway.codec.runtime.graphs import WindowGraphs
from decoder_gateway.codec.runtime.incremental import Stage, build_stages, decode_streamed
from decoder_gateway.codec.runtime.spans import Span, decode_pass
from decoder_gateway.codec.runtime.streaming import StreamingConfig, StreamingSession


class Decoder:
    """Decodes spans of any lengths, voices and streams, batched within a budget.

    ``batch_tokens``: the most tokens of generator window in one forward pass (see
    :mod:`.batching`); None: the device's default. ``graphs``: replay window decodes
    from CUDA graphs (:mod:`.graphs`). Build one from a checkpoint with
    :func:`load_decoder`. Not thread-safe: one thread decodes (the decode worker's).
    """

    def __init__(
        self,
        model: BiCodecDecoder,
        *,
        batch_tokens: int | None = None,
        graphs: WindowGraphs | None = None,
        load_report: LoadReport | None = None,
    ) -> None:
        if batch_tokens is None:
            batch_tokens = default_batch_tokens(model.device, model.activation_per_token)
        if batch_tokens < 1:
            raise ValueError(f"batch_tokens must be at least 1, got {batch_tokens}")
        self.model = model
        self.batch_tokens = batch_tokens
        self.graphs = graphs
        self.load_report = load_report  # None for a model not loaded from a checkpoint
        self._stages: list[Stage] | None = None

    # -- facts --------------------------------------------------------------------
    @property
    def sample_rate(self) -> int:
        return self.model.sample_rate

    @property
    def hop_length(self) -> int:
        """Samples per semantic token."""
        return self.model.hop_length

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def cost(self, spans: Sequence[Span]) -> int:
        """What decoding ``spans`` costs against :attr:`batch_tokens` (tokens of
        generator window), so that a caller can fill a batch to the budget."""
        context = self.model.generator_context
        return sum(span_cost(span, context) for span in spans)

    # -- decoding -----------------------------------------------------------------
    def decode(self, semantic: TokenInput, global_tokens: TokenInput) -> Tensor:
        """Semantic (T,) + global (32,) ids -> float32 audio (hop * T,) on the CPU."""
        return self.decode_batch([(semantic, global_tokens)])[0]

    def decode_batch(self, items: Sequence[tuple[TokenInput, TokenInput]]) -> list[Tensor]:
        """Several (semantic, global) pairs of any lengths and voices, batched."""
        spans = []
        for semantic, global_tokens in items:
            ids = self.model.check_semantic(semantic)
            spans.append(Span(ids, self.model.check_global(global_tokens), 0, ids.numel()))
        return self.decode_spans(spans)

    @torch.inference_mode()
    def decode_spans(self, spans: Sequence[Span]) -> list[Tensor]:
        """Audio of each span (float32, on the CPU), in passes within the budget.

        Spans of streams reuse their stream's settled state (:mod:`.incremental`); the
        audio is the same. With CUDA graphs every span is a window decode replayed
        from a graph instead: on a GPU launches, not arithmetic, bound a chunk, and
        the stream state's many small steps would add launches.
        """
        if self.graphs is not None:
            plain = [replace(span, stream=None) for span in spans]
            return self._in_passes(plain, self.graphs.decode_pass, self.graphs.max_batch)
        if any(span.stream is not None for span in spans):
            return decode_streamed(self.model, self.streaming_stages(), spans, self._windows)
        return self._windows(spans)

    def open_stream(
        self, global_tokens: TokenInput, config: StreamingConfig | None = None
    ) -> StreamingSession:
        """A streaming session in ``global_tokens``' voice, whose spans this decodes."""
        return StreamingSession(self.model, global_tokens, config)

    def streaming_stages(self) -> list[Stage]:
        """The model's decode path as a chain of stages, for streams; built once."""
        if self._stages is None:
            self._stages = build_stages(self.model)
        return self._stages

    def _windows(self, spans: Sequence[Span]) -> list[Tensor]:
        """Plain window decodes, in passes within the budget."""
        return self._in_passes(spans, functools.partial(decode_pass, self.model))

    def _in_passes(
        self,
        spans: Sequence[Span],
        run_pass: Callable[[Sequence[Span]], list[Tensor]],
        max_batch: int | None = None,
    ) -> list[Tensor]:
        """The one place where an input is split into passes: by the budget and the
        price of each span (:meth:`cost`), and at most ``max_batch`` spans a pass."""
        costs = [self.cost([span]) for span in spans]
        return decode_in_batches(spans, costs, self.batch_tokens, run_pass, max_batch)


def load_decoder(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    batch_tokens: int | None = None,
    cuda_graphs: bool = False,
) -> Decoder:
    """The decoder of the BiCodec folder ``path`` (``config.yaml``, ``model.safetensors``).

    ``dtype``: see :func:`~decoder_gateway.codec.model.loading.load_bicodec`.
    ``batch_tokens``: None, the device's default. ``cuda_graphs``: window decodes
    replayed from CUDA graphs (on a CPU the same bucketed passes run eagerly).
    """
    model, report = load_bicodec(path, device, dtype)
    graphs = WindowGraphs(model) if cuda_graphs else None
    return Decoder(model, batch_tokens=batch_tokens, graphs=graphs, load_report=report)
