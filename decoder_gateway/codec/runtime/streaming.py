"""Streaming decode: semantic tokens in as the LLM writes them, audio chunks out.

BiCodec is not causal: a sample depends on ``receptive_field`` tokens each side. The
past costs only compute, but look-ahead costs latency, so a session plans chunks on
a schedule: a small first chunk with short look-ahead (or as much as arrives within
a first-audio budget), then as much look-ahead as the LLM's lead over playback
allows, up to the receptive field. That schedule spends the LLM's lead on look-ahead
and assumes an LLM ``assumed_speedup`` times faster than playback. A listener's buffer
is what carries its stream through a busy moment (another stream arriving, a slow
decoder pass), so while the buffer is short of a target the lead goes to audio first,
at a quality look-ahead (16 tokens are within 84 dB of exact), and a listener close to
the end of its audio gets a chunk from the tokens there are. An approximate chunk's
tail is re-decoded by the next chunk and crossfaded in; the start and the end are
exact, and the chunks add up to ``hop_length`` samples per token. Planning is apart
from decoding so that a worker can batch the chunks of many sessions; each session's
spans carry its :class:`~.stream_state.DecodeStream`, so settled samples are computed
once.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from decoder_gateway.codec.model.bicodec import BiCodecDecoder, TokenInput
from decoder_gateway.codec.runtime.spans import Span
from decoder_gateway.codec.runtime.stream_state import DecodeStream


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
    # Seconds from the first token to the first chunk's last look-ahead token: the
    # first chunk waits for the tokens that arrive within it (at the measured rate),
    # at least first_chunk_tokens. None: first_lookahead_tokens, whatever the timing.
    first_audio_budget_s: float | None = None
    # The listener's buffer (seconds of audio it has left), when plan() is told it:
    # below target_buffer_s, a chunk goes out as soon as there are min_chunk_tokens
    # past the last one plus buffering_lookahead_tokens of look-ahead; below
    # min_buffer_s, from whatever tokens there are. 0: the schedule alone (reproducible).
    min_buffer_s: float = 0.0
    target_buffer_s: float = 0.0
    buffering_lookahead_tokens: int = 16

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
        if self.first_audio_budget_s is not None and not self.first_audio_budget_s > 0:
            raise ValueError("first_audio_budget_s must be > 0 (None: count-based first chunk)")
        if self.min_buffer_s < 0 or self.target_buffer_s < 0:
            raise ValueError("buffer thresholds must be >= 0")
        if self.buffering_lookahead_tokens < 0:
            raise ValueError("buffering_lookahead_tokens must be >= 0")


@dataclass(frozen=True)
class PlannedChunk:
    """A span to decode; its audio from ``emit_from`` on belongs to this chunk."""

    span: Span
    emit_from: int  # samples into the span's audio where this chunk's output begins
    final: bool


class StreamingSession:
    """Plan the chunks of one utterance as its tokens come. Not thread-safe; one owner.

    Open one with :meth:`~.decoder.Decoder.open_stream`, which decodes its spans.
    Each chunk but the last holds back its last ``crossfade_samples`` for the next one
    to blend, so after :meth:`finish` there is always a last chunk, even one with no
    new token, that re-decodes the held tail up to the true end. Without a
    first-audio budget the schedule depends only on token counts, so a stream's
    audio is reproducible.
    """

    def __init__(
        self,
        model: BiCodecDecoder,
        global_tokens: TokenInput,
        config: StreamingConfig | None = None,
    ) -> None:
        self.model = model
        self.config = config or StreamingConfig()
        self.global_tokens = model.check_global(global_tokens)
        self.hop = model.hop_length
        # Look-ahead past the receptive field would add latency and change nothing.
        limit, field = self.config.max_lookahead_tokens, model.receptive_field
        self.max_lookahead = field if limit is None else min(limit, field)
        self.crossfade = min(
            self.config.crossfade_samples, self.config.first_chunk_tokens * self.hop
        )
        self._crossfade_tokens = math.ceil(self.crossfade / self.hop)
        self._tokens: list[int] = []
        self._finished = False
        # The first chunk's look-ahead: fixed by the count, or chosen at plan time.
        self._first_lookahead: int | None = None
        if self.config.first_audio_budget_s is None:
            self._first_lookahead = min(self.config.first_lookahead_tokens, self.max_lookahead)
        self._first_at: float | None = None  # when the first tokens came
        self._first_push = 0  # how many came then
        self._last_at = 0.0  # when the latest tokens came
        self._planned_until = 0  # tokens whose audio is planned
        self._window_end = 0  # where the last planned chunk's window ended
        self._final_planned = False  # the chunk that reaches the true end is planned
        self._pending: deque[PlannedChunk] = deque()
        self._held: Tensor | None = None  # last samples of the previous chunk, to blend
        # What the decoder settled for this stream, reused by the next chunk's span.
        self.stream = DecodeStream(model, self.global_tokens, self._crossfade_tokens)

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

    def push(self, semantic: Iterable[int], at: float | None = None) -> None:
        """Add tokens that arrived at ``at`` (``time.monotonic()``; default: now).

        Only a first chunk chosen by time (``first_audio_budget_s``) reads the times.
        """
        if self._finished:
            raise RuntimeError("push() after finish()")
        ids = [int(token) for token in semantic]
        size = self.model.config.codebook_size
        for token in ids:
            if not 0 <= token < size:
                raise ValueError(f"semantic token id {token} is outside [0, {size})")
        if ids:
            self._last_at = time.monotonic() if at is None else at
            if self._first_at is None:
                self._first_at, self._first_push = self._last_at, len(ids)
        self._tokens.extend(ids)

    def finish(self) -> None:
        """No more tokens: the rest is decoded exactly, up to the true end."""
        if not self._tokens:
            raise ValueError("semantic tokens are empty: nothing to decode")
        self._finished = True

    # -- planning -----------------------------------------------------------------
    def chunk_after(self, start: int) -> tuple[int, int]:
        """(end, look-ahead) of the chunk that starts at token ``start``.

        With a first-audio budget, the first chunk's look-ahead counts once chosen
        (before that, the configured ``first_lookahead_tokens`` stands in).
        """
        cfg = self.config
        chosen = self._first_lookahead
        if start == 0:
            if chosen is None:
                return cfg.first_chunk_tokens, min(cfg.first_lookahead_tokens, self.max_lookahead)
            return cfg.first_chunk_tokens, chosen
        lead = cfg.first_lookahead_tokens  # the first chunk's: counted, or chosen by time
        if cfg.first_audio_budget_s is not None and chosen is not None:
            lead = chosen
        # Tokens the LLM has written by the time playback reaches `start`.
        budget = cfg.first_chunk_tokens + lead + int(cfg.assumed_speedup * start)
        # Never less look-ahead than the first chunk had (window ends only move on).
        low = min(lead, self.max_lookahead)
        lookahead = max(low, min(self.max_lookahead, budget - start - cfg.min_chunk_tokens))
        end = max(
            start + cfg.min_chunk_tokens, min(start + cfg.max_chunk_tokens, budget - lookahead)
        )
        return end, lookahead

    def plan(self, buffer_s: float | None = None) -> list[PlannedChunk]:
        """Chunks that the tokens so far allow; decode them, then :meth:`complete` in order.

        ``buffer_s``: the audio the listener has left, in seconds (None: not playing
        yet). Below the config's ``target_buffer_s`` a chunk goes out as soon as the
        tokens give ``min_chunk_tokens`` of audio at ``buffering_lookahead_tokens`` of
        look-ahead, whenever that reaches further than the schedule; below
        ``min_buffer_s`` (about to run dry) from the tokens there are (at least
        ``min_chunk_tokens // 2`` new ones and ``first_lookahead_tokens`` of look-ahead):
        approximate audio now rather than exact audio after a silence. The schedule
        depends on token counts only as long as no buffer is below its threshold.
        """
        planned = []
        total = len(self._tokens)
        while not self._final_planned:
            start = self._planned_until
            if start == 0 and self._first_lookahead is None:
                self._first_lookahead = self._timed_first_lookahead()
                if self._first_lookahead is None:
                    break  # another token still fits in the budget: wait for it
            end, lookahead = self.chunk_after(start)
            # A window never ends before the last one did: the stream's settled state
            # has gone that far (a shorter window would decode from scratch).
            lookahead = max(lookahead, min(self.max_lookahead, self._window_end - end))
            buffering = self._buffering_chunk(start, total, buffer_s)
            if self._finished and end + lookahead >= total:
                # The rest in one chunk, exact: its window ends at the true end. It has
                # no new token (start == total) when the previous chunk, without
                # look-ahead, ended at the last token: that one could not know the
                # stream ends there and held its tail back, to be re-decoded and blended.
                self._final_planned = True
                if start == total and not self.crossfade:
                    break  # nothing held back: all audio is out
                end = window_end = total
            elif buffering is not None and (end + lookahead > total or buffering[0] > end):
                # It takes what the tokens give: the next chunk waits for more of them.
                planned.append(self._make_chunk(start, *buffering, final=False))
                self._planned_until, self._window_end = buffering
                break
            elif end + lookahead <= total:
                window_end = end + lookahead
            else:
                break
            planned.append(self._make_chunk(start, end, window_end, self._final_planned))
            self._planned_until, self._window_end = end, window_end
        self._pending.extend(planned)
        return planned

    def _buffering_chunk(
        self, start: int, total: int, buffer_s: float | None
    ) -> tuple[int, int] | None:
        """(end, window end) of a chunk that puts the LLM's lead into audio; None when
        the listener has buffer enough, or the tokens give too little.

        The first chunk is never one (it comes after a few tokens anyway), nor is any
        once every token is in (the schedule then plans the rest at once); a chunk is at
        least as long as the crossfade, so that the tail it holds back is its own.
        """
        cfg = self.config
        if buffer_s is None or start == 0 or self._finished:
            return None
        urgent = buffer_s < cfg.min_buffer_s
        if not urgent and buffer_s >= cfg.target_buffer_s:
            return None
        # Never less look-ahead than the first chunk had: exact settings stay exact.
        low = min(cfg.first_lookahead_tokens, self.max_lookahead)
        quality = max(low, min(cfg.buffering_lookahead_tokens, self.max_lookahead))
        if urgent:  # about to run dry: whatever the tokens give
            lookahead = max(low, min(quality, total - start - cfg.min_chunk_tokens))
            shortest = max(1, cfg.min_chunk_tokens // 2, self._crossfade_tokens)
        else:
            lookahead, shortest = quality, max(cfg.min_chunk_tokens, self._crossfade_tokens)
        end = min(start + cfg.max_chunk_tokens, total - lookahead)
        window_end = max(end + lookahead, self._window_end)
        if end - start < shortest or window_end > total:
            return None
        return end, window_end

    def _timed_first_lookahead(self) -> int | None:
        """The first chunk's look-ahead, chosen by time; None: wait for more tokens.

        All the tokens so far once the budget is spent, or once the next token, at
        the rate measured since the first push, would come after it.
        """
        cfg, total = self.config, len(self._tokens)
        if self._finished or total >= cfg.first_chunk_tokens + self.max_lookahead:
            return self.max_lookahead  # more would change nothing
        if total < cfg.first_chunk_tokens or self._first_at is None:
            return None
        assert cfg.first_audio_budget_s is not None
        deadline = self._first_at + cfg.first_audio_budget_s
        if self._last_at < deadline:
            since, later = self._last_at - self._first_at, total - self._first_push
            if since <= 0 or later == 0:
                return None  # no rate yet: the next push tells
            if self._last_at + since / later <= deadline:
                return None
        return total - cfg.first_chunk_tokens

    def _make_chunk(self, start: int, end: int, window_end: int, final: bool) -> PlannedChunk:
        span_start = max(0, start - self._crossfade_tokens) if start else 0
        window_start = max(0, span_start - self.model.receptive_field)
        semantic = torch.tensor(self._tokens[window_start:window_end], dtype=torch.long)
        span = Span(
            semantic,
            self.global_tokens,
            span_start - window_start,
            end - window_start,
            stream=self.stream,
            offset=window_start,
        )
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
