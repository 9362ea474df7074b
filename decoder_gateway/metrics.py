"""Prometheus metrics of the gateway (``GET /metrics``).

One registry per app, so several apps in one process (tests) never collide.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0)
_RTF_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "tts_requests",
            "Synthesis requests by endpoint and outcome "
            "(completed, error, slow_client, client_disconnected, rejected).",
            ["endpoint", "outcome"],
            registry=r,
        )
        self.active_streams = Gauge("tts_active_streams", "Syntheses in progress.", registry=r)
        self.time_to_first_audio = Histogram(
            "tts_time_to_first_audio_seconds",
            "From an accepted request to its first audio chunk.",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.real_time_factor = Histogram(
            "tts_real_time_factor",
            "Wall time of a completed request over the duration of its audio.",
            ["endpoint"],
            buckets=_RTF_BUCKETS,
            registry=r,
        )
        self.audio_seconds = Counter(
            "tts_audio_seconds", "Seconds of audio delivered.", ["endpoint"], registry=r
        )
        self.llm_tokens_per_second = Histogram(
            "tts_llm_semantic_tokens_per_second",
            "Semantic tokens per second that vLLM wrote for one segment (after its first token).",
            buckets=(25, 50, 75, 100, 150, 200, 300, 500, 1000, 2000),
            registry=r,
        )
        self.llm_semantic_tokens = Counter(
            "tts_llm_semantic_tokens", "Semantic tokens received from vLLM.", registry=r
        )
        self.upstream_errors = Counter(
            "tts_upstream_errors",
            "Failed upstream (vLLM) requests by error code.",
            ["code"],
            registry=r,
        )
        self.upstream_aborts = Counter(
            "tts_upstream_aborted",
            "Upstream requests closed before they finished (client gone, failure elsewhere).",
            registry=r,
        )
        self.client_disconnects = Counter(
            "tts_client_disconnects",
            "Clients that left before their audio was complete.",
            ["endpoint"],
            registry=r,
        )
        self.decoder_batch_size = Histogram(
            "tts_decoder_batch_spans",
            "Spans (chunks of any stream) decoded in one forward pass.",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.voice_clone_seconds = Histogram(
            "tts_voice_clone_seconds",
            "Speaker encoder time of one clip (resampling, normalisation, network).",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=r,
        )
        self.decoder_failures = Counter(
            "tts_decoder_failures",
            "Decoder batches that raised (each fails the streams in it with decoder_error).",
            registry=r,
        )
        self.decoder_batch_seconds = Histogram(
            "tts_decoder_batch_seconds",
            "Time of one decoder forward pass.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=r,
        )

        self.admissions = Counter(
            "tts_admissions",
            "Admission decisions: admitted (at once), queued (admitted after a wait for "
            "capacity), refused (429/503).",
            ["decision"],
            registry=r,
        )
        self.admission_wait_seconds = Histogram(
            "tts_admission_wait_seconds",
            "Time an admitted request waited in the admission queue.",
            buckets=(0.0, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0),
            registry=r,
        )
        self.stream_underruns = Counter(
            "tts_stream_underruns",
            "Times a listener playing at 1x from the first audio ran out of audio.",
            ["endpoint"],
            registry=r,
        )
        self.stream_underrun_seconds = Histogram(
            "tts_stream_underrun_seconds",
            "Per finished stream: seconds its listener waited for audio after the first.",
            ["endpoint"],
            buckets=(0.0, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=r,
        )
        # Read when scraped (see watch_admission): always the current values.
        self.buffer_ahead_seconds = Gauge(
            "tts_stream_buffer_ahead_seconds",
            "The least audio ahead of its listener among the streams playing.",
            registry=r,
        )
        self.admission_queue = Gauge(
            "tts_admission_queue", "Requests waiting for capacity.", registry=r
        )
        self.capacity_streams = Gauge(
            "tts_capacity_streams",
            "Real-time streams the host keeps, as measured (0 until measured).",
            registry=r,
        )
        self.capacity_tokens_per_second = Gauge(
            "tts_capacity_tokens_per_second",
            "Semantic tokens per second the LLM delivers in total and the decoder decodes "
            "per busy second, as measured (0 until measured).",
            ["stage"],
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
