"""A stream's settled decode state, carried by its spans from one chunk to the next.

Apart from :mod:`.incremental`, which advances it, so that :class:`~.spans.Span`
can name it without an import cycle.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from decoder_gateway.codec.model.bicodec import BiCodecDecoder


@dataclass(frozen=True)
class Stretch:
    """Positions ``[start, start + length)`` of a sequence; time is the last axis."""

    data: Tensor  # (1, C, L) activations or (1, L) token ids
    start: int

    @property
    def end(self) -> int:
        return self.start + self.data.shape[-1]


def take(parts: Sequence[Stretch | None], lo: int, hi: int) -> Tensor:
    """Positions ``[lo, hi)`` (non-empty) gathered from ``parts``, in order of position."""
    pieces, at = [], lo
    for part in parts:
        if part is None or at >= hi or not part.start <= at < part.end:
            continue
        stop = min(hi, part.end)
        pieces.append(part.data[..., at - part.start : stop - part.start])
        at = stop
    if at < hi or not pieces:
        raise RuntimeError(f"stream state lacks positions [{at}, {hi})")
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)


@dataclass(frozen=True)
class StageState:
    """How far a stage has settled, and the settled inputs its next outputs read."""

    n_in: int = 0  # inputs settled
    n_out: int = 0  # outputs settled
    kept: Stretch | None = None  # inputs [from, n_in) that outputs n_out and later read


@dataclass(frozen=True)
class StreamState:
    """A stream's state between spans: replaced whole, once a batch has decoded."""

    fed: int  # tokens advanced through the stages
    stages: tuple[StageState, ...]
    audio: Stretch | None  # settled samples from `audio_from` on (ends at the last n_out)
    audio_from: int  # no span asks for samples before this one any more


class DecodeStream:
    """One stream's settled decode state, advanced by the spans that carry it.

    A :class:`~.streaming.StreamingSession` makes one and attaches it to the spans it
    plans. The spans must be decoded in the order planned, each at most once; they
    may share a batch with each other (they then run one after the other) and with
    any other spans. ``keep_tokens`` is how far a span may reach back before the end
    of the one before (the crossfade); the settled samples from there on are kept.
    """

    def __init__(self, model: BiCodecDecoder, global_tokens: Tensor, keep_tokens: int) -> None:
        self.model = model
        self.global_tokens = global_tokens
        self.keep_tokens = keep_tokens
        self.state = StreamState(0, (), None, 0)
        self._cond: Tensor | None = None

    def cond(self) -> Tensor:
        """The speaker d-vector (1, D), computed once."""
        if self._cond is None:
            tokens = self.global_tokens.to(self.model.device).unsqueeze(0)
            self._cond = self.model.speaker_d_vector(tokens)
        return self._cond
