"""Admission and accounting of a request: a stream slot, metrics and log lines.

:class:`Admission` brackets one synthesis, which outlives the call that starts it
(a stream is returned to its transport): :meth:`Admission.admit` takes a slot when
the measured capacity (:mod:`.capacity`) keeps every admitted stream in real time,
waits for one in a short bounded queue otherwise, and refuses past it
(``Overloaded`` with a retry hint, at once past ``MAX_CONCURRENT_STREAMS``;
``ShuttingDown`` while draining). :meth:`Admission.finish`, called by the stream
however it ends, releases the slot and records how the request ended: the stream
running out (completed), a typed error, a client that stopped reading (slow_client)
or one that went away, and how long its listener waited for audio (underruns).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from dataclasses import dataclass

from decoder_gateway.errors import (
    CancelledByClient,
    ClientGone,
    GatewayError,
    Overloaded,
    ShuttingDown,
    SlowClient,
)
from decoder_gateway.metrics import Metrics
from decoder_gateway.serving.capacity import CapacityModel, PlaybackClock

logger = logging.getLogger(__name__)

COMPLETED, ERROR, SLOW_CLIENT, DISCONNECTED, REJECTED, CANCELLED = (
    "completed",
    "error",
    "slow_client",
    "client_disconnected",
    "rejected",
    "cancelled",
)


@dataclass(frozen=True)
class AdmissionPolicy:
    """How streams are admitted (the ADMISSION_* settings)."""

    limit: int  # MAX_CONCURRENT_STREAMS: a hard ceiling, refused at once past it
    by_capacity: bool = True  # ADMISSION_CONTROL: admit by measured capacity
    queue_s: float = 2.0  # how long a request may wait for capacity before it is refused
    cold_streams: int = 4  # streams admitted on trust before anything is measured
    margin_s: float = 0.3  # buffer ahead that every admitted stream must keep

    @property
    def retry_after_s(self) -> int:
        """What a refusal suggests to wait before retrying: about one queue's wait."""
        return max(1, math.ceil(self.queue_s))


class StreamSlots:
    """The admitted streams, and the decision to admit one more (see the module doc).

    Waiting requests are served first come, first served: only the oldest is admitted
    when capacity frees up, so a burst cannot overtake a request queued before it.
    """

    POLL_S = 0.05  # how often a queued request looks at the capacity again
    # While the estimate is only a lower bound, one stream past it is let in this
    # often: long enough for the rates it changes to show in the measurements.
    PROBE_INTERVAL_S = 0.5

    def __init__(self, policy: AdmissionPolicy, capacity: CapacityModel) -> None:
        self.policy = policy
        self.capacity = capacity
        self.draining = False  # set once at shutdown: nothing new starts
        self._streams: set[PlaybackClock] = set()
        self._queue: deque[object] = deque()
        self._probed_at = -math.inf  # when a stream was last let in past the estimate

    @property
    def limit(self) -> int:
        return self.policy.limit

    @property
    def active(self) -> int:
        return len(self._streams)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def lowest_buffer(self) -> float | None:
        """The least audio ahead of its listener among the streams playing (seconds)."""
        buffers = [b for s in self._streams if (b := s.buffer_ahead()) is not None]
        return min(buffers, default=None)

    async def acquire(self, stream: PlaybackClock) -> float:
        """Admit ``stream``, at once or after a wait; the seconds it waited.

        Raises ShuttingDown while draining, Overloaded past the hard limit, when the
        queue is full, or when no capacity freed up within the queue's wait.
        """
        self._check_open()
        if not self._queue and self._admissible():
            self._streams.add(stream)
            return 0.0
        if self.policy.queue_s <= 0 or len(self._queue) >= self.policy.limit:
            raise self._refusal()
        ticket, started = object(), time.monotonic()
        self._queue.append(ticket)
        try:
            deadline = started + self.policy.queue_s
            while True:
                await asyncio.sleep(self.POLL_S)
                self._check_open()
                now = time.monotonic()
                if self._queue[0] is ticket and self._admissible():
                    self._streams.add(stream)
                    return now - started
                if now >= deadline:
                    raise self._refusal()
        finally:
            self._queue.remove(ticket)

    def release(self, stream: PlaybackClock) -> None:
        self._streams.discard(stream)

    def _check_open(self) -> None:
        if self.draining:
            raise ShuttingDown("the server is shutting down; retry on another instance")
        if len(self._streams) >= self.policy.limit:
            raise Overloaded(
                f"the server is at its limit of {self.policy.limit} concurrent streams",
                retry_after=self.policy.retry_after_s,
            )

    def _admissible(self) -> bool:
        active = len(self._streams)
        if active >= self.policy.limit:
            return False
        if not self.policy.by_capacity or active == 0:
            return True  # a lone stream is served as well as the host can
        estimate = self.capacity.estimate()
        streams = estimate.streams
        if streams is None:
            return active < self.policy.cold_streams
        probe = False
        if active + 1 > streams:
            # Past a lower bound (an LLM that has not shown its limit), one probe at a
            # time; past a measured limit, never.
            now = time.monotonic()
            if not estimate.lower_bound or now - self._probed_at < self.PROBE_INTERVAL_S:
                return False
            probe = True
        # The estimate may lag a change of the host: a stream that already runs short
        # of audio says so first.
        margin = self.policy.margin_s
        if not probe:
            return all(
                stream.playing_for() < 1.0 or (stream.buffer_ahead() or 0.0) >= margin
                for stream in self._streams
            )
        # A probe asks more: every stream has played for a second and kept its margin.
        # One in its first second, or still waiting for its first audio (in vLLM's
        # queue, say), proves nothing yet.
        proven = all(
            stream.playing_for() >= 1.0 and (stream.buffer_ahead() or 0.0) >= margin
            for stream in self._streams
        )
        if proven:
            self._probed_at = time.monotonic()
        return proven

    def _refusal(self) -> Overloaded:
        estimate = self.capacity.estimate().streams
        known = "" if estimate is None else f" (about {estimate:.0f} in real time)"
        return Overloaded(
            f"the server is at its capacity of streams{known}; retry shortly",
            retry_after=self.policy.retry_after_s,
        )


def outcome_of(error: BaseException | None, completed: bool) -> str:
    """The metrics label of a request that ended with ``error`` (None: no error)."""
    if isinstance(error, SlowClient):
        return SLOW_CLIENT
    if isinstance(error, ClientGone):
        return DISCONNECTED
    if isinstance(error, CancelledByClient):  # a barge-in: the connection stays
        return CANCELLED
    if isinstance(error, Exception):  # typed or not: the transport sent an explicit error
        return ERROR
    # No error, or the transport's task was cancelled (GeneratorExit, CancelledError):
    # a request that did not run to its end was left by its client.
    return COMPLETED if completed else DISCONNECTED


class Admission:
    """One request's slot and accounting; see the module docstring."""

    def __init__(
        self,
        slots: StreamSlots,
        metrics: Metrics,
        request_id: str,
        endpoint: str,
        sample_rate: int,
        accepted_at: float,
    ) -> None:
        self.slots = slots
        self.metrics = metrics
        self.request_id = request_id
        self.endpoint = endpoint
        self.sample_rate = sample_rate
        self.accepted_at = accepted_at
        self.samples = 0
        self.completed = False
        self.playback = PlaybackClock()
        self._entered = False

    def audio(self, samples: int) -> None:
        """Count audio handed to the transport."""
        if self.samples == 0 and samples:
            self.metrics.time_to_first_audio.labels(self.endpoint).observe(
                time.monotonic() - self.accepted_at
            )
        self.samples += samples
        if samples:
            self.playback.sent(samples / self.sample_rate)

    async def admit(self) -> None:
        """Take a slot, maybe after a wait, or raise (Overloaded, ShuttingDown) and
        count the refusal."""
        metrics = self.metrics
        try:
            waited = await self.slots.acquire(self.playback)
        except (Overloaded, ShuttingDown):
            metrics.requests.labels(self.endpoint, REJECTED).inc()
            metrics.admissions.labels("refused").inc()
            raise
        # "queued": admitted after a wait for capacity; refusals count under "refused".
        metrics.admissions.labels("queued" if waited > 0 else "admitted").inc()
        metrics.admission_wait_seconds.observe(waited)
        self._entered = True
        metrics.active_streams.inc()

    def finish(self, error: BaseException | None) -> None:
        """Release the slot and record the outcome; only the first call counts."""
        if not self._entered:
            return
        self._entered = False
        self.slots.release(self.playback)
        metrics = self.metrics
        metrics.active_streams.dec()
        outcome = outcome_of(error, self.completed)
        metrics.requests.labels(self.endpoint, outcome).inc()
        playback = self.playback
        if playback.started_at is not None:
            metrics.stream_underruns.labels(self.endpoint).inc(playback.underruns)
            metrics.stream_underrun_seconds.labels(self.endpoint).observe(playback.underrun_s)
        seconds = self.samples / self.sample_rate
        metrics.audio_seconds.labels(self.endpoint).inc(seconds)
        wall = time.monotonic() - self.accepted_at
        if outcome == COMPLETED and seconds > 0:
            metrics.real_time_factor.labels(self.endpoint).observe(wall / seconds)
        if outcome in (DISCONNECTED, SLOW_CLIENT):
            metrics.client_disconnects.labels(self.endpoint).inc()
        log = {"request_id": self.request_id, "endpoint": self.endpoint, "outcome": outcome}
        if isinstance(error, GatewayError) and outcome == ERROR:
            logger.warning("request %s failed: %s", self.request_id, error.message, extra=log)
        elif outcome == SLOW_CLIENT:
            logger.warning("request %s cut off: %s", self.request_id, error, extra=log)
        logger.info(
            "request %s: %s, %.2f s of audio in %.2f s",
            self.request_id,
            outcome,
            seconds,
            wall,
            extra=log,
        )
