"""The serving layer: one place that turns a request into events.

``speech``: validation and the stream of a request; ``admission``: slots and
accounting; ``scheduler``: segments ahead of playback, in order; ``segment``: one
segment's LLM -> codec loop; ``events``: what transports adapt to their wire;
``utterance`` and ``text_in``: text streamed in, sessions of utterances in order.
"""

from decoder_gateway.serving.events import Audio, SegmentEnd, SegmentStart, SpeechEvent
from decoder_gateway.serving.job import SpeechJob, new_request_id
from decoder_gateway.serving.speech import SpeechService, SpeechStream

__all__ = [
    "Audio",
    "SegmentEnd",
    "SegmentStart",
    "SpeechEvent",
    "SpeechJob",
    "SpeechService",
    "SpeechStream",
    "new_request_id",
]
