"""Streaming audio encoders: float chunks in as they are synthesized, file bytes out.

One :class:`AudioPipeline` per response. Each chunk of model audio (float32, mono,
at the decoder's 16 kHz) goes through

1. an optional time-stretch (``speed != 1``): FFmpeg's ``atempo`` filter through
   PyAV's filter graph, which changes tempo without changing pitch. ``atempo``
   takes 0.5 .. 2 per stage, so wider factors are a chain of stages
   (0.25 = 0.5 x 0.5, 4 = 2 x 2). ``speed == 1`` skips the filter: an exact no-op;
2. a resampler to the output rate (``soxr.ResampleStream``, libsoxr's high
   quality); the same rate as the input skips it, so that output is bit-exact;
3. an encoder that returns, for every chunk, the bytes of the output file that
   are complete so far, so a client can play while the rest is being generated.

Formats (:data:`FORMATS`):

* ``mp3``: libmp3lame in a bare MP3 stream (no Xing/LAME header, which would need
  a seek back to the start);
* ``opus``: libopus in Ogg, with short pages so each chunk leaves at once;
* ``aac``: FFmpeg's AAC-LC in ADTS frames;
* ``flac``: raw FLAC; STREAMINFO's sample count and MD5 stay 0 ("unknown"),
  since they are only known at the end, which FLAC allows;
* ``wav``: PCM16 with a 44-byte header whose RIFF and ``data`` sizes are
  0xFFFFFFFF ("unknown length", read to the end of the file by FFmpeg, libsndfile
  in most modes, browsers and Python's ``wave``);
* ``pcm``: raw PCM16 little-endian, no header;
* ``mulaw`` and ``alaw``: G.711 (FFmpeg's ``pcm_mulaw`` and ``pcm_alaw``), one byte
  per sample and no header, as telephony carries it; 8 kHz unless asked otherwise.

Lengths: resampling turns ``n`` input samples into exactly
``round_half_up(n * sample_rate / input_rate)`` output samples (:func:`resampled_length`),
so ``pcm``, ``wav`` and ``flac`` decode to exactly that many samples. The lossy
codecs add their encoder delay and padding (MP3 and ADTS carry no gapless
information; Ogg Opus does and decodes to the exact length).
"""

from __future__ import annotations

import io
import struct
import threading
import wave
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cached_property

import av
import av.filter
import numpy as np
import soxr
import torch

from decoder_gateway.audio.pcm import PCM_SAMPLE_WIDTH, to_pcm16

DEFAULT_SAMPLE_RATE = 24000
"""Every format's default output rate, as OpenAI's: 24 kHz."""

SAMPLE_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)
"""Output rates a request may ask for; each codec allows a subset (``sample_rates``)."""

MIN_SPEED, MAX_SPEED = 0.25, 4.0
_ATEMPO_MIN, _ATEMPO_MAX = 0.5, 2.0  # the range of one atempo stage
_WAV_UNKNOWN_SIZE = 0xFFFFFFFF


@dataclass(frozen=True)
class AudioFormat:
    """One ``response_format``: how it is encoded and what it is served as."""

    name: str
    content_type: str
    muxer: str | None = None  # PyAV container format; None: written here (wav, pcm)
    codec: str | None = None
    bit_rate: int | None = None
    sample_format: str = "flt"  # frames handed to the encoder: flt, or s16 (as pcm/wav)
    codec_format: str | None = None  # the encoder's sample format
    muxer_options: Mapping[str, str] = field(default_factory=dict)
    # The rate it is served at unless asked otherwise, for a format that has one of its
    # own (G.711's 8 kHz); None: the endpoint's default.
    default_rate: int | None = None

    @cached_property
    def sample_rates(self) -> tuple[int, ...]:
        """The rates of :data:`SAMPLE_RATES` this format can be encoded at."""
        if self.codec is None:
            return SAMPLE_RATES
        allowed = av.Codec(self.codec, "w").audio_rates
        return tuple(r for r in SAMPLE_RATES if not allowed or r in allowed)


FORMATS: dict[str, AudioFormat] = {
    "mp3": AudioFormat(
        "mp3",
        "audio/mpeg",
        "mp3",
        "libmp3lame",
        64_000,
        codec_format="fltp",
        muxer_options={"write_xing": "0"},
    ),
    # Ogg pages of at most 20 ms (one Opus frame) instead of the default second.
    "opus": AudioFormat(
        "opus",
        "audio/ogg",
        "ogg",
        "libopus",
        48_000,
        codec_format="flt",
        muxer_options={"page_duration": "20000"},
    ),
    "aac": AudioFormat("aac", "audio/aac", "adts", "aac", 64_000, codec_format="fltp"),
    # FLAC gets the same int16 samples as pcm/wav, so it decodes to exactly those.
    "flac": AudioFormat(
        "flac", "audio/flac", "flac", "flac", sample_format="s16", codec_format="s16"
    ),
    "wav": AudioFormat("wav", "audio/wav"),
    "pcm": AudioFormat("pcm", "audio/pcm"),
    # G.711 from the same int16 samples as pcm: each byte is one sample's 8-bit code.
    "mulaw": AudioFormat(
        "mulaw",
        "audio/basic",
        "mulaw",
        "pcm_mulaw",
        sample_format="s16",
        codec_format="s16",
        default_rate=8000,
    ),
    "alaw": AudioFormat(
        "alaw",
        "audio/x-alaw-basic",
        "alaw",
        "pcm_alaw",
        sample_format="s16",
        codec_format="s16",
        default_rate=8000,
    ),
}
G711_FORMATS = ("mulaw", "alaw")


def resampled_length(samples: int, input_rate: int, output_rate: int) -> int:
    """Samples that ``samples`` at ``input_rate`` become at ``output_rate``: rounded, halves up."""
    return (samples * output_rate + input_rate // 2) // input_rate


def atempo_stages(speed: float) -> list[float]:
    """``speed`` as a product of factors in atempo's [0.5, 2] range (few and even-ish)."""
    if not MIN_SPEED <= speed <= MAX_SPEED:
        raise ValueError(f"speed must be in [{MIN_SPEED}, {MAX_SPEED}], got {speed}")
    stages = []
    while speed > _ATEMPO_MAX:
        stages.append(_ATEMPO_MAX)
        speed /= _ATEMPO_MAX
    while speed < _ATEMPO_MIN:
        stages.append(_ATEMPO_MIN)
        speed /= _ATEMPO_MIN
    return [*stages, speed]


def _as_float32(chunk: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(chunk, torch.Tensor):
        chunk = chunk.detach().to("cpu", torch.float32).numpy()
    return np.ascontiguousarray(np.asarray(chunk, dtype=np.float32).reshape(-1))


class TimeStretch:
    """Tempo change without pitch change (FFmpeg ``atempo``), chunk by chunk."""

    def __init__(self, speed: float, sample_rate: int) -> None:
        self.sample_rate = sample_rate
        self._time_base = Fraction(1, sample_rate)
        self._pts = 0
        self._graph = av.filter.Graph()
        nodes = [
            self._graph.add_abuffer(
                format="flt", sample_rate=sample_rate, layout="mono", time_base=self._time_base
            )
        ]
        nodes += [self._graph.add("atempo", f"{stage:.6f}") for stage in atempo_stages(speed)]
        nodes.append(self._graph.add("aformat", "sample_fmts=flt:channel_layouts=mono"))
        nodes.append(self._graph.add("abuffersink"))
        self._graph.link_nodes(*nodes).configure()

    def push(self, samples: np.ndarray) -> np.ndarray:
        """Stretched audio that is ready after ``samples`` (may be empty)."""
        if len(samples) == 0:
            return samples
        frame = av.AudioFrame.from_ndarray(samples[None, :], format="flt", layout="mono")
        frame.sample_rate = self.sample_rate
        frame.pts = self._pts
        frame.time_base = self._time_base
        self._pts += len(samples)
        self._graph.push(frame)
        return self._drain()

    def finish(self) -> np.ndarray:
        """The rest, once the input has ended."""
        self._graph.push(None)
        return self._drain()

    def _drain(self) -> np.ndarray:
        out = []
        while True:
            try:
                frame = self._graph.pull()
            except (av.error.BlockingIOError, av.error.EOFError):
                break
            out.append(frame.to_ndarray().reshape(-1).astype(np.float32, copy=False))
        return np.concatenate(out) if out else np.zeros(0, np.float32)


class Resampler:
    """Streaming resampling (libsoxr, high quality) with an exact total length.

    The total output is :func:`resampled_length` of the total input: the last call
    pads or trims the stream's tail to it. The same rate in and out is a pass-through.
    """

    def __init__(self, input_rate: int, output_rate: int) -> None:
        self.input_rate, self.output_rate = input_rate, output_rate
        self.samples_in = self.samples_out = 0
        self._stream = (
            None
            if input_rate == output_rate
            else soxr.ResampleStream(input_rate, output_rate, 1, dtype="float32", quality="HQ")
        )

    def push(self, samples: np.ndarray) -> np.ndarray:
        self.samples_in += len(samples)
        if self._stream is not None and len(samples):
            samples = self._stream.resample_chunk(samples, last=False)
        self.samples_out += len(samples)
        return samples

    def finish(self) -> np.ndarray:
        tail = np.zeros(0, np.float32)
        if self._stream is not None:
            tail = self._stream.resample_chunk(tail, last=True)
        missing = resampled_length(self.samples_in, self.input_rate, self.output_rate) - (
            self.samples_out + len(tail)
        )
        if missing > 0:
            tail = np.concatenate([tail, np.zeros(missing, np.float32)])
        elif missing < 0:
            tail = tail[: max(0, len(tail) + missing)]
        self.samples_out += len(tail)
        return tail


class _Sink:
    """A write-only, unseekable file for PyAV: muxers then write strictly forward."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def write(self, data: bytes) -> int:
        self._buffer += data
        return len(data)

    def take(self) -> bytes:
        data = bytes(self._buffer)
        self._buffer.clear()
        return data


class _Encoder:
    """Float samples at the output rate in, file bytes out."""

    def encode(self, samples: np.ndarray) -> bytes:
        raise NotImplementedError

    def finish(self) -> bytes:
        return b""

    def close(self) -> None:
        """Release resources; after ``finish`` or instead of it (an aborted stream)."""


class _PcmEncoder(_Encoder):
    def encode(self, samples: np.ndarray) -> bytes:
        return to_pcm16(samples)


class _WavEncoder(_PcmEncoder):
    """PCM16 after a header that leaves the length open (sizes 0xFFFFFFFF)."""

    def __init__(self, sample_rate: int) -> None:
        self._header: bytes | None = wav_header(sample_rate)

    def encode(self, samples: np.ndarray) -> bytes:
        header, self._header = self._header or b"", None
        return header + super().encode(samples)

    def finish(self) -> bytes:
        header, self._header = self._header or b"", None  # an empty stream is still a file
        return header


def wav_header(sample_rate: int, channels: int = 1, bits: int = 16) -> bytes:
    """A 44-byte PCM WAV header for a stream of unknown length."""
    block_align = channels * bits // 8
    return (
        b"RIFF"
        + struct.pack("<I", _WAV_UNKNOWN_SIZE)
        + b"WAVEfmt "
        + struct.pack(
            "<IHHIIHH", 16, 1, channels, sample_rate, sample_rate * block_align, block_align, bits
        )
        + b"data"
        + struct.pack("<I", _WAV_UNKNOWN_SIZE)
    )


def whole_wav(pcm: bytes, sample_rate: int) -> bytes:
    """A complete WAV file of PCM16 mono, its sizes exact (the audio is all there)."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(PCM_SAMPLE_WIDTH)
        out.setframerate(sample_rate)
        out.writeframes(pcm)
    return buffer.getvalue()


class _AvEncoder(_Encoder):
    """An FFmpeg encoder and muxer (PyAV) writing into memory, drained after each chunk."""

    def __init__(self, fmt: AudioFormat, sample_rate: int) -> None:
        assert fmt.muxer is not None and fmt.codec is not None
        self._sink = _Sink()
        self._format = fmt
        self._time_base = Fraction(1, sample_rate)
        self._pts = 0
        self._container = av.open(
            self._sink,
            "w",
            format=fmt.muxer,
            container_options={**fmt.muxer_options, "flush_packets": "1"},
        )
        self._stream = self._container.add_stream(fmt.codec, rate=sample_rate)
        context = self._stream.codec_context
        context.layout = "mono"
        if fmt.codec_format:
            context.format = fmt.codec_format
        if fmt.bit_rate:
            context.bit_rate = fmt.bit_rate
        self._closed = False

    def encode(self, samples: np.ndarray) -> bytes:
        if len(samples):
            if self._format.sample_format == "s16":
                data = np.frombuffer(to_pcm16(samples), "<i2")
            else:
                data = np.clip(samples, -1.0, 1.0)
            frame = av.AudioFrame.from_ndarray(
                data[None, :], format=self._format.sample_format, layout="mono"
            )
            frame.sample_rate = self._time_base.denominator
            frame.pts = self._pts
            frame.time_base = self._time_base
            self._pts += len(samples)
            self._container.mux(self._stream.encode(frame))
        return self._sink.take()

    def finish(self) -> bytes:
        self._container.mux(self._stream.encode(None))
        self._close_container()
        return self._sink.take()

    def close(self) -> None:
        self._close_container()

    def _close_container(self) -> None:
        if not self._closed:
            self._closed = True
            self._container.close()


class AudioPipeline:
    """One response's audio: speed change, resampling and encoding, chunk by chunk.

    ``push`` and ``finish`` do CPU work (call them off the event loop); they and
    ``close`` are serialized by a lock, so ``close`` from another thread waits for
    a chunk in progress instead of tearing the encoder down under it.
    """

    def __init__(
        self,
        response_format: str,
        input_rate: int,
        sample_rate: int = DEFAULT_SAMPLE_RATE,
        speed: float = 1.0,
    ) -> None:
        if response_format not in FORMATS:
            raise ValueError(f"unknown format {response_format!r}; one of {', '.join(FORMATS)}")
        self.format = FORMATS[response_format]
        if sample_rate not in self.format.sample_rates:
            raise ValueError(
                f"{response_format} cannot be encoded at {sample_rate} Hz; "
                f"supported rates: {', '.join(map(str, self.format.sample_rates))}"
            )
        self.input_rate, self.sample_rate, self.speed = input_rate, sample_rate, speed
        self.samples_in = 0  # model audio received, at input_rate
        self._stretch = None if speed == 1.0 else TimeStretch(speed, input_rate)
        self._resampler = Resampler(input_rate, sample_rate)
        self._encoder: _Encoder
        if self.format.name == "pcm":
            self._encoder = _PcmEncoder()
        elif self.format.name == "wav":
            self._encoder = _WavEncoder(sample_rate)
        else:
            self._encoder = _AvEncoder(self.format, sample_rate)
        self._lock = threading.Lock()
        self._done = False

    @property
    def samples_out(self) -> int:
        """Samples handed to the encoder so far, at ``sample_rate``."""
        return self._resampler.samples_out

    def push(self, chunk: torch.Tensor | np.ndarray) -> bytes:
        """Bytes of the output file that are complete after this chunk (may be empty)."""
        samples = _as_float32(chunk)
        with self._lock:
            self._check_open()
            self.samples_in += len(samples)
            if self._stretch is not None:
                samples = self._stretch.push(samples)
            return self._encoder.encode(self._resampler.push(samples))

    def finish(self) -> bytes:
        """The remaining bytes: flushed filters and encoder, the container's trailer."""
        with self._lock:
            self._check_open()
            samples = np.zeros(0, np.float32)
            if self._stretch is not None:
                samples = self._resampler.push(self._stretch.finish())
            samples = np.concatenate([samples, self._resampler.finish()])
            data = self._encoder.encode(samples) + self._encoder.finish()
            self._done = True
            self._encoder.close()
            return data

    def close(self) -> None:
        """Release the encoder; safe to call at any time, and more than once."""
        with self._lock:
            self._done = True
            self._encoder.close()

    def _check_open(self) -> None:
        if self._done:
            raise RuntimeError("the audio pipeline is finished or closed")
