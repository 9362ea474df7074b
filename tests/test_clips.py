"""Reference clips: every container a browser or phone sends decodes to the first channel
at its own rate, and every bad upload ends in a typed 4xx error naming the field.

Clips are made with PyAV itself (and espeak-ng where installed), so the tests need no
data files and cover the encoders FFmpeg really ships.
"""

from __future__ import annotations

import base64
import io
import shutil
import subprocess
import time
from pathlib import Path

import av
import numpy as np
import pytest

from decoder_gateway.audio.clips import Clip, decode_clip, decode_data_url
from decoder_gateway.errors import (
    AudioTooLong,
    AudioTooShort,
    InvalidAudio,
    InvalidRequest,
    RequestTooLarge,
    SilentAudio,
)

LEFT_HZ, RIGHT_HZ = 440.0, 1500.0


def stereo(rate: int, seconds: float) -> np.ndarray:
    """(2, n) float32: a 440 Hz sine on the left, a quieter 1500 Hz sine on the right, so
    the decoded channel's dominant frequency tells which channel came back."""
    t = np.arange(int(rate * seconds)) / rate
    left = 0.5 * np.sin(2 * np.pi * LEFT_HZ * t)
    right = 0.3 * np.sin(2 * np.pi * RIGHT_HZ * t)
    return np.stack([left, right]).astype(np.float32)


def encode(
    samples: np.ndarray,
    rate: int,
    *,
    container: str,
    codec: str,
    stream_rate: int | None = None,
    sample_format: str | None = None,
) -> bytes:
    """Encode (channels, n) float32 samples with PyAV (it converts to the codec's format)."""
    layout = {1: "mono", 2: "stereo"}[samples.shape[0]]
    buf = io.BytesIO()
    with av.open(buf, "w", format=container) as out:
        stream = out.add_stream(codec, rate=stream_rate or rate, layout=layout)
        if sample_format:
            stream.format = sample_format
        step = 4096
        for start in range(0, samples.shape[1], step):
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(samples[:, start : start + step]), format="fltp", layout=layout
            )
            frame.sample_rate = rate
            frame.pts = start
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def dominant_hz(clip: Clip) -> float:
    spectrum = np.abs(np.fft.rfft(clip.samples))
    return float(np.fft.rfftfreq(clip.samples.size, 1 / clip.sample_rate)[np.argmax(spectrum)])


def wav16(samples: np.ndarray, rate: int) -> bytes:
    return encode(samples, rate, container="wav", codec="pcm_s16le")


# name, container, codec, input rate, expected decoded rate, duration tolerance (s):
# lossy codecs add encoder priming/padding.
FORMATS = [
    ("wav-s16-22k-stereo", "wav", "pcm_s16le", 22050, 22050, 1e-3),
    ("wav-s24", "wav", "pcm_s24le", 16000, 16000, 1e-3),
    ("wav-s32", "wav", "pcm_s32le", 16000, 16000, 1e-3),
    ("wav-float", "wav", "pcm_f32le", 44100, 44100, 1e-3),
    ("flac", "flac", "flac", 24000, 24000, 1e-3),
    ("mp3", "mp3", "libmp3lame", 44100, 44100, 0.1),
    ("ogg-opus", "ogg", "libopus", 48000, 48000, 0.1),
    ("m4a-aac", "ipod", "aac", 44100, 44100, 0.1),
    ("webm-opus", "webm", "libopus", 48000, 48000, 0.1),
]


@pytest.mark.parametrize(
    ("container", "codec", "rate", "expected_rate", "tolerance"),
    [f[1:] for f in FORMATS],
    ids=[f[0] for f in FORMATS],
)
def test_formats_decode_to_first_channel(
    container: str, codec: str, rate: int, expected_rate: int, tolerance: float
) -> None:
    data = encode(stereo(rate, 2.0), rate, container=container, codec=codec)
    clip = decode_clip(data)
    assert clip.sample_rate == expected_rate
    assert clip.samples.dtype == np.float32 and clip.samples.ndim == 1
    assert clip.duration_s == pytest.approx(2.0, abs=tolerance)
    assert clip.duration_s == pytest.approx(clip.samples.size / clip.sample_rate)
    assert float(np.max(np.abs(clip.samples))) <= 1.0
    assert dominant_hz(clip) == pytest.approx(LEFT_HZ, abs=5)  # the left channel, not a mix
    middle = clip.samples[clip.samples.size // 4 : -clip.samples.size // 4]
    rms = float(np.sqrt(np.mean(middle.astype(np.float64) ** 2)))
    assert rms == pytest.approx(0.5 / np.sqrt(2), rel=0.1)  # the left level, not the right


@pytest.mark.parametrize("codec", ["pcm_s16le", "pcm_s24le", "pcm_s32le", "pcm_f32le"])
def test_pcm_wav_samples_are_exact(codec: str) -> None:
    """Lossless PCM comes back sample for sample, scaled to [-1, 1] from every width."""
    original = stereo(22050, 1.0)
    clip = decode_clip(encode(original, 22050, container="wav", codec=codec))
    assert clip.samples.size == original.shape[1]
    np.testing.assert_allclose(clip.samples, original[0], atol=1e-4)


def test_mono_input() -> None:
    clip = decode_clip(wav16(stereo(16000, 1.0)[:1], 16000))
    assert clip.sample_rate == 16000 and clip.duration_s == pytest.approx(1.0)


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_espeak_ng_speech(tmp_path: Path) -> None:
    out = tmp_path / "speech.wav"
    subprocess.run(
        ["espeak-ng", "-w", str(out), "Habari ya asubuhi, this is a reference clip."],
        check=True,
        timeout=60,
    )
    clip = decode_clip(out.read_bytes())
    assert clip.sample_rate == 22050
    assert 1.0 < clip.duration_s < 10.0
    assert float(np.max(np.abs(clip.samples))) > 0.05


# --- bad uploads ------------------------------------------------------------------


def test_over_max_bytes_is_413() -> None:
    data = wav16(stereo(16000, 1.0), 16000)
    with pytest.raises(RequestTooLarge) as info:
        decode_clip(data, max_bytes=len(data) - 1, param="file")
    assert info.value.status == 413 and info.value.code == "request_too_large"
    assert info.value.param == "file"


def test_empty_bytes() -> None:
    with pytest.raises(InvalidAudio) as info:
        decode_clip(b"")
    assert info.value.status == 400 and info.value.param == "audio_sample"
    assert "empty" in info.value.message


@pytest.mark.parametrize(
    "data",
    [
        b"hello, this is not audio at all\n" * 50,
        bytes(np.random.default_rng(1).integers(0, 256, 20_000, dtype=np.uint8)),
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 2000,
        b"RIFF\x24\x00\x00\x00WAVEfmt ",  # a truncated header
        # Playlists and concat lists would make FFmpeg open other files: refused.
        b"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n",
        b"ffconcat version 1.0\nfile '/etc/passwd'\n",
        b"1\n00:00:01,000 --> 00:00:02,000\nhello\n\n",  # subtitles: not an audio demuxer
    ],
    ids=["text", "noise-bytes", "png", "truncated-wav", "hls-playlist", "concat", "srt"],
)
def test_not_audio(data: bytes) -> None:
    with pytest.raises(InvalidAudio) as info:
        decode_clip(data)
    err = info.value
    assert err.status == 400 and err.code == "invalid_audio" and err.param == "audio_sample"
    assert "not a supported audio file" in err.message and "wav, flac" in err.message


def test_wav_header_without_samples() -> None:
    data = wav16(np.zeros((1, 0), np.float32), 16000)
    with pytest.raises(InvalidAudio) as info:
        decode_clip(data)
    assert info.value.code == "invalid_audio"


def test_video_without_audio_stream() -> None:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for i in range(10):
            frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), i * 20, np.uint8), "rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    with pytest.raises(InvalidAudio) as info:
        decode_clip(buf.getvalue())
    assert "no audio stream" in info.value.message


def test_digital_silence() -> None:
    with pytest.raises(SilentAudio) as info:
        decode_clip(wav16(np.zeros((2, 32000), np.float32), 16000))
    assert info.value.status == 400 and info.value.param == "audio_sample"


def test_too_short_reports_duration() -> None:
    with pytest.raises(AudioTooShort) as info:
        decode_clip(wav16(stereo(16000, 0.2), 16000))
    assert info.value.status == 400 and "0.20 s" in info.value.message


def test_too_long_stops_decoding() -> None:
    """A 60 s file with max_seconds=1 is refused after about one second of decoding."""
    data = encode(stereo(8000, 60.0)[:1], 8000, container="flac", codec="flac")
    started = time.perf_counter()
    with pytest.raises(AudioTooLong) as info:
        decode_clip(data, max_seconds=1.0)
    assert time.perf_counter() - started < 2.0
    err = info.value
    assert err.status == 400 and err.param == "audio_sample"
    assert "1 s" in err.message and "60.0 s" in err.message  # the limit and declared length
    stopped_after = float(err.message.split("stopped after ")[1].split(" s")[0])
    assert 1.0 < stopped_after < 2.0


def test_limits_are_inclusive() -> None:
    clip = decode_clip(wav16(stereo(16000, 2.0), 16000), min_seconds=2.0, max_seconds=2.0)
    assert clip.duration_s == 2.0


def test_errors_are_gateway_errors() -> None:
    assert issubclass(InvalidAudio, InvalidRequest)
    for cls in (SilentAudio, AudioTooShort, AudioTooLong):
        assert issubclass(cls, InvalidAudio) and cls.status == 400


# --- data URLs ---------------------------------------------------------------------


def test_data_url_round_trip() -> None:
    data = wav16(stereo(22050, 1.0), 22050)
    clip = decode_data_url("data:audio/wav;base64," + base64.b64encode(data).decode())
    assert clip.sample_rate == 22050 and clip.duration_s == pytest.approx(1.0)
    assert dominant_hz(clip) == pytest.approx(LEFT_HZ, abs=5)


def test_data_url_wrapped_base64_and_other_types() -> None:
    data = encode(stereo(48000, 1.0), 48000, container="webm", codec="libopus")
    b64 = base64.encodebytes(data).decode()  # 76-column lines
    clip = decode_data_url("DATA:video/webm;codecs=opus;base64," + b64)
    assert clip.sample_rate == 48000


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("https://example.com/a.wav", "data URL"),
        ("data:audio/wav,plainpayload", "base64"),
        ("data:audio/wav;base64", "data URL"),
        ("data:text/plain;base64,aGVsbG8=", "media type"),
        ("data:audio/wav;base64,@@@not*base64", "base64"),
        ("data:audio/wav;base64,aGVsbG8", "base64"),  # bad padding
        ("data:audio/wav;base64,", "empty"),
        (
            "data:audio/wav;base64,aGVsbG8gd29ybGQgdGhpcyBpcyBub3QgYXVkaW8=",
            "not a supported audio file",
        ),
    ],
)
def test_bad_data_urls(url: str, fragment: str) -> None:
    with pytest.raises(InvalidAudio) as info:
        decode_data_url(url)
    err = info.value
    assert err.status == 400 and err.param == "ref_audio"
    assert fragment in err.message


def test_data_url_size_limit_applies_to_decoded_bytes() -> None:
    data = wav16(stereo(16000, 1.0), 16000)
    url = "data:audio/wav;base64," + base64.b64encode(data).decode()
    assert decode_data_url(url, max_bytes=len(data)).sample_rate == 16000  # base64 is larger
    with pytest.raises(RequestTooLarge) as info:
        decode_data_url(url, max_bytes=len(data) - 1)
    assert info.value.status == 413 and info.value.param == "ref_audio"


def test_huge_data_url_refused_before_decoding() -> None:
    url = "data:audio/wav;base64," + "A" * (8 * 1024 * 1024)
    with pytest.raises(RequestTooLarge):
        decode_data_url(url, max_bytes=1024 * 1024)


@pytest.mark.parametrize(
    ("container", "codec", "rate"),
    [
        ("wav", "pcm_s16le", 16000),
        ("flac", "flac", 16000),
        ("mp3", "libmp3lame", 16000),
        ("ogg", "libopus", 48000),
        ("ipod", "aac", 16000),
        ("webm", "libopus", 48000),
    ],
)
def test_damaged_files_never_raise_untyped(container: str, codec: str, rate: int) -> None:
    """Truncated or byte-flipped files either decode or give a typed 400, nothing else."""
    good = encode(stereo(rate, 1.0), rate, container=container, codec=codec)
    rng = np.random.default_rng(7)
    for trial in range(40):
        data = bytearray(good)
        if trial % 2:
            data = data[: int(rng.integers(1, len(data)))]
        else:
            spots = rng.integers(0, len(data), int(rng.integers(1, 40)))
            data_array = np.frombuffer(data, np.uint8).copy()
            data_array[spots] = rng.integers(0, 256, spots.size, dtype=np.uint8)
            data = bytearray(data_array.tobytes())
        try:
            clip = decode_clip(bytes(data), min_seconds=0.0)
        except InvalidRequest as err:
            assert err.status == 400 and err.param == "audio_sample"
        else:
            assert np.all(np.isfinite(clip.samples)) and np.max(np.abs(clip.samples)) <= 1.0
