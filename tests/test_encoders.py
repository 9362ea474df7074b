"""decoder_gateway.audio.encoders on its own: every format round-trips through FFmpeg's
decoders (PyAV) with the promised rate, channels and length, streams before the
end, and speed changes tempo without changing pitch."""

from __future__ import annotations

import io
import struct
import threading
import wave

import av
import numpy as np
import pytest
import torch

from decoder_gateway.audio.encoders import (
    DEFAULT_SAMPLE_RATE,
    FORMATS,
    SAMPLE_RATES,
    AudioPipeline,
    Resampler,
    TimeStretch,
    atempo_stages,
    resampled_length,
    wav_header,
)
from decoder_gateway.audio.pcm import to_pcm16

INPUT_RATE = 16000
CHUNK = 3200  # 10 tokens of 320 samples, like the gateway's first chunk
# Samples each lossy codec may add at the output rate (encoder delay and padding,
# which MP3 and ADTS files cannot tell the decoder to drop).
LOSSY_SLACK = {"mp3": 3 * 1152, "aac": 3 * 1024, "opus": 0}


def tone(seconds: float, frequency: float = 220.0, rate: int = INPUT_RATE) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.4 * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


def run_pipeline(pipeline: AudioPipeline, audio: np.ndarray, chunk: int = CHUNK) -> list[bytes]:
    """Push ``audio`` in chunks; the bytes after each chunk, then those of finish()."""
    parts = [pipeline.push(audio[i : i + chunk]) for i in range(0, len(audio), chunk)]
    return [*parts, pipeline.finish()]


def decode(data: bytes, response_format: str, pcm_rate: int = DEFAULT_SAMPLE_RATE):
    """(sample rate, channels, mono float samples) of an encoded file."""
    if response_format == "pcm":
        return pcm_rate, 1, np.frombuffer(data, "<i2").astype(np.float32) / 32768
    with av.open(io.BytesIO(data), "r") as container:
        stream = container.streams.audio[0]
        frames = list(container.decode(stream))
    rate = frames[0].sample_rate
    channels = frames[0].layout.nb_channels
    samples = np.concatenate([f.to_ndarray().reshape(channels, -1)[0] for f in frames])
    if samples.dtype.kind == "i":
        samples = samples.astype(np.float32) / 32768
    return rate, channels, samples.astype(np.float32)


def dominant_frequency(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[np.argmax(spectrum)])


# -- formats -------------------------------------------------------------------


def test_every_format_is_declared_with_its_content_type():
    assert {name: f.content_type for name, f in FORMATS.items()} == {
        "mp3": "audio/mpeg",
        "opus": "audio/ogg",
        "aac": "audio/aac",
        "flac": "audio/flac",
        "wav": "audio/wav",
        "pcm": "audio/pcm",
        "mulaw": "audio/basic",
        "alaw": "audio/x-alaw-basic",
    }


def test_the_bundled_ffmpeg_has_every_encoder():
    for fmt in FORMATS.values():
        if fmt.codec:
            assert av.Codec(fmt.codec, "w").type == "audio"
            assert DEFAULT_SAMPLE_RATE in fmt.sample_rates
    assert FORMATS["opus"].sample_rates == (8000, 12000, 16000, 24000, 48000)
    assert FORMATS["mp3"].sample_rates == SAMPLE_RATES


@pytest.mark.parametrize("response_format", ["pcm", "wav", "flac"])
@pytest.mark.parametrize("rate", [8000, 11025, 16000, 22050, 24000, 44100, 48000])
def test_lossless_formats_have_the_exact_resampled_length(response_format, rate):
    audio = tone(1.37)
    data = b"".join(run_pipeline(AudioPipeline(response_format, INPUT_RATE, rate), audio))
    got_rate, channels, samples = decode(data, response_format, pcm_rate=rate)
    assert (got_rate, channels) == (rate, 1)
    assert len(samples) == resampled_length(len(audio), INPUT_RATE, rate)


def test_same_rate_is_bit_exact_in_every_lossless_format():
    audio = tone(0.5) * 3  # clipped on the way, as pcm16 is
    want = to_pcm16(audio)
    for response_format in ("pcm", "wav", "flac"):
        pipeline = AudioPipeline(response_format, INPUT_RATE, INPUT_RATE)
        data = b"".join(run_pipeline(pipeline, audio))
        _, _, samples = decode(data, response_format, pcm_rate=INPUT_RATE)
        assert np.array_equal(np.rint(samples * 32768).astype("<i2").tobytes(), want)


@pytest.mark.parametrize("response_format", ["mp3", "opus", "aac"])
def test_lossy_formats_decode_to_the_length_plus_encoder_padding(response_format):
    audio = tone(1.5)
    data = b"".join(run_pipeline(AudioPipeline(response_format, INPUT_RATE), audio))
    rate, channels, samples = decode(data, response_format)
    assert channels == 1
    # Ogg Opus always decodes at 48 kHz; its header records the 24 kHz input.
    assert rate == (48000 if response_format == "opus" else DEFAULT_SAMPLE_RATE)
    want = resampled_length(len(audio), INPUT_RATE, rate)
    assert want <= len(samples) <= want + LOSSY_SLACK[response_format] * rate // 24000
    assert dominant_frequency(samples, rate) == pytest.approx(220, abs=3)


@pytest.mark.parametrize(("response_format", "silence"), [("mulaw", 0xFF), ("alaw", 0xD5)])
@pytest.mark.parametrize("rate", [8000, 16000])
def test_g711_is_one_byte_per_sample_and_decodes_to_the_pcm(response_format, silence, rate):
    """G.711 from the same samples as pcm: FFmpeg's decoder (PyAV) gives them back to
    within the 8-bit companding step, which grows with the amplitude (at most about 3 %
    of it, and a few units near zero)."""
    audio = np.concatenate([np.zeros(800, np.float32), tone(1.21), tone(0.3) * 2.5])
    data = b"".join(run_pipeline(AudioPipeline(response_format, INPUT_RATE, rate), audio))
    assert len(data) == resampled_length(len(audio), INPUT_RATE, rate)  # no header
    assert set(data[: 800 * rate // INPUT_RATE // 2]) == {silence}  # G.711's code for 0
    with av.open(io.BytesIO(data), "r", format=response_format) as container:
        stream = container.streams.audio[0]
        assert stream.codec_context.name == f"pcm_{response_format}"
        decoded = np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(stream)])
    pcm = b"".join(run_pipeline(AudioPipeline("pcm", INPUT_RATE, rate), audio))
    want = np.frombuffer(pcm, "<i2").astype(np.int64)
    assert decoded.dtype == np.int16 and len(decoded) == len(want)
    assert np.all(np.abs(decoded.astype(np.int64) - want) <= 16 + 0.035 * np.abs(want))
    assert np.abs(decoded).max() > 30000  # the clipped part is there, at full scale


def test_g711_formats_are_8_khz_unless_asked_otherwise():
    assert {name: f.default_rate for name, f in FORMATS.items() if f.default_rate} == {
        "mulaw": 8000,
        "alaw": 8000,
    }
    assert FORMATS["mulaw"].sample_rates == FORMATS["alaw"].sample_rates == SAMPLE_RATES


def test_wav_header_leaves_the_length_open():
    header = wav_header(24000)
    assert len(header) == 44 and header[:4] == b"RIFF" and header[8:16] == b"WAVEfmt "
    assert struct.unpack("<I", header[4:8])[0] == 0xFFFFFFFF
    assert header[36:40] == b"data" and struct.unpack("<I", header[40:44])[0] == 0xFFFFFFFF
    fmt = struct.unpack("<IHHIIHH", header[16:36])
    assert fmt == (16, 1, 1, 24000, 48000, 2, 16)
    data = b"".join(run_pipeline(AudioPipeline("wav", INPUT_RATE), tone(0.2)))
    with wave.open(io.BytesIO(data)) as reader:  # Python's reader copes as well
        assert reader.getframerate() == 24000 and reader.getnchannels() == 1
        assert len(reader.readframes(1 << 20)) == 2 * resampled_length(3200, 16000, 24000)


def test_an_empty_stream_is_still_a_valid_wav():
    assert AudioPipeline("wav", INPUT_RATE).finish() == wav_header(DEFAULT_SAMPLE_RATE)


@pytest.mark.parametrize("response_format", list(FORMATS))
def test_bytes_flow_before_the_end(response_format):
    """Every format hands out most of the file chunk by chunk, not at finish()."""
    parts = run_pipeline(AudioPipeline(response_format, INPUT_RATE), tone(2.0))
    assert parts[0] or parts[1], "nothing after the first two chunks"
    assert sum(map(len, parts[:-1])) > 0.7 * sum(map(len, parts))


def test_torch_chunks_are_accepted():
    pipeline = AudioPipeline("pcm", INPUT_RATE, INPUT_RATE)
    assert pipeline.push(torch.zeros(320)) == b"\x00\x00" * 320
    assert pipeline.finish() == b""
    assert pipeline.samples_in == 320 and pipeline.samples_out == 320


def test_unsupported_requests_are_refused():
    with pytest.raises(ValueError, match="supported rates: 8000, 12000, 16000, 24000, 48000"):
        AudioPipeline("opus", INPUT_RATE, 44100)
    with pytest.raises(ValueError, match="unknown format"):
        AudioPipeline("ogg", INPUT_RATE)
    with pytest.raises(ValueError, match="speed"):
        AudioPipeline("pcm", INPUT_RATE, speed=5.0)


def test_closed_pipeline_refuses_more_and_close_is_idempotent():
    pipeline = AudioPipeline("mp3", INPUT_RATE)
    pipeline.push(tone(0.2))
    pipeline.close()
    pipeline.close()
    with pytest.raises(RuntimeError):
        pipeline.push(tone(0.2))


def test_close_waits_for_a_chunk_in_progress():
    """close() from another thread never tears the encoder down under push()."""
    pipeline = AudioPipeline("aac", INPUT_RATE)
    outcome: list[object] = []

    def push() -> None:
        try:
            outcome.append(len(pipeline.push(tone(5.0))))
        except RuntimeError as err:  # close() got the lock first
            outcome.append(err)

    worker = threading.Thread(target=push)
    worker.start()
    pipeline.close()
    worker.join()
    assert isinstance(outcome[0], int) or "closed" in str(outcome[0])


# -- resampling ----------------------------------------------------------------


@pytest.mark.parametrize("rate", SAMPLE_RATES)
def test_resampler_total_length_is_exact_whatever_the_chunking(rate):
    rng = np.random.default_rng(0)
    for total in (0, 1, 319, 320 * 77, 16000 * 3 + 5):
        audio = rng.standard_normal(total).astype(np.float32) * 0.1
        resampler = Resampler(INPUT_RATE, rate)
        out = [resampler.push(audio[i : i + 1234]) for i in range(0, total, 1234)]
        out.append(resampler.finish())
        assert sum(map(len, out)) == resampled_length(total, INPUT_RATE, rate)
        assert resampler.samples_out == resampled_length(total, INPUT_RATE, rate)


def test_resampled_length_rounds_halves_up():
    assert resampled_length(320, 16000, 24000) == 480
    assert resampled_length(320, 16000, 11025) == 221  # 220.5
    assert resampled_length(0, 16000, 48000) == 0


def test_resampling_keeps_the_tone():
    rate = 48000
    resampler = Resampler(INPUT_RATE, rate)
    out = np.concatenate([resampler.push(tone(1.0, 1000.0)), resampler.finish()])
    assert dominant_frequency(out, rate) == pytest.approx(1000, abs=2)


# -- speed ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("speed", "stages"),
    [(1.0, [1.0]), (2.0, [2.0]), (4.0, [2.0, 2.0]), (0.25, [0.5, 0.5]), (3.0, [2.0, 1.5])],
)
def test_atempo_stages_stay_in_range(speed, stages):
    assert atempo_stages(speed) == pytest.approx(stages)
    assert np.prod(atempo_stages(speed)) == pytest.approx(speed)


@pytest.mark.parametrize("speed", [0.25, 0.5, 0.8, 1.5, 2.0, 3.0, 4.0])
def test_speed_changes_duration_but_not_pitch(speed):
    audio = tone(2.0, 300.0)
    stretch = TimeStretch(speed, INPUT_RATE)
    parts = [stretch.push(audio[i : i + CHUNK]) for i in range(0, len(audio), CHUNK)]
    out = np.concatenate([*parts, stretch.finish()])
    assert len(out) == pytest.approx(len(audio) / speed, rel=0.03)
    assert dominant_frequency(out, INPUT_RATE) == pytest.approx(300, abs=3)


def test_speed_one_is_an_exact_no_op():
    audio = tone(0.9)
    plain = b"".join(run_pipeline(AudioPipeline("pcm", INPUT_RATE, INPUT_RATE, 1.0), audio))
    assert plain == to_pcm16(audio)


@pytest.mark.parametrize("response_format", ["pcm", "mp3", "opus"])
def test_speed_through_the_pipeline(response_format):
    audio = tone(2.0)
    pipeline = AudioPipeline(response_format, INPUT_RATE, speed=2.0)
    rate, _, samples = decode(b"".join(run_pipeline(pipeline, audio)), response_format)
    want = rate * 1.0  # two seconds at twice the speed
    slack = LOSSY_SLACK.get(response_format, 0) * rate // 24000
    assert 0.95 * want <= len(samples) <= 1.05 * want + slack
    assert pipeline.samples_in == len(audio)
