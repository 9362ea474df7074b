"""How many streams this host keeps in real time, measured while it serves.

A fixed stream limit admits as many streams whatever the host sustains; past its
capacity every stream stalls together. So admission asks this model instead, which
reads the streams themselves:

* the LLM's delivered tokens per second, in total and per generating segment. While
  the LLM has room, each segment gets its own peak rate and the total only says the
  capacity is at least that much; once segments get less than their peak, the LLM is
  shared out and the total *is* its capacity;
* the decode worker's tokens per busy second. While it has room this is a lower
  bound (small batches cost more per token than the full ones it runs under load);
  once it is busy nearly all the time, it is what the decoder does;
* per admitted stream, its playback clock: audio sent minus the time since its first
  audio, at 1x. A negative buffer is an underrun: the listener waits, and its clock
  waits with it.

The capacity in streams is the slower of the LLM and the decoder over the tokens per
second of audio (50), with headroom. Before anything is measured it is unknown, and
admission takes a few streams on trust (a cold start); every token received then
teaches the model, which grows with the load it sees until the LLM shows its limit.
Until then the estimate is a lower bound, and admission probes past it one stream at
a time.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

# Segments getting less than this share of their peak rate are being shared out.
SATURATED_SHARE = 0.8
# A decode worker busy this share of the time is the limit: what it decodes is all it can.
DECODER_BUSY_SHARE = 0.8
# Below this share of busy time, tokens per busy second are too few to go by.
DECODER_MEASURED_SHARE = 0.05
# How fast an estimate seen once fades when nothing confirms it: an LLM shared with
# other users, or a decoder given bigger batches, is not what it was a minute ago.
ESTIMATE_HALF_LIFE_S = 60.0


class RateMeter:
    """Amounts per second over a sliding window of recent events.

    Until a window's worth of time has passed since the first event, the rate is over
    the time so far (at least ``MIN_SPAN_S``): a cold start is not diluted by the
    seconds before anything happened.
    """

    MIN_SPAN_S = 0.5

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._events: deque[tuple[float, float]] = deque()
        self._total = 0.0
        self._first: float | None = None

    def start(self, at: float) -> None:
        """Count the time from ``at`` on, though nothing has been added yet."""
        if self._first is None:
            self._first = at

    def add(self, amount: float, at: float) -> None:
        self.start(at)
        self._events.append((at, amount))
        self._total += amount
        self._expire(at)

    def total(self, now: float) -> float:
        """The sum of the amounts within the window."""
        self._expire(now)
        return self._total

    def rate(self, now: float) -> float:
        if self._first is None:
            return 0.0
        span = min(self.window_s, max(self.MIN_SPAN_S, now - self._first))
        return self.total(now) / span

    def _expire(self, now: float) -> None:
        while self._events and self._events[0][0] < now - self.window_s:
            self._total -= self._events.popleft()[1]


class Occupancy:
    """The time-average of a count (segments generating) over a sliding window."""

    def __init__(self, window_s: float) -> None:
        self.count = 0
        self._since = 0.0
        self._area = RateMeter(window_s)  # count x seconds, booked when the count changes

    def change(self, delta: int, at: float) -> None:
        self._area.start(at)
        self._book(at)
        self.count += delta

    def average(self, now: float) -> float:
        self._book(now)
        return self._area.rate(now)

    def _book(self, at: float) -> None:
        if self.count and at > self._since:
            self._area.add(self.count * (at - self._since), at)
        self._since = at


class FadingMax:
    """The highest value seen, fading by half every ``half_life_s`` unless seen again."""

    def __init__(self, half_life_s: float = ESTIMATE_HALF_LIFE_S) -> None:
        self.half_life_s = half_life_s
        self._value: float | None = None
        self._at = 0.0

    def observe(self, value: float, at: float) -> None:
        self.set(max(value, self.value(at) or 0.0), at)

    def set(self, value: float, at: float) -> None:
        self._value, self._at = value, at

    def value(self, now: float) -> float | None:
        if self._value is None:
            return None
        return self._value * math.exp2(-max(0.0, now - self._at) / self.half_life_s)


@dataclass(frozen=True)
class CapacityEstimate:
    """What the model knows now; None where nothing has been measured yet."""

    llm_tokens_per_s: float | None  # what the LLM delivers in total, at least
    llm_saturated: bool  # segments get less than their peak rate: the LLM is the limit
    decoder_tokens_per_s: float | None  # what the decode worker decodes per busy second
    decoder_busy: float  # the share of the time the decode worker was busy, lately
    streams: float | None  # real-time streams the slower of the two keeps, with headroom

    # ``streams`` says only what the host gave so far, not what it can give: every
    # segment alone is fed faster than a stream needs, and the stage that bounds the
    # estimate has not shown its limit (an LLM that shares nothing out, a decoder
    # that is not busy nearly all the time). Admission may probe past it.
    lower_bound: bool = False


class CapacityModel:
    """Measurements in, an estimate of real-time streams out; see the module docstring.

    ``tokens_per_audio_s``: semantic tokens per second of audio (50). ``headroom``:
    the share of extra rate kept above real time for every stream (0.25: each stream
    must be fed at 1.25x real time).
    """

    def __init__(
        self,
        tokens_per_audio_s: float,
        headroom: float,
        window_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tokens_per_audio_s = tokens_per_audio_s
        self.headroom = headroom
        self.clock = clock
        self._llm = RateMeter(window_s)
        self._generating = Occupancy(window_s)
        self._decoded = RateMeter(window_s)
        self._decoder_busy = RateMeter(window_s)
        self._peak_segment_rate = FadingMax()
        self._llm_capacity = FadingMax()
        self._decoder_capacity = FadingMax()

    # -- measurements ---------------------------------------------------------------
    def segment_started(self) -> None:
        """A segment's LLM request began (it will receive tokens until it ends)."""
        now = self.clock()
        self._llm.start(now)  # the LLM's time counts from the request, not its first token
        self._generating.change(+1, now)

    def segment_ended(self) -> None:
        self._generating.change(-1, self.clock())

    def llm_tokens(self, count: int) -> None:
        """``count`` semantic tokens arrived from the LLM, for any stream."""
        now = self.clock()
        self._llm.add(count, now)
        self._update_llm(now)

    def decoded(self, tokens: int, busy_s: float) -> None:
        """The decode worker decoded ``tokens`` tokens of audio in ``busy_s`` seconds."""
        now = self.clock()
        for meter in (self._decoded, self._decoder_busy):
            meter.start(now - busy_s)  # the batch began that long ago
        self._decoded.add(tokens, now)
        self._decoder_busy.add(busy_s, now)
        busy = self._decoder_busy.rate(now)
        if busy < DECODER_MEASURED_SHARE:
            return
        per_busy_s = self._decoded.rate(now) / min(1.0, busy)
        if busy >= DECODER_BUSY_SHARE:
            self._decoder_capacity.set(per_busy_s, now)  # at its limit: this is all it does
        else:
            self._decoder_capacity.observe(per_busy_s, now)  # at least this much

    # -- the estimate ---------------------------------------------------------------
    def estimate(self) -> CapacityEstimate:
        now = self.clock()
        self._update_llm(now)
        llm, decoder = self._llm_capacity.value(now), self._decoder_capacity.value(now)
        known = [rate for rate in (llm, decoder) if rate is not None]
        streams = None
        if llm is not None:  # the LLM is what a stream needs first
            streams = min(known) / (self.tokens_per_audio_s * (1 + self.headroom))
        busy = min(1.0, self._decoder_busy.rate(now))
        saturated = self._saturated(self._llm.rate(now), self._generating.average(now), now)
        lower_bound = False
        peak = self._peak_segment_rate.value(now)
        if llm is not None and peak is not None:
            if peak >= self.tokens_per_audio_s * (1 + self.headroom):
                decoder_bounds = decoder is not None and decoder < llm
                lower_bound = busy < DECODER_BUSY_SHARE if decoder_bounds else not saturated
        return CapacityEstimate(llm, saturated, decoder, busy, streams, lower_bound)

    def _saturated(self, total: float, segments: float, now: float) -> bool:
        """Segments (``segments`` on average, ``total`` tokens/s in all) get less than
        their peak rate: the LLM is shared out."""
        peak = self._peak_segment_rate.value(now)
        if segments < 1.5 or not peak:
            return False  # one segment alone shares nothing
        return total / segments < SATURATED_SHARE * peak

    def _update_llm(self, now: float) -> None:
        segments = self._generating.average(now)
        total = self._llm.rate(now)
        if segments < 0.1 or total <= 0:
            return
        self._peak_segment_rate.observe(total / segments, now)
        if self._saturated(total, segments, now):
            self._llm_capacity.set(total, now)  # shared out: this is all it gives
        else:
            self._llm_capacity.observe(total, now)  # at least this much


class PlaybackClock:
    """A listener's clock for one stream: it plays at 1x from the first audio on and
    waits, without skipping, whenever the audio sent runs out (an underrun)."""

    # A shortfall below this is jitter that any player's buffer absorbs, not a stall.
    TOLERANCE_S = 0.02

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.started_at: float | None = None
        self.sent_s = 0.0
        self.underruns = 0
        self.underrun_s = 0.0

    def sent(self, seconds: float) -> None:
        """``seconds`` of audio were handed to the client now."""
        now = self.clock()
        if self.started_at is None:
            self.started_at = now
        else:
            shortfall = (now - self.started_at) - self.sent_s
            if shortfall > self.TOLERANCE_S:
                self.underruns += 1
                self.underrun_s += shortfall
                self.started_at += shortfall  # the listener waited that long
        self.sent_s += seconds

    def buffer_ahead(self) -> float | None:
        """Seconds of audio sent and not yet played; None before the first audio."""
        if self.started_at is None:
            return None
        return self.sent_s - (self.clock() - self.started_at)

    def playing_for(self) -> float:
        return 0.0 if self.started_at is None else self.clock() - self.started_at
