"""Window decodes replayed from CUDA graphs, one graph per bucket of shapes.

On a GPU a streaming chunk is small work in many small kernels launched from Python,
so launches, not arithmetic, bound it; a CUDA graph replays them with one launch.
Shapes are made few by bucketing: a batch is padded to a power of two (repeating its
first span) and its windows to a multiple of ``LENGTH_STEP`` tokens, with masks, so
the audio is that of the eager window decode. Windows longer than ``max_tokens``
(whole utterances), shapes past ``max_graphs`` buckets, and every bucket after a
failed capture run eagerly.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from decoder_gateway.codec.model.bicodec import BiCodecDecoder
from decoder_gateway.codec.runtime.spans import Span, Window, decode_pass, token_windows

logger = logging.getLogger(__name__)

LENGTH_STEP = 16  # tokens: windows are padded up to a multiple of this
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


@dataclass
class _Bucket:
    """The static buffers of one bucket (B spans, prenet windows Lp, generator Lg)."""

    semantic: Tensor  # (B, Lp) int64
    d_vector: Tensor  # (B, D)
    prenet_mask: Tensor  # (B, 1, Lp)
    gather: Tensor  # (B, 1, Lg) int64: prenet position of each generator position
    gen_mask: Tensor  # (B, 1, Lg)
    audio: Tensor | None = None  # (B, hop * Lg), written by each run
    graph: torch.cuda.CUDAGraph | None = None


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


class WindowGraphs:
    """Bucketed window passes of ``model``, replayed from CUDA graphs when ``capture``.

    Without ``capture`` (a CPU, or the tests) the same bucketed, padded passes run
    eagerly: the audio is the same, only the launches differ. Every tensor a graph
    reads or writes is a static buffer of its bucket; the speaker d-vector is computed
    outside (it builds a small tensor on the host, which a capture forbids).
    """

    max_batch = BATCH_BUCKETS[-1]  # spans per pass at most: the largest bucket

    def __init__(
        self,
        model: BiCodecDecoder,
        *,
        capture: bool | None = None,
        max_tokens: int = 256,
        max_graphs: int = 128,
    ) -> None:
        self.model = model
        self.capture = model.device.type == "cuda" if capture is None else capture
        self.max_tokens, self.max_graphs = max_tokens, max_graphs
        self._buckets: dict[tuple[int, int, int], _Bucket] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.capture else None
        self.failure: str | None = None  # why capturing stopped, if it did

    @torch.inference_mode()
    def decode_pass(self, spans: Sequence[Span]) -> list[Tensor]:
        """One pass of at most :attr:`max_batch` spans (their streams unused): the audio
        of each (float32, on the CPU), as :func:`.spans.decode_pass` gives it."""
        if not spans:
            return []
        if len(spans) > self.max_batch:
            raise ValueError(
                f"{len(spans)} spans in one pass; the largest bucket holds {self.max_batch}"
            )
        model = self.model
        prenet_windows, gen_windows = token_windows(model, spans)
        prenet_len = _round_up(max(b - a for a, b in prenet_windows), LENGTH_STEP)
        gen_len = _round_up(max(b - a for a, b in gen_windows), LENGTH_STEP)
        batch = next(size for size in BATCH_BUCKETS if size >= len(spans))
        key = (batch, prenet_len, gen_len)
        if prenet_len > self.max_tokens or (
            key not in self._buckets and len(self._buckets) >= self.max_graphs
        ):
            # Debug only: how often a deployment misses its buckets is worth a look
            # when tuning max_tokens and max_graphs, not a line per pass in production.
            logger.debug("eager window decode of %d spans (no bucket for %s)", len(spans), key)
            return decode_pass(model, spans)

        bucket = self._buckets.get(key) or self._new_bucket(key)
        self._fill(bucket, spans, prenet_windows, gen_windows)
        if bucket.graph is None and self.capture and self.failure is None:
            self._capture(bucket)
        if bucket.graph is not None:
            bucket.graph.replay()
        else:
            self._run(bucket)
        logger.debug("bucket %s served a pass of %d spans", key, len(spans))
        assert bucket.audio is not None
        audio = bucket.audio[: len(spans)].float().cpu()  # (B, hop * Lg)
        hop = model.hop_length
        return [
            audio[i, (span.start - ga) * hop : (span.end - ga) * hop]
            for i, (span, (ga, _)) in enumerate(zip(spans, gen_windows, strict=True))
        ]

    def _new_bucket(self, key: tuple[int, int, int]) -> _Bucket:
        batch, prenet_len, gen_len = key
        model, device = self.model, self.model.device
        dim = model.speaker_d_vector(torch.zeros(1, 32, dtype=torch.long, device=device)).shape[-1]
        bucket = _Bucket(
            semantic=torch.zeros(batch, prenet_len, dtype=torch.long, device=device),
            d_vector=torch.zeros(batch, dim, dtype=model.dtype, device=device),
            prenet_mask=torch.ones(batch, 1, prenet_len, dtype=model.dtype, device=device),
            gather=torch.zeros(batch, 1, gen_len, dtype=torch.long, device=device),
            gen_mask=torch.ones(batch, 1, gen_len, dtype=model.dtype, device=device),
        )
        self._buckets[key] = bucket
        return bucket

    def _fill(
        self,
        bucket: _Bucket,
        spans: Sequence[Span],
        prenet_windows: Sequence[Window],
        gen_windows: Sequence[Window],
    ) -> None:
        """Copy the batch into the bucket's buffers; padding rows repeat the first span."""
        model = self.model
        batch, prenet_len = bucket.semantic.shape
        gen_len = bucket.gather.shape[-1]
        rows = [*range(len(spans)), *[0] * (batch - len(spans))]
        semantic = torch.zeros(batch, prenet_len, dtype=torch.long)
        prenet_mask = torch.zeros(batch, 1, prenet_len)
        gather = torch.zeros(batch, 1, gen_len, dtype=torch.long)
        gen_mask = torch.zeros(batch, 1, gen_len)
        for row, i in enumerate(rows):
            (pa, pb), (ga, gb) = prenet_windows[i], gen_windows[i]
            semantic[row, : pb - pa] = spans[i].semantic[pa:pb]
            prenet_mask[row, 0, : pb - pa] = 1
            # Generator position t reads prenet position ga - pa + t; past the window the
            # index stays in range and the mask zeroes what it reads.
            gather[row, 0] = (torch.arange(gen_len) + ga - pa).clamp(max=prenet_len - 1)
            gen_mask[row, 0, : gb - ga] = 1
        global_tokens = torch.stack([spans[i].global_tokens for i in rows]).to(model.device)
        bucket.semantic.copy_(semantic)
        bucket.prenet_mask.copy_(prenet_mask)
        bucket.gather.copy_(gather)
        bucket.gen_mask.copy_(gen_mask)
        bucket.d_vector.copy_(model.speaker_d_vector(global_tokens))

    def _run(self, bucket: _Bucket) -> Tensor:
        """The bucket's pass, from its buffers to ``bucket.audio``."""
        model = self.model
        features = model.prenet_features(bucket.semantic, bucket.d_vector, bucket.prenet_mask)
        index = bucket.gather.expand(-1, features.shape[1], -1)  # (B, D, Lg)
        bucket.audio = model.waveform(features.gather(2, index), bucket.gen_mask)
        return bucket.audio

    def _capture(self, bucket: _Bucket) -> None:
        """Record the bucket's pass as a graph (after a warm-up on a side stream, as
        capture requires: a capture records, it does not compute); a failure turns
        capturing off and is logged once."""
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._run(bucket)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: the speaker encoder may run CUDA work on its own thread
            # meanwhile, which the default (global) mode would make fail the capture.
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                self._run(bucket)
            bucket.graph = graph
        except Exception as err:  # the eager pass keeps working: only speed is lost
            self.failure = f"{type(err).__name__}: {err}"
            logger.warning("CUDA graph capture failed, decoding without graphs: %s", err)
