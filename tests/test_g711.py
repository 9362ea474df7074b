"""G.711 (mu-law and A-law, telephony's 8 kHz audio) on every endpoint that takes a
response_format: POST /v1/audio/speech and both WebSockets.

A real gateway process against the stand-in LLM (10 speech tokens per word, 320
samples per token at 16 kHz), so every length is known in advance; the bytes are
decoded with FFmpeg's own G.711 decoders (PyAV) and compared with the same request
as PCM16.
"""

from __future__ import annotations

import io
import json

import av
import numpy as np
import pytest
import requests
from websockets.sync.client import connect as ws_connect

from decoder_gateway.audio.encoders import resampled_length
from decoder_gateway.llm.prompt import speaker_prompt
from decoder_gateway.text import split_segments
from decoder_gateway.voices.catalog import VoiceCatalog
from devtools.standin_llm import expected_semantic_count

VOICES = VoiceCatalog.load()
TEXT = "Habari yako? Nzuri sana rafiki yangu."
CONTENT_TYPES = {"mulaw": "audio/basic", "alaw": "audio/x-alaw-basic"}


def model_samples(text: str = TEXT, voice: str = "swahili_male") -> int:
    v = VOICES.resolve(voice)
    return sum(320 * expected_semantic_count(speaker_prompt(v, s)) for s in split_segments(text))


def g711_decode(data: bytes, response_format: str, rate: int) -> np.ndarray:
    """int16 samples of headerless G.711 bytes, by FFmpeg's decoder."""
    options = {"sample_rate": str(rate)}
    with av.open(io.BytesIO(data), "r", format=response_format, options=options) as container:
        stream = container.streams.audio[0]
        assert (stream.codec_context.name, stream.rate) == (f"pcm_{response_format}", rate)
        return np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(stream)])


def assert_companded(decoded: np.ndarray, pcm: bytes) -> None:
    """``decoded`` is ``pcm`` to within G.711's step (about 3 % of the amplitude)."""
    want = np.frombuffer(pcm, "<i2").astype(np.int64)
    assert len(decoded) == len(want)
    # Batched decoding may flip an LSB between two requests; the step covers it.
    assert np.all(np.abs(decoded.astype(np.int64) - want) <= 20 + 0.035 * np.abs(want))


def openai_speech(gateway, **body: object) -> requests.Response:
    body = {"model": "tts-1", "voice": "swahili_male", "input": TEXT, **body}
    return requests.post(f"{gateway.url}/v1/audio/speech", json=body, timeout=60)


@pytest.mark.parametrize("response_format", ["mulaw", "alaw"])
def test_openai_speech_g711_is_8_khz_headerless_with_its_content_type(
    gateway, llm, response_format
):
    response = openai_speech(gateway, response_format=response_format)
    assert response.status_code == 200
    assert response.headers["content-type"] == CONTENT_TYPES[response_format]
    assert response.headers["x-sample-rate"] == "8000"
    assert "x-bit-depth" not in response.headers
    assert len(response.content) == resampled_length(model_samples(), 16000, 8000)
    pcm = openai_speech(gateway, response_format="pcm", sample_rate=8000)
    assert_companded(g711_decode(response.content, response_format, 8000), pcm.content)


@pytest.mark.parametrize("response_format", ["mulaw", "alaw"])
def test_openai_speech_g711_at_another_rate_and_as_events(gateway, llm, response_format):
    response = openai_speech(gateway, response_format=response_format, sample_rate=16000)
    assert response.headers["x-sample-rate"] == "16000"
    assert len(response.content) == model_samples()  # the model's own rate: one byte each
    events = openai_speech(gateway, response_format=response_format, stream_format="sse")
    assert events.headers["content-type"].startswith("text/event-stream")
    assert '"speech.audio.done"' in events.text


def test_seed_websocket_g711(gateway, llm):
    with ws_connect(f"{gateway.ws_url}/v1/audio/speech/stream/ws") as ws:
        frames, audio = [], bytearray()
        message = {"input": TEXT, "voice": "swahili_male", "segment_id": 1}
        ws.send(json.dumps({**message, "response_format": "mulaw"}))
        while not frames or frames[-1]["type"] != "end":
            got = ws.recv(timeout=30)
            if isinstance(got, bytes):
                audio += got
            else:
                frames.append(json.loads(got))
        ws.send(json.dumps({**message, "segment_id": 2, "sample_rate": 8000}))
        pcm = bytearray()
        while True:
            got = ws.recv(timeout=30)
            if isinstance(got, bytes):
                pcm += got
            elif json.loads(got)["type"] == "end":
                break
        ws.send(json.dumps({**message, "response_format": "alaw", "sample_rate": 12345}))
        refused = json.loads(ws.recv(timeout=10))
    start, end = frames[0], frames[-1]
    assert start["sample_rate"] == 8000
    want = resampled_length(model_samples(), 16000, 8000)
    assert end["samples"] == len(audio) == want and end["duration_s"] == want / 8000
    assert_companded(g711_decode(bytes(audio), "mulaw", 8000), bytes(pcm))
    assert refused["type"] == "error" and refused["code"] == "invalid_request"
    assert "sample_rate" in refused["message"]


@pytest.mark.parametrize("stream_audio", [True, False])
def test_text_in_websocket_g711(gateway, llm, stream_audio):
    sentences = split_segments(TEXT)
    with ws_connect(f"{gateway.ws_url}/v1/audio/speech/stream") as ws:
        config = {"voice": "swahili_male", "response_format": "alaw", "stream_audio": stream_audio}
        ws.send(json.dumps({"type": "session.config", **config}))
        ws.send(json.dumps({"type": "input.text", "text": TEXT}))
        ws.send(json.dumps({"type": "input.done"}))
        frames, audio = [], []
        while not frames or frames[-1]["type"] != "session.done":
            got = ws.recv(timeout=30)
            if isinstance(got, bytes):
                audio.append(got)
            else:
                frames.append(json.loads(got))
    starts = [f for f in frames if f["type"] == "audio.start"]
    dones = [f for f in frames if f["type"] == "audio.done"]
    assert [(s["format"], s["sample_rate"]) for s in starts] == [("alaw", 8000)] * 2
    # Each sentence is resampled on its own: its exact length at 8 kHz, one byte each.
    lengths = [resampled_length(model_samples(s), 16000, 8000) for s in sentences]
    assert [d["total_bytes"] for d in dones] == lengths
    assert sum(map(len, audio)) == sum(lengths)
    if not stream_audio:
        assert [len(a) for a in audio] == lengths  # one frame per sentence
    decoded = g711_decode(b"".join(audio), "alaw", 8000)
    assert np.abs(decoded).max() > 0
