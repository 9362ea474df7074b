"""Uploaded reference clips (voice cloning) -> mono float32 audio.

A clip arrives either as raw bytes (a multipart ``audio_sample`` upload) or as a
``data:audio/...;base64,`` URL (vLLM-Omni's ``ref_audio`` field). Both come from
untrusted clients, so every way a clip can be wrong ends in a typed 4xx error naming
the request field, never in a traceback, and the work done on a clip is bounded: the
byte size is checked before anything is decoded, decoding stops as soon as the clip is
longer than allowed, and only plain audio container formats are demuxed (a playlist or
concat file could otherwise make FFmpeg open other files or URLs).

Decoding is blocking CPU work; the gateway runs it in a worker thread.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
from dataclasses import dataclass

import av
import numpy as np

from decoder_gateway.errors import (
    AudioTooLong,
    AudioTooShort,
    GatewayError,
    InvalidAudio,
    RequestTooLarge,
    SilentAudio,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_MIN_SECONDS = 0.5
DEFAULT_MAX_SECONDS = 60.0
SILENCE_PEAK = 1e-4  # a peak below this (about -80 dBFS) is digital silence

# FFmpeg demuxers a clip may use. Everything else (hls, concat, image2, subtitle and
# text formats, ...) is refused before its header is read: some of them open further
# files or URLs named inside the upload.
ALLOWED_DEMUXERS = (
    "wav",
    "w64",
    "flac",
    "mp3",
    "ogg",
    "mov",  # mov,mp4,m4a,3gp,3g2,mj2: m4a/aac, mp4
    "matroska",  # matroska,webm
    "aac",  # raw ADTS
    "aiff",
    "caf",
    "au",
)
SUPPORTED_FORMATS_TEXT = "wav, flac, mp3, ogg/opus, m4a/aac, webm/opus"
MIN_SAMPLE_RATE = 2_000
MAX_SAMPLE_RATE = 768_000

# Media types a data URL may declare. Browsers label audio-only recordings video/webm
# or video/mp4 at times, and some clients send no type or a generic one.
_DATA_URL_TYPES = ("audio/", "video/")
_DATA_URL_GENERIC = ("", "application/octet-stream", "application/ogg")


@dataclass(frozen=True)
class Clip:
    """A decoded clip: the first channel as float32 in [-1, 1] at its own sample rate."""

    samples: np.ndarray
    sample_rate: int
    duration_s: float


def decode_clip(
    data: bytes | bytearray | memoryview,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    min_seconds: float = DEFAULT_MIN_SECONDS,
    max_seconds: float = DEFAULT_MAX_SECONDS,
    param: str = "audio_sample",
) -> Clip:
    """Decode an uploaded clip to mono float32 (its first channel), at its own rate.

    Raises ``RequestTooLarge`` (413) over ``max_bytes``; ``InvalidAudio`` (400) for
    empty bytes, a file that is not audio or does not decode, or one without an audio
    stream; ``SilentAudio`` for digital silence; ``AudioTooShort`` / ``AudioTooLong``
    outside [min_seconds, max_seconds]. Every error carries ``param``.
    """
    size = len(data)
    if size > max_bytes:
        raise RequestTooLarge(
            f"{param} is {size} bytes, over the limit of {max_bytes} bytes", param
        )
    if size == 0:
        raise InvalidAudio(f"{param} is empty", param)
    try:
        samples, rate, declared_s = _decode(bytes(data), max_seconds, param)
    except GatewayError:
        raise
    except Exception as err:  # whatever FFmpeg or PyAV raise on a hostile file
        log.debug("clip does not decode: %r", err)
        raise InvalidAudio(
            f"{param} could not be decoded as audio ({_reason(err)}); "
            f"supported formats: {SUPPORTED_FORMATS_TEXT}",
            param,
        ) from None

    duration_s = samples.size / rate
    if duration_s > max_seconds:
        declared = f"; the file declares {declared_s:.1f} s" if declared_s else ""
        raise AudioTooLong(
            f"{param} is longer than {max_seconds:g} s (decoding stopped after "
            f"{duration_s:.2f} s{declared})",
            param,
        )
    if samples.size == 0:
        raise InvalidAudio(f"{param} holds no audio samples", param)
    if duration_s < min_seconds:
        raise AudioTooShort(
            f"{param} is {duration_s:.2f} s long, shorter than the minimum of {min_seconds:g} s",
            param,
        )
    peak = float(np.max(np.abs(samples)))
    if peak < SILENCE_PEAK:
        raise SilentAudio(
            f"{param} is silent (peak level {peak:.1e}); record the speaker's voice", param
        )
    return Clip(samples=samples, sample_rate=rate, duration_s=duration_s)


def decode_data_url(
    url: str,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    min_seconds: float = DEFAULT_MIN_SECONDS,
    max_seconds: float = DEFAULT_MAX_SECONDS,
    param: str = "ref_audio",
) -> Clip:
    """Decode a ``data:audio/<type>;base64,<payload>`` URL (vLLM-Omni's ``ref_audio``).

    The scheme, media type and base64 are checked first; the size limit applies to the
    decoded bytes, and an oversized payload is refused from its length alone, before it
    is decoded. Then the bytes go through ``decode_clip``.
    """
    if not isinstance(url, str):
        raise InvalidAudio(f"{param} must be a string data URL", param)
    head, comma, payload = url.partition(",")
    if not head[:5].lower() == "data:" or not comma:
        shown = url[:32] + ("..." if len(url) > 32 else "")
        raise InvalidAudio(
            f"{param} must be a data URL (data:audio/wav;base64,...), got {shown!r}", param
        )
    parts = [p.strip().lower() for p in head[5:].split(";")]
    media_type, flags = parts[0], parts[1:]
    if "base64" not in flags:
        raise InvalidAudio(f"{param} must be a base64 data URL (data:audio/wav;base64,...)", param)
    if not (media_type.startswith(_DATA_URL_TYPES) or media_type in _DATA_URL_GENERIC):
        raise InvalidAudio(
            f"{param} has media type {media_type!r}; expected an audio type such as audio/wav",
            param,
        )
    # Refuse a too-large payload from its length: 4 base64 characters carry 3 bytes.
    if len(payload) // 4 * 3 > max_bytes + 3 * 1024:
        raise RequestTooLarge(
            f"{param} holds about {len(payload) // 4 * 3} bytes, over the limit of "
            f"{max_bytes} bytes",
            param,
        )
    compact = "".join(payload.split())  # line-wrapped base64 is common
    try:
        data = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidAudio(f"{param} is not valid base64", param) from None
    return decode_clip(
        data, max_bytes=max_bytes, min_seconds=min_seconds, max_seconds=max_seconds, param=param
    )


def _decode(data: bytes, max_seconds: float, param: str) -> tuple[np.ndarray, int, float | None]:
    """Decode the first audio stream's first channel, stopping once past ``max_seconds``.

    Returns the samples, the sample rate and the duration the file declares (None where
    it declares none), which makes the "too long" message useful when decoding stopped.
    """
    try:
        container = av.open(
            io.BytesIO(data),
            container_options={"format_whitelist": ",".join(ALLOWED_DEMUXERS)},
            metadata_errors="ignore",
        )
    except av.error.FFmpegError as err:
        # FFmpeg's reason ("Invalid data", "Invalid argument" for a refused demuxer)
        # means nothing to a client; the supported formats do.
        log.debug("clip does not open: %r", err)
        raise InvalidAudio(
            f"{param} is not a supported audio file; supported formats: {SUPPORTED_FORMATS_TEXT}",
            param,
        ) from None
    with container:
        if not container.streams.audio:
            raise InvalidAudio(f"{param} has no audio stream", param)
        stream = container.streams.audio[0]
        declared_s = _declared_seconds(container, stream)
        chunks: list[np.ndarray] = []
        total = 0
        rate = 0
        limit = None
        for frame in container.decode(stream):
            if frame.samples == 0:
                continue
            if rate == 0:
                rate = int(frame.sample_rate)
                if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
                    raise InvalidAudio(f"{param} has an unusable sample rate of {rate} Hz", param)
                limit = int(max_seconds * rate)
            elif frame.sample_rate != rate:
                raise InvalidAudio(
                    f"{param} changes its sample rate mid-stream ({rate} -> "
                    f"{frame.sample_rate} Hz)",
                    param,
                )
            channel = _first_channel(frame)
            chunks.append(channel)
            total += channel.size
            if limit is not None and total > limit:
                break  # too long: the caller reports it without decoding the rest
    if rate == 0:
        raise InvalidAudio(f"{param} holds no audio samples", param)
    samples = np.concatenate(chunks) if len(chunks) > 1 else chunks[0]
    samples = np.nan_to_num(samples, nan=0.0, posinf=1.0, neginf=-1.0)
    np.clip(samples, -1.0, 1.0, out=samples)
    return samples, rate, declared_s


def _first_channel(frame: av.AudioFrame) -> np.ndarray:
    """The frame's first channel as float32, scaled from whatever sample format it has."""
    array = frame.to_ndarray()
    fmt = frame.format
    if fmt.is_planar:
        channel = array[0]
    else:  # packed: one row, channels interleaved
        channels = frame.layout.nb_channels
        channel = array.reshape(-1)[::channels]
    name = fmt.name.rstrip("p")
    if name == "u8":
        return ((channel.astype(np.float32) - 128.0) / 128.0).astype(np.float32)
    if name in ("s16", "s32", "s64"):
        scale = float(2 ** (int(name[1:]) - 1))
        return (channel.astype(np.float64) / scale).astype(np.float32)
    return channel.astype(np.float32, copy=True)  # flt, dbl


def _declared_seconds(
    container: av.container.InputContainer, stream: av.AudioStream
) -> float | None:
    """The duration the file's header declares, if any (may be wrong: only for messages)."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def _reason(err: BaseException) -> str:
    """A short, path-free description of a decoder error for the client."""
    text = getattr(err, "strerror", None) or str(err) or type(err).__name__
    return str(text).split(":")[0].strip()[:120]
