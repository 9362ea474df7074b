"""Streaming decode: semantic tokens in as the LLM writes them, audio chunks out.

BiCodec is not causal: a sample of token t depends on tokens t-67 .. t+67. Left
context costs nothing but compute (we keep the past), right context (look-ahead)
costs latency. The session therefore plans chunks on a schedule:

* the first chunk is small with a short look-ahead, so audio starts after
  ``first_chunk_tokens + first_lookahead_tokens`` tokens;
* later chunks take as much look-ahead as the LLM's lead over playback allows,
  assuming the LLM writes ``assumed_speedup`` times faster than real time, up to
  the full receptive field, from where on every chunk is sample-exact;
* where a chunk was approximate, the next one re-decodes its last
  ``crossfade_samples`` with more context and blends them in (raised-cosine,
  equal-gain), hiding the join;
* the start and the end of the stream are exact (the same zero padding as a full
  decode), and the chunks add up to exactly ``hop_length`` samples per token: each
  chunk but the last holds back its last ``crossfade_samples`` for the next one to
  blend, so after :meth:`StreamingSession.finish` there is always a last chunk,
  even one with no new token, that re-decodes the held tail up to the true end.

The schedule depends only on token counts, never on timing, so a stream's audio
is reproducible. Planning (:meth:`StreamingSession.plan`) and decoding are apart
so that a worker can batch the chunks of many sessions into one forward pass.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from .bicodec import BiCodecDecoder, TokenInput
from .spans import Span


@dataclass(frozen=True)
class StreamingConfig:
    """Chunking settings, in semantic tokens (50 per second) unless said otherwise."""

    first_chunk_tokens: int = 10
    first_lookahead_tokens: int = 4
    min_chunk_tokens: int = 10
    max_chunk_tokens: int = 50
    # None: the decoder's receptive field (67), i.e. exact once the lead allows it.
    max_lookahead_tokens: int | None = None
    assumed_speedup: float = 2.0
    crossfade_samples: int = 320

    def __post_init__(self) -> None:
        if self.first_chunk_tokens < 1 or self.min_chunk_tokens < 1:
            raise ValueError("chunk sizes must be at least one token")
        if self.max_chunk_tokens < self.min_chunk_tokens:
            raise ValueError("max_chunk_tokens must be >= min_chunk_tokens")
        if self.first_lookahead_tokens < 0:
            raise ValueError("first_lookahead_tokens must be >= 0")
        if self.assumed_speedup < 1.0:
            raise ValueError("assumed_speedup below 1 means the LLM is slower than playback")
        if self.crossfade_samples < 0:
            raise ValueError("crossfade_samples must be >= 0")
        if self.max_lookahead_tokens is not None and self.max_lookahead_tokens < 0:
            raise ValueError("max_lookahead_tokens must be >= 0")


@dataclass(frozen=True)
class PlannedChunk:
    """A span to decode; its audio from ``emit_from`` on belongs to this chunk."""

    span: Span
    emit_from: int  # samples into the span's audio where this chunk's output begins
    final: bool


class StreamingSession:
    """Decode one utterance incrementally. Not thread-safe; one owner at a time."""

    def __init__(
        self,
        decoder: BiCodecDecoder,
        global_tokens: TokenInput,
        config: StreamingConfig | None = None,
    ) -> None:
        self.decoder = decoder
        self.config = config or StreamingConfig()
        self.global_tokens = decoder.check_global(global_tokens)
        self.hop = decoder.hop_length
        # Look-ahead past the receptive field would add latency and change nothing.
        limit, field = self.config.max_lookahead_tokens, decoder.receptive_field
        self.max_lookahead = field if limit is None else min(limit, field)
        self.crossfade = min(
            self.config.crossfade_samples, self.config.first_chunk_tokens * self.hop
        )
        self._crossfade_tokens = math.ceil(self.crossfade / self.hop)
        self._tokens: list[int] = []
        self._finished = False
        self._planned_until = 0  # tokens whose audio is planned
        self._final_planned = False  # the chunk that reaches the true end is planned
        self._pending: deque[PlannedChunk] = deque()
        self._held: Tensor | None = None  # last samples of the previous chunk, to blend

    # -- input --------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return len(self._tokens)

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def done(self) -> bool:
        """Finished, the final chunk planned and every planned chunk completed.

        Until then a held crossfade tail may still be owed, even with every token planned.
        """
        return self._final_planned and not self._pending

    def push(self, semantic: Iterable[int]) -> None:
        if self._finished:
            raise RuntimeError("push() after finish()")
        ids = [int(token) for token in semantic]
        size = self.decoder.config.codebook_size
        for token in ids:
            if not 0 <= token < size:
                raise ValueError(f"semantic token id {token} is outside [0, {size})")
        self._tokens.extend(ids)

    def finish(self) -> None:
        """No more tokens: the rest is decoded exactly, up to the true end."""
        if not self._tokens:
            raise ValueError("semantic tokens are empty: nothing to decode")
        self._finished = True

    # -- planning -----------------------------------------------------------------
    def chunk_after(self, start: int) -> tuple[int, int]:
        """(end, look-ahead) of the chunk that starts at token ``start``."""
        cfg = self.config
        if start == 0:
            return cfg.first_chunk_tokens, min(cfg.first_lookahead_tokens, self.max_lookahead)
        # Tokens the LLM has written by the time playback reaches `start`.
        budget = (
            cfg.first_chunk_tokens + cfg.first_lookahead_tokens + int(cfg.assumed_speedup * start)
        )
        low = min(cfg.first_lookahead_tokens, self.max_lookahead)
        lookahead = max(low, min(self.max_lookahead, budget - start - cfg.min_chunk_tokens))
        end = max(
            start + cfg.min_chunk_tokens, min(start + cfg.max_chunk_tokens, budget - lookahead)
        )
        return end, lookahead

    def plan(self) -> list[PlannedChunk]:
        """Chunks that the tokens so far allow; decode them, then :meth:`complete` in order."""
        planned = []
        total = len(self._tokens)
        while not self._final_planned:
            start = self._planned_until
            end, lookahead = self.chunk_after(start)
            if self._finished and end + lookahead >= total:
                # The rest in one chunk, exact: its window ends at the true end. It has
                # no new token (start == total) when the previous chunk, without
                # look-ahead, ended at the last token: that one could not know the
                # stream ends there and held its tail back, to be re-decoded and blended.
                self._final_planned = True
                if start == total and not self.crossfade:
                    break  # nothing held back: all audio is out
                end = window_end = total
            elif end + lookahead <= total:
                window_end = end + lookahead
            else:
                break
            planned.append(self._make_chunk(start, end, window_end, self._final_planned))
            self._planned_until = end
        self._pending.extend(planned)
        return planned

    def _make_chunk(self, start: int, end: int, window_end: int, final: bool) -> PlannedChunk:
        span_start = max(0, start - self._crossfade_tokens) if start else 0
        window_start = max(0, span_start - self.decoder.receptive_field)
        semantic = torch.tensor(self._tokens[window_start:window_end], dtype=torch.long)
        span = Span(semantic, self.global_tokens, span_start - window_start, end - window_start)
        emit_from = start * self.hop - span_start * self.hop - (self.crossfade if start else 0)
        return PlannedChunk(span, emit_from, final)

    # -- output -------------------------------------------------------------------
    def complete(self, chunk: PlannedChunk, audio: Tensor) -> Tensor:
        """Turn a decoded chunk into the samples to play next (float32, 1-D)."""
        if not self._pending or self._pending[0] is not chunk:
            raise RuntimeError("chunks must be completed in the order they were planned")
        self._pending.popleft()
        audio = audio[chunk.emit_from :]
        if self._held is not None:
            blend = self._held.shape[0]
            fade_in = _fade_in(blend, audio.dtype)
            head = self._held * (1.0 - fade_in) + audio[:blend] * fade_in
            audio = torch.cat([head, audio[blend:]])
            self._held = None
        if not chunk.final and self.crossfade:
            audio, self._held = audio[: -self.crossfade], audio[-self.crossfade :]
        return audio


def _fade_in(length: int, dtype: torch.dtype) -> Tensor:
    """Raised-cosine ramp from 0 to 1; with its complement it sums to one (equal gain)."""
    phase = (torch.arange(length, dtype=torch.float64) + 0.5) / length
    return (0.5 - 0.5 * torch.cos(math.pi * phase)).to(dtype)
