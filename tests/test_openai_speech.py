"""The OpenAI-compatible speech API end to end, through the official ``openai`` SDK
against the real gateway process and the stand-in LLM (10 speech tokens per word,
a token being 320 samples at 16 kHz: 20 ms)."""

from __future__ import annotations

import base64
import io
import json

import av
import httpx
import numpy as np
import openai
import pytest
import requests

from decoder_gateway.audio.encoders import resampled_length
from decoder_gateway.llm.prompt import speaker_prompt
from decoder_gateway.text import split_segments
from decoder_gateway.voices.catalog import VoiceCatalog
from devtools.standin_llm import expected_semantic_tokens

VOICES = VoiceCatalog.load()
TEXT = "Oli otya? Nze bulungi nnyo."
LONG_SENTENCE = "Oli otya leero mukwano gwange wange nnyo nnyo?"
SAMPLES_PER_TOKEN = 320
MODEL_RATE = 16000
CONTENT_TYPES = {
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}
# What lossy files may add at 24 kHz: encoder delay and padding (MP3 and ADTS carry
# no gapless information; Ogg Opus does).
LOSSY_SLACK = {"mp3": 3 * 1152, "aac": 3 * 1024, "opus": 0}


def token_count(text: str, voice: str = "luganda_female") -> int:
    """The stand-in's speech tokens for ``text``, over the segments the gateway makes."""
    v = VOICES.resolve(voice)
    return sum(
        len(expected_semantic_tokens(speaker_prompt(v, segment)))
        for segment in split_segments(text)
    )


def samples_at(rate: int, text: str = TEXT, voice: str = "luganda_female") -> int:
    """The exact length of ``text``'s audio at ``rate`` (lossless formats, speed 1)."""
    return resampled_length(token_count(text, voice) * SAMPLES_PER_TOKEN, MODEL_RATE, rate)


def decode(data: bytes, response_format: str, pcm_rate: int = 24000):
    """(sample rate, channels, sample count) of an audio file, decoded by FFmpeg (PyAV)."""
    if response_format == "pcm":
        return pcm_rate, 1, len(data) // 2
    with av.open(io.BytesIO(data), "r") as container:
        frames = list(container.decode(container.streams.audio[0]))
    return frames[0].sample_rate, frames[0].layout.nb_channels, sum(f.samples for f in frames)


def assert_length(response_format: str, rate: int, samples: int, text: str = TEXT) -> None:
    want = samples_at(rate, text)
    if response_format in LOSSY_SLACK:
        assert want <= samples <= want + LOSSY_SLACK[response_format] * rate // 24000
    else:
        assert samples == want


def max_difference(a: bytes, b: bytes) -> int:
    """Largest difference between two equally long PCM16 byte strings."""
    x, y = (np.frombuffer(v, "<i2").astype(int) for v in (a, b))
    return int(np.abs(x - y).max(initial=0))


def speech(gateway, **body: object) -> requests.Response:
    body = {"model": "tts-1", "voice": "luganda_female", "input": TEXT, **body}
    return requests.post(f"{gateway.url}/v1/audio/speech", json=body, timeout=60)


def sse_events(text: str) -> list[dict]:
    events = []
    for block in text.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            events.append(json.loads(block.removeprefix("data: ")))
    return events


@pytest.fixture
def client(gateway) -> openai.OpenAI:
    with openai.OpenAI(
        base_url=f"{gateway.url}/v1", api_key="anything", max_retries=0, timeout=60
    ) as sdk:
        yield sdk


# -- every format through the SDK ----------------------------------------------


@pytest.mark.parametrize("response_format", list(CONTENT_TYPES))
def test_create_returns_each_format(client, llm, response_format):
    response = client.audio.speech.create(
        model="tts-1", voice="luganda_female", input=TEXT, response_format=response_format
    )
    assert response.response.headers["content-type"] == CONTENT_TYPES[response_format]
    assert response.response.headers["x-sample-rate"] == "24000"
    rate, channels, samples = decode(response.content, response_format)
    # Ogg Opus is always decoded at 48 kHz, whatever rate it was encoded at.
    assert rate == (48000 if response_format == "opus" else 24000) and channels == 1
    assert_length(response_format, rate, samples)
    assert llm.stats()["completed"] == 2  # one completion per sentence


@pytest.mark.parametrize("response_format", list(CONTENT_TYPES))
def test_streaming_response_returns_each_format(client, llm, response_format):
    with client.audio.speech.with_streaming_response.create(
        model="tts-1-hd", voice="swahili_male", input=TEXT, response_format=response_format
    ) as response:
        assert response.headers["content-type"] == CONTENT_TYPES[response_format]
        data = b"".join(response.iter_bytes(1024))
    rate, channels, samples = decode(data, response_format)
    assert channels == 1
    want = resampled_length(token_count(TEXT, "swahili_male") * SAMPLES_PER_TOKEN, MODEL_RATE, rate)
    assert want <= samples <= want + LOSSY_SLACK.get(response_format, 0) * rate // 24000


def test_mp3_is_the_default_format(client, llm):
    response = client.audio.speech.create(model="tts-1", voice="luganda_female", input=TEXT)
    assert response.response.headers["content-type"] == "audio/mpeg"
    assert decode(response.content, "mp3")[:2] == (24000, 1)


def test_pcm_and_wav_byte_counts_are_exact(client, llm):
    pcm = client.audio.speech.create(
        model="tts-1", voice="luganda_female", input=TEXT, response_format="pcm"
    )
    assert len(pcm.content) == 2 * samples_at(24000)
    wav = client.audio.speech.create(
        model="tts-1", voice="luganda_female", input=TEXT, response_format="wav"
    )
    assert wav.content[:4] == b"RIFF" and wav.content[36:40] == b"data"
    # The same samples behind a 44-byte header (batched decoding may flip an LSB).
    assert len(wav.content) == 44 + len(pcm.content)
    assert max_difference(wav.content[44:], pcm.content) <= 2


@pytest.mark.parametrize("rate", [16000, 22050, 44100, 48000])
@pytest.mark.parametrize("response_format", ["pcm", "flac", "mp3"])
def test_sample_rate_option(client, llm, rate, response_format):
    response = client.audio.speech.create(
        model="tts-1",
        voice="luganda_female",
        input=TEXT,
        response_format=response_format,
        extra_body={"sample_rate": rate},
    )
    assert response.response.headers["x-sample-rate"] == str(rate)
    got_rate, channels, samples = decode(response.content, response_format, pcm_rate=rate)
    assert (got_rate, channels) == (rate, 1)
    assert_length(response_format, rate, samples)


def test_pcm_at_16k_equals_the_native_stream(gateway, llm):
    """At the model's rate and speed 1 nothing is resampled or stretched."""
    native = requests.post(
        f"{gateway.url}/v1/audio/speech/stream",
        json={"text": TEXT, "voice": "luganda_female"},
        timeout=60,
    )
    openai_pcm = speech(gateway, response_format="pcm", sample_rate=16000, speed=1.0)
    assert openai_pcm.status_code == 200
    assert len(openai_pcm.content) == len(native.content)
    assert max_difference(openai_pcm.content, native.content) <= 1


# -- speed ---------------------------------------------------------------------


@pytest.mark.parametrize(("speed", "response_format"), [(2.0, "pcm"), (2.0, "mp3"), (0.5, "wav")])
def test_speed_scales_the_duration(client, llm, speed, response_format):
    response = client.audio.speech.create(
        model="tts-1",
        voice="luganda_female",
        input=TEXT,
        response_format=response_format,
        speed=speed,
    )
    rate, _, samples = decode(response.content, response_format)
    want = samples_at(rate) / speed
    slack = LOSSY_SLACK.get(response_format, 0)
    assert 0.95 * want <= samples <= 1.05 * want + slack


# -- server-sent events ----------------------------------------------------------


@pytest.mark.parametrize("response_format", ["pcm", "mp3"])
def test_sse_events_carry_the_file(client, llm, response_format):
    with client.audio.speech.with_streaming_response.create(
        model="tts-1",
        voice="luganda_female",
        input=TEXT,
        response_format=response_format,
        stream_format="sse",
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response.read().decode())
    deltas, done = events[:-1], events[-1]
    assert deltas and all(set(e) == {"type", "audio"} for e in deltas)
    assert {e["type"] for e in deltas} == {"speech.audio.delta"}
    data = b"".join(base64.b64decode(e["audio"]) for e in deltas)
    tokens = token_count(TEXT)
    assert done == {
        "type": "speech.audio.done",
        "usage": {
            "input_tokens": len(TEXT),
            "output_tokens": tokens,
            "total_tokens": len(TEXT) + tokens,
        },
    }
    if response_format == "pcm":
        assert len(data) == 2 * samples_at(24000)
    else:
        rate, _, samples = decode(data, response_format)
        assert_length(response_format, rate, samples)


def test_sse_mid_stream_failure_is_an_error_event(gateway, llm):
    llm.control(error_after_tokens=30, tokens_per_s=400)
    response = speech(gateway, input=LONG_SENTENCE, stream_format="sse", response_format="pcm")
    assert response.status_code == 200
    events = sse_events(response.text)
    assert events[0]["type"] == "speech.audio.delta"
    assert events[-1]["type"] == "error"
    assert events[-1]["error"]["type"] == "server_error"
    assert "vLLM failed mid-stream" in events[-1]["error"]["message"]
    assert all(e["type"] != "speech.audio.done" for e in events)


# -- streaming behaviour -------------------------------------------------------


@pytest.mark.parametrize("response_format", list(CONTENT_TYPES))
def test_audio_arrives_while_it_is_generated(gateway, llm, response_format):
    """The first bytes come while the LLM is still writing the sentence (no timing)."""
    llm.control(tokens_per_s=50)  # 90 tokens of speech take 1.8 s to write
    body = {"model": "tts-1", "input": LONG_SENTENCE, "response_format": response_format}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", f"{gateway.url}/v1/audio/speech", json=body) as response:
            assert response.status_code == 200
            chunks = response.iter_bytes()
            next(chunks)
            stats = llm.stats()
            rest = b"".join(chunks)
    assert stats["running"] == 1 and stats["completed"] == 0, stats
    assert len(rest) > 0


def test_mid_stream_failure_breaks_the_audio_response(gateway, llm):
    llm.control(error_after_tokens=30, tokens_per_s=400)
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        response = requests.post(
            f"{gateway.url}/v1/audio/speech",
            json={"model": "tts-1", "input": LONG_SENTENCE, "response_format": "mp3"},
            stream=True,
            timeout=30,
        )
        assert response.status_code == 200
        for _ in response.iter_content(4096):
            pass


def test_client_disconnect_aborts_the_upstream_request(gateway, llm):
    llm.control(tokens_per_s=50)
    with httpx.Client(timeout=30) as http:
        with http.stream(
            "POST",
            f"{gateway.url}/v1/audio/speech",
            json={"model": "tts-1", "input": LONG_SENTENCE, "response_format": "opus"},
        ) as response:
            assert response.status_code == 200
            next(response.iter_bytes())
    stats = llm.wait_for(lambda s: s["running"] == 0 and s["aborted"] >= 1, timeout=10)
    assert stats["aborted"] >= 1 and stats["completed"] == 0
    llm.control(tokens_per_s=2000)
    assert speech(gateway, response_format="pcm").status_code == 200  # the slot came back


# -- voices, models, extras ------------------------------------------------------


def prompt_speaker(llm) -> str:
    return llm.stats()["last_request"]["prompt"].split("<|start_content|>")[1].split(":")[0]


def test_openai_voice_names_speak_with_the_default_voice(client, llm):
    client.audio.speech.create(model="tts-1", voice="alloy", input="Oli otya?")
    assert prompt_speaker(llm) == "248"  # luganda_female, the default


def test_voice_object_and_instructions(client, llm):
    response = client.audio.speech.create(
        model="gpt-4o-mini-tts",
        voice={"id": "acholi_female"},
        input="Oli otya?",
        instructions="Speak cheerfully.",  # accepted, ignored
        response_format="pcm",
    )
    assert prompt_speaker(llm) == "241"
    assert len(response.content) == 2 * samples_at(24000, "Oli otya?", "acholi_female")


def test_temperature_extension_is_sent(client, llm):
    client.audio.speech.create(
        model="tts-1", voice="ateso_female", input="Oli otya?", extra_body={"temperature": 0.3}
    )
    assert llm.stats()["last_request"]["temperature"] == 0.3


def test_models_are_listed(client):
    assert [m.id for m in client.models.list()] == ["spark-tts", "tts-1", "tts-1-hd"]


def test_audio_voices_and_models(gateway):
    voices = requests.get(f"{gateway.url}/v1/audio/voices", timeout=10).json()
    assert voices["default_voice"] == "luganda_female"
    assert {v["id"] for v in voices["voices"]} == set(VOICES.ids)
    luganda = next(v for v in voices["voices"] if v["id"] == "luganda_female")
    assert luganda == {
        "id": "luganda_female",
        "name": "Luganda (female)",
        "speaker_id": 248,
        "language": "Luganda",
        "gender": "female",
        "cloned": False,
    }
    models = requests.get(f"{gateway.url}/v1/audio/models", timeout=10).json()["models"]
    assert [m["id"] for m in models] == ["spark-tts", "tts-1", "tts-1-hd"]


# -- bad requests ----------------------------------------------------------------


def test_unknown_voice_is_400_listing_the_voices(client, llm):
    with pytest.raises(openai.BadRequestError) as caught:
        client.audio.speech.create(model="tts-1", voice="klingon", input="Oli otya?")
    err = caught.value
    assert err.status_code == 400
    assert err.body == {
        "message": err.body["message"],
        "type": "invalid_request_error",
        "param": "voice",
        "code": "voice_not_found",
    }
    assert "unknown voice 'klingon'" in err.message
    assert all(voice in err.message for voice in VOICES.ids)
    assert llm.stats()["received"] == 0


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"input": "x" * 4097}, "input", "4096"),
        ({"input": ""}, "input", "at least 1"),
        ({"input": "  \n "}, "input", "input is empty"),
        ({"response_format": "ogg"}, "response_format", "'mp3', 'opus', 'aac'"),
        ({"speed": 4.5}, "speed", "less than or equal to 4"),
        ({"speed": 0.1}, "speed", "greater than or equal to 0.25"),
        ({"stream_format": "chunks"}, "stream_format", "'audio' or 'sse'"),
        ({"response_format": "opus", "sample_rate": 44100}, "sample_rate", "16000, 24000"),
        ({"sample_rate": 12345}, "sample_rate", "use one of 8000"),
        ({"temperature": 3}, "temperature", "less than or equal to 2"),
        ({"voice": 5}, "voice", "string"),
    ],
)
def test_bad_requests_are_400_naming_the_param(gateway, llm, body, param, message):
    response = speech(gateway, **body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert message in error["message"]
    assert llm.stats()["received"] == 0


def test_llm_errors_before_the_audio_are_http_errors(client, llm):
    llm.control(fail_before_stream=500)
    with pytest.raises(openai.APIStatusError) as caught:
        client.audio.speech.create(model="tts-1", voice="luganda_female", input="Oli otya?")
    assert caught.value.status_code == 502
    assert caught.value.body["type"] == "server_error"
