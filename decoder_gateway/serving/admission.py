"""Admission and accounting of a request: a stream slot, metrics and log lines.

:class:`Admission` brackets one synthesis, which outlives the call that starts it
(a stream is returned to its transport): :meth:`Admission.admit` takes a slot
(``Overloaded`` past ``MAX_CONCURRENT_STREAMS``, ``ShuttingDown`` while draining:
refused, never queued); :meth:`Admission.finish`, called by the stream however it
ends, releases it and records how the request ended. The outcome comes from what
ended it: the stream running out (completed), a typed error, a client that stopped
reading (slow_client) or one that went away.
"""

from __future__ import annotations

import logging
import time

from decoder_gateway.errors import ClientGone, GatewayError, Overloaded, ShuttingDown, SlowClient
from decoder_gateway.metrics import Metrics

logger = logging.getLogger(__name__)

COMPLETED, ERROR, SLOW_CLIENT, DISCONNECTED, REJECTED = (
    "completed",
    "error",
    "slow_client",
    "client_disconnected",
    "rejected",
)


class StreamSlots:
    """Counts active syntheses; refuses, never queues, past the limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0
        self.draining = False  # set once at shutdown: nothing new starts

    def acquire(self) -> None:
        if self.draining:
            raise ShuttingDown("the server is shutting down; retry on another instance")
        if self.active >= self.limit:
            raise Overloaded(f"the server is at its limit of {self.limit} concurrent streams")
        self.active += 1

    def release(self) -> None:
        self.active -= 1


def outcome_of(error: BaseException | None, completed: bool) -> str:
    """The metrics label of a request that ended with ``error`` (None: no error)."""
    if isinstance(error, SlowClient):
        return SLOW_CLIENT
    if isinstance(error, ClientGone):
        return DISCONNECTED
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
        self._entered = False

    def audio(self, samples: int) -> None:
        """Count audio handed to the transport."""
        if self.samples == 0 and samples:
            self.metrics.time_to_first_audio.labels(self.endpoint).observe(
                time.monotonic() - self.accepted_at
            )
        self.samples += samples

    def admit(self) -> None:
        """Take a slot, or raise (Overloaded, ShuttingDown) and count the refusal."""
        try:
            self.slots.acquire()
        except (Overloaded, ShuttingDown):
            self.metrics.requests.labels(self.endpoint, REJECTED).inc()
            raise
        self._entered = True
        self.metrics.active_streams.inc()

    def finish(self, error: BaseException | None) -> None:
        """Release the slot and record the outcome; only the first call counts."""
        if not self._entered:
            return
        self._entered = False
        self.slots.release()
        metrics = self.metrics
        metrics.active_streams.dec()
        outcome = outcome_of(error, self.completed)
        metrics.requests.labels(self.endpoint, outcome).inc()
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
