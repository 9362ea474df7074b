"""Error types of the pipeline. Transports map them to HTTP statuses / WS error frames
in one place (``api/errors.py``), by their ``status`` and message."""

from __future__ import annotations


class GatewayError(Exception):
    """Base: carries the HTTP status a transport should answer with."""

    status: int = 500
    code: str = "internal_error"
    retry_after: int | None = None  # seconds after which a retry may succeed, where known

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param  # the request field at fault, where there is one


class InvalidRequest(GatewayError):
    status, code = 400, "invalid_request"


class VoiceNotFound(InvalidRequest):
    code = "voice_not_found"


class InvalidAudio(InvalidRequest):
    """The clip is empty, not audio, or cannot be decoded."""

    code = "invalid_audio"


class SilentAudio(InvalidAudio):
    """The clip decodes but holds only digital silence: nothing to clone a voice from."""

    code = "silent_audio"


class AudioTooShort(InvalidAudio):
    """The clip is shorter than the minimum a speaker embedding needs."""

    code = "audio_too_short"


class AudioTooLong(InvalidAudio):
    """The clip is longer than allowed (decoding stops there)."""

    code = "audio_too_long"


class VoiceExists(InvalidRequest):
    """The name is taken: by a packaged voice or by a cloned voice already stored."""

    status, code = 409, "voice_exists"


class VoiceStorageError(GatewayError):
    """The voice folder cannot be written (disk full, read-only volume, permissions)."""

    status, code = 500, "voice_storage_error"


class VoiceCloningUnavailable(GatewayError):
    """The checkpoint has no speaker encoder: packaged voices only."""

    status, code = 501, "cloning_unavailable"


class VoiceDesignUnavailable(GatewayError):
    """VOICE_DESIGN is off: the model served was not trained to design voices."""

    status, code = 501, "voice_design_unavailable"


class NoSuchVoice(VoiceNotFound):
    """A path names a cloned voice that is not in the library (GET / DELETE)."""

    status = 404


class Overloaded(GatewayError):
    """No capacity for another stream now; ``retry_after`` (seconds) says when to retry."""

    status, code = 429, "too_many_streams"

    def __init__(self, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ShuttingDown(GatewayError):
    """The gateway is draining for a shutdown: running syntheses finish, new ones go
    elsewhere (so that a WebSocket session cannot keep a draining pod alive)."""

    status, code = 503, "shutting_down"
    retry_after = 1  # on another instance, which the load balancer picks


class RequestTooLarge(InvalidRequest):
    """The HTTP body is over MAX_REQUEST_BODY_BYTES."""

    status, code = 413, "request_too_large"


class SlowClient(GatewayError):
    """A send to the client did not complete within SLOW_CLIENT_TIMEOUT_S: the client
    stopped reading (its receive window closed) and its request is cut off."""

    status, code = 408, "client_too_slow"


class ClientGone(GatewayError):
    """The client went away (closed the connection) before its audio was complete."""

    status, code = 499, "client_closed_request"


class CancelledByClient(GatewayError):
    """The client cancelled the synthesis on its connection (a barge-in), which stays
    open: its upstream requests are aborted and its slot freed, and the client is sent
    what it was sent of the audio, not an error."""

    status, code = 499, "cancelled"


class UpstreamUnavailable(GatewayError):
    """vLLM cannot be reached (connection refused, timeout) or is not ready."""

    status, code = 503, "llm_unavailable"


class UpstreamError(GatewayError):
    """vLLM answered with an error, or broke off the stream."""

    status, code = 502, "llm_error"


class VoiceDesignFailed(UpstreamError):
    """A design generation did not write exactly 32 global tokens (and speech), even on
    its retry: no voice is made up from a wrong count."""

    code = "voice_design_failed"


class NoAudioGenerated(GatewayError):
    """The model finished a segment without writing any semantic token."""

    status, code = 502, "no_audio_generated"


class DecoderError(GatewayError):
    """The audio decoder failed (CUDA out of memory, anything torch raises), or its
    worker has stopped."""

    status, code = 500, "decoder_error"


class InternalError(GatewayError):
    """Any other unexpected failure: a bug, reported as an explicit error, never silence."""

    status, code = 500, "internal_error"


class StreamAborted(Exception):
    """Raised into the server to abort a response whose status was already sent.

    The client then sees an incomplete body (no chunked terminator), never a short
    clean file. Not a GatewayError on purpose: no handler may turn it into a response,
    and the log filter in ``logs.py`` reduces it to one line.
    """
