"""Style requests end to end: a ``style`` (or OpenAI's ``instructions`` with the voice
``design``) in place of a voice, on every speech endpoint. Real gateway processes on
loopback against the stand-in LLM, real HTTP, OpenAI SDK and WebSocket clients.

The stand-in answers the controllable prompt with attribute tokens, 32 global tokens
that depend on the labels and the text, then speech (10 tokens per word), and it
records every prompt: a test knows the voice the first sentence must write, the
prompts the later sentences must get (that voice pinned) and the exact audio length.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping

import openai
import pytest
import requests
from pytest import TempPathFactory
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect

from decoder_gateway.llm.prompt import VoiceStyle, base_prompt, controllable_prompt
from decoder_gateway.text import split_segments
from devtools.gateway_server import GatewayServer
from devtools.standin_llm import StandinServer, expected_global_tokens, expected_semantic_count

HOP = 320  # samples per semantic token at 16 kHz
TEXT = "Oli otya leero? Nze bulungi nnyo. Webale nnyo mukwano."
STYLE = {"gender": "female", "pitch": "high", "speed": "moderate"}
VOICE_STYLE = VoiceStyle("female", "high", "moderate")
HEADER = "X-Voice-Global-Tokens"
SEED_WS = "/v1/audio/speech/stream/ws"
TEXT_WS = "/v1/audio/speech/stream"


@pytest.fixture(scope="module")
def style_gateway(
    standin_server: StandinServer, tmp_path_factory: TempPathFactory
) -> Iterator[GatewayServer]:
    """One gateway with VOICE_DESIGN=on for the module (never hurried: exact audio)."""
    with GatewayServer(
        standin_server.base_url,
        tmp_path_factory.mktemp("style_gateway"),
        MODEL_NAME="spark-tts",
        VOICE_DESIGN="on",
        STREAM_MIN_BUFFER_MS="0",
    ) as server:
        yield server


def expected(text: str = TEXT, style: VoiceStyle = VOICE_STYLE) -> tuple[list[int], list[str], int]:
    """The voice a style request of ``text`` gets, its prompts in order, its PCM bytes."""
    segments = split_segments(text)
    first = controllable_prompt(segments[0], style)
    tokens = expected_global_tokens(first)
    prompts = [first, *(base_prompt(segment, tokens) for segment in segments[1:])]
    samples = HOP * sum(expected_semantic_count(prompt) for prompt in prompts)
    return tokens, prompts, 2 * samples


def header_tokens(headers: Mapping[str, str]) -> list[int]:
    """The voice in a response's X-Voice-Global-Tokens header: 32 ints, comma separated."""
    value = headers[HEADER]
    tokens = [int(token) for token in value.split(",")]
    assert len(tokens) == 32 and all(0 <= t < 4096 for t in tokens)
    return tokens


def sent_prompts(llm: StandinServer) -> list[str]:
    return [r["prompt"] for r in llm.stats()["requests"]]


def post(gateway: GatewayServer, path: str, **body: object) -> requests.Response:
    return requests.post(f"{gateway.url}{path}", json=body, timeout=60)


def error_of(response: requests.Response) -> dict:
    return response.json()["error"]


def exchange(ws: ClientConnection, message: dict) -> tuple[list[dict], bytes]:
    """Seed WebSocket: JSON frames and audio of one message, until end or error."""
    ws.send(json.dumps(message))
    frames: list[dict] = []
    audio = bytearray()
    while True:
        frame = ws.recv(timeout=30)
        if isinstance(frame, bytes):
            audio += frame
            continue
        frames.append(json.loads(frame))
        if frames[-1]["type"] in ("end", "error"):
            return frames, bytes(audio)


def utterance(ws: ClientConnection, text: str, **config: object) -> list[dict | bytes]:
    """Text-in WebSocket: configure, send ``text`` in pieces, and every frame (JSON
    decoded, audio as bytes) up to session.done or an error."""
    if config:
        ws.send(json.dumps({"type": "session.config", **config}))
    for start in range(0, len(text), 7):
        ws.send(json.dumps({"type": "input.text", "text": text[start : start + 7]}))
    ws.send(json.dumps({"type": "input.done"}))
    frames: list[dict | bytes] = []
    while True:
        frame = ws.recv(timeout=30)
        frames.append(frame if isinstance(frame, bytes) else json.loads(frame))
        if isinstance(frames[-1], dict) and frames[-1]["type"] in ("session.done", "error"):
            return frames


def text_frame(ws: ClientConnection, message: dict) -> dict:
    ws.send(json.dumps(message))
    return json.loads(ws.recv(timeout=30))


# -- the four endpoints -------------------------------------------------------------------


def test_http_stream_designs_the_voice_pins_it_and_returns_it(style_gateway, llm):
    tokens, prompts, size = expected()
    response = post(style_gateway, "/v1/audio/speech/stream", text=TEXT, style=STYLE)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "audio/pcm"
    assert header_tokens(response.headers) == tokens
    assert len(response.content) == size
    # Sentence 1 with the controllable prompt, the later ones with its voice pinned
    # (the base model's plain prompt: no speaker id).
    assert sent_prompts(llm) == prompts
    assert prompts[0].startswith("<|task_controllable_tts|>")
    assert prompts[0].endswith(
        "<|start_style_label|><|gender_0|><|pitch_label_3|><|speed_label_2|><|end_style_label|>"
    )
    request_id = response.headers["x-request-id"]
    assert [r["request_id"] for r in llm.stats()["requests"]] == [
        f"{request_id}-{index}" for index in range(3)
    ]
    # Only the sentence that designs the voice is held to a design's shape.
    shapes = [list(r.get("structured_outputs", {})) for r in llm.stats()["requests"]]
    assert shapes == [["grammar"], [], []]
    # Other labels, another voice; an ordinary request has no such header.
    male = VoiceStyle("male", "very_low", "low")
    other = post(
        style_gateway,
        "/v1/audio/speech/stream",
        text=TEXT,
        style={"gender": "male", "pitch": "very_low", "speed": "low"},
    )
    assert header_tokens(other.headers) == expected(style=male)[0] != tokens
    plain = post(style_gateway, "/v1/audio/speech/stream", text="Oli otya?")
    assert plain.status_code == 200 and HEADER not in plain.headers


@pytest.mark.parametrize("stream_format", ["audio", "sse"])
def test_openai_speech_takes_a_style_with_the_voice_design(style_gateway, llm, stream_format):
    tokens, prompts, size = expected()
    response = post(
        style_gateway,
        "/v1/audio/speech",
        model="tts-1",
        voice="design",
        input=TEXT,
        style=STYLE,
        response_format="pcm",
        sample_rate=16000,
        stream_format=stream_format,
    )
    assert response.status_code == 200, response.text
    assert header_tokens(response.headers) == tokens
    assert sent_prompts(llm) == prompts
    if stream_format == "audio":
        assert len(response.content) == size
    else:
        events = [line for line in response.text.splitlines() if line.startswith("data:")]
        assert json.loads(events[-1][5:])["type"] == "speech.audio.done"


def test_openai_speech_without_a_voice_takes_a_style(style_gateway, llm):
    tokens = expected("Oli otya?")[0]
    response = post(
        style_gateway, "/v1/audio/speech", input="Oli otya?", style=STYLE, response_format="wav"
    )
    assert response.status_code == 200, response.text
    assert header_tokens(response.headers) == tokens and response.content[:4] == b"RIFF"


def test_openai_sdk_instructions_name_the_labels_with_the_voice_design(style_gateway, llm):
    client = openai.OpenAI(base_url=f"{style_gateway.url}/v1", api_key="unused", max_retries=0)
    raw = client.audio.speech.with_raw_response.create(
        model="tts-1",
        voice="design",
        input=TEXT,
        instructions="A deep male voice, speaking very slowly.",
        response_format="pcm",
        extra_body={"sample_rate": 16000},
    )
    male = VoiceStyle("male", "low", "very_low")
    tokens, prompts, size = expected(style=male)
    assert header_tokens(raw.headers) == tokens
    assert len(raw.content) == size
    assert sent_prompts(llm) == prompts
    assert "<|gender_1|><|pitch_label_1|><|speed_label_0|>" in prompts[0]

    # With any other voice, instructions are ignored, as before.
    llm.reset()
    plain = client.audio.speech.with_raw_response.create(
        model="tts-1", voice="alloy", input="Oli otya?", instructions="A deep male voice."
    )
    assert HEADER not in plain.headers
    assert "task_controllable_tts" not in sent_prompts(llm)[0]


def test_seed_websocket_start_frame_carries_the_voice(style_gateway, llm):
    tokens, prompts, size = expected()
    with ws_connect(f"{style_gateway.ws_url}{SEED_WS}") as ws:
        frames, audio = exchange(ws, {"input": TEXT, "style": STYLE, "segment_id": "a"})
        start, end = frames[0], frames[-1]
        assert [f["type"] for f in frames] == ["start", "end"]
        assert start["global_tokens"] == tokens
        assert start["voice"] == "style:female/high/moderate"
        assert start["segment_id"] == "a" and start["sample_rate"] == 16000
        assert len(audio) == size and end["samples"] == size // 2
        assert sent_prompts(llm) == prompts
        # The next message on the connection, with a voice: no global_tokens.
        frames, audio = exchange(ws, {"input": "Oli otya?", "segment_id": "b"})
        assert frames[0]["type"] == "start" and "global_tokens" not in frames[0]
        assert frames[-1]["type"] == "end" and audio


def test_text_in_websocket_first_audio_start_carries_each_utterances_voice(style_gateway, llm):
    second = "Habari yako rafiki? Nzuri sana."
    with ws_connect(f"{style_gateway.ws_url}{TEXT_WS}") as ws:
        for text, config in ((TEXT, {"style": STYLE, "response_format": "pcm"}), (second, {})):
            tokens, prompts, size = expected(text)
            llm.reset()
            frames = utterance(ws, text, **config)
            starts = [f for f in frames if isinstance(f, dict) and f["type"] == "audio.start"]
            assert len(starts) == len(prompts)
            # The first sentence's audio.start carries the voice and comes with its
            # first audio; the later ones carry nothing new.
            assert starts[0]["global_tokens"] == tokens and starts[0]["sentence_index"] == 0
            assert isinstance(frames[frames.index(starts[0]) + 1], bytes)
            assert all("global_tokens" not in s for s in starts[1:])
            assert sum(len(f) for f in frames if isinstance(f, bytes)) == size
            assert frames[-1] == {
                "type": "session.done",
                "utterance_index": frames[-1]["utterance_index"],
                "total_sentences": len(prompts),
            }
            assert sent_prompts(llm) == prompts
        # Back to a voice: no global_tokens anywhere.
        frames = utterance(ws, "Oli otya?", voice="luganda_female", response_format="pcm")
        assert frames[-1]["type"] == "session.done"
        assert not [f for f in frames if isinstance(f, dict) and "global_tokens" in f]


# -- keep the voice ------------------------------------------------------------------------


def test_the_returned_tokens_saved_as_a_voice_speak_the_same_voice(style_gateway, llm):
    styled = post(style_gateway, "/v1/audio/speech/stream", text=TEXT, style=STYLE)
    tokens = header_tokens(styled.headers)
    saved = post(
        style_gateway, "/v1/audio/voices", name="kept_style", global_tokens=tokens, gender="female"
    )
    assert saved.status_code == 201, saved.text
    try:
        llm.reset()
        spoken = post(style_gateway, "/v1/audio/speech/stream", text=TEXT, voice="kept_style")
        assert spoken.status_code == 200 and HEADER not in spoken.headers
        # Every sentence with the voice pinned, the first one included: the same tokens
        # and the same length as the style request's.
        segments = split_segments(TEXT)
        assert sent_prompts(llm) == [base_prompt(segment, tokens) for segment in segments]
        assert len(spoken.content) == len(styled.content)
        with ws_connect(f"{style_gateway.ws_url}{SEED_WS}") as ws:
            frames, audio = exchange(ws, {"input": "Oli otya?", "voice": "kept_style"})
            assert frames[-1]["type"] == "end" and audio
    finally:
        requests.delete(f"{style_gateway.url}/v1/audio/voices/kept_style", timeout=10)


# -- a first sentence that writes no valid voice ---------------------------------------------


def test_a_wrong_count_is_retried_once_before_any_audio(style_gateway, llm):
    llm.control(global_count=31, fault_requests=1)
    tokens, prompts, size = expected()
    response = post(style_gateway, "/v1/audio/speech/stream", text=TEXT, style=STYLE)
    assert response.status_code == 200, response.text
    assert header_tokens(response.headers) == tokens and len(response.content) == size
    sent = llm.stats()["requests"]
    assert [r["prompt"] for r in sent] == [prompts[0], *prompts]
    request_id = response.headers["x-request-id"]
    assert [r["request_id"] for r in sent[:2]] == [f"{request_id}-0", f"{request_id}-0-retry1"]


@pytest.mark.parametrize("count", [31, 33, 0])
def test_a_wrong_count_twice_is_an_explicit_error(style_gateway, llm, count):
    llm.control(global_count=count)
    response = post(style_gateway, "/v1/audio/speech/stream", text=TEXT, style=STYLE)
    assert response.status_code == 502, response.text
    error = error_of(response)
    assert error["code"] == "voice_design_failed"
    assert f"{count} global tokens then {count} global tokens" in error["message"]
    assert len(llm.stats()["requests"]) == 2  # one try, one retry; no later sentence
    with ws_connect(f"{style_gateway.ws_url}{SEED_WS}") as ws:
        frames, audio = exchange(ws, {"input": TEXT, "style": STYLE, "segment_id": 3})
        assert [f["type"] for f in frames] == ["error"] and audio == b""
        assert frames[0]["code"] == "voice_design_failed" and frames[0]["segment_id"] == 3
        llm.reset()
        frames, audio = exchange(ws, {"input": "Oli otya?", "style": STYLE})
        assert frames[-1]["type"] == "end" and frames[0]["global_tokens"]


# -- bad input ------------------------------------------------------------------------------

BAD_STREAM_BODIES = [
    ({"style": {**STYLE, "gender": "other"}}, "style.gender"),
    ({"style": {**STYLE, "pitch": "medium"}}, "style.pitch"),
    ({"style": {"gender": "male", "pitch": "low"}}, "style.speed"),
    ({"style": {**STYLE, "colour": "blue"}}, "style.colour"),
    ({"style": "female"}, "style"),
    ({"style": STYLE, "voice": "luganda_female"}, "voice"),
    ({"style": STYLE, "speaker_id": 248}, "speaker_id"),
    ({"style": STYLE, "ref_audio": "data:audio/wav;base64,AAAA"}, "ref_audio"),
]
BAD_OPENAI_BODIES = [
    ({"voice": "alloy", "style": STYLE}, "voice"),
    ({"voice": "luganda_female", "style": STYLE}, "voice"),
    ({"voice": "design", "style": {**STYLE, "speed": "fast"}}, "style.speed"),
    ({"voice": "design"}, "instructions"),
    ({"voice": "design", "instructions": "Speak cheerfully."}, "instructions"),
    ({"voice": "design", "instructions": "a man or a woman"}, "instructions"),
    ({"voice": "design", "instructions": "female, slow and fast"}, "instructions"),
]


def test_bad_labels_and_conflicting_fields_are_400_naming_the_field(style_gateway, llm):
    for body, param in BAD_STREAM_BODIES:
        response = post(style_gateway, "/v1/audio/speech/stream", text=TEXT, **body)
        assert response.status_code == 400, (body, response.text)
        assert error_of(response)["param"] == param, (body, response.json())
        assert param in error_of(response)["message"]
    for body, param in BAD_OPENAI_BODIES:
        response = post(style_gateway, "/v1/audio/speech", input=TEXT, **body)
        assert response.status_code == 400, (body, response.text)
        assert error_of(response)["param"] == param, (body, response.json())
    assert sent_prompts(llm) == []


def test_websockets_answer_bad_style_messages_with_an_error_frame_and_go_on(style_gateway, llm):
    with ws_connect(f"{style_gateway.ws_url}{SEED_WS}") as ws:
        for body, param in BAD_STREAM_BODIES:
            frames, _ = exchange(ws, {"input": TEXT, "segment_id": 5, **body})
            assert [f["type"] for f in frames] == ["error"], body
            assert frames[0]["code"] == "invalid_request" and frames[0]["segment_id"] == 5
            assert param in frames[0]["message"], (body, frames)
        frames, audio = exchange(ws, {"input": "Oli otya?", "style": STYLE})
        assert frames[-1]["type"] == "end" and audio
    llm.reset()
    with ws_connect(f"{style_gateway.ws_url}{TEXT_WS}") as ws:
        for body, param in BAD_STREAM_BODIES:
            frame = text_frame(ws, {"type": "session.config", **body})
            assert frame["type"] == "error" and frame["code"] == "invalid_request", body
            assert param in frame["message"], (body, frame)
        # The session kept its previous (default) configuration.
        frames = utterance(ws, "Oli otya?")
        assert frames[-1]["type"] == "session.done"
        assert "task_controllable_tts" not in sent_prompts(llm)[0]


# -- VOICE_DESIGN off ----------------------------------------------------------------------


def test_design_off_refuses_style_requests_with_501_and_keeps_websockets(gateway, llm):
    """``gateway``: the suite's gateway, VOICE_DESIGN off (the default)."""
    refused = [
        post(gateway, "/v1/audio/speech/stream", text=TEXT, style=STYLE),
        post(gateway, "/v1/audio/speech", input=TEXT, voice="design", style=STYLE),
        post(gateway, "/v1/audio/speech", input=TEXT, voice="design", instructions="a man"),
    ]
    for response in refused:
        assert response.status_code == 501, response.text
        error = error_of(response)
        assert error["code"] == "voice_design_unavailable"
        assert (
            "VOICE_DESIGN" in error["message"] and "SparkAudio/Spark-TTS-0.5B" in error["message"]
        )
    with ws_connect(f"{gateway.ws_url}{SEED_WS}") as ws:
        frames, audio = exchange(ws, {"input": TEXT, "style": STYLE, "segment_id": 1})
        assert [f["type"] for f in frames] == ["error"] and audio == b""
        assert frames[0]["code"] == "voice_design_unavailable" and frames[0]["segment_id"] == 1
        assert "VOICE_DESIGN" in frames[0]["message"]
        assert sent_prompts(llm) == []
        frames, audio = exchange(ws, {"input": "Oli otya?", "segment_id": 2})
        assert [f["type"] for f in frames] == ["start", "end"] and audio
    with ws_connect(f"{gateway.ws_url}{TEXT_WS}") as ws:
        frame = text_frame(ws, {"type": "session.config", "style": STYLE})
        assert frame["type"] == "error" and frame["code"] == "voice_design_unavailable"
        assert "VOICE_DESIGN" in frame["message"]
        frames = utterance(ws, "Oli otya?")
        assert frames[-1]["type"] == "session.done"
        assert isinstance(frames[1], bytes)
    assert all("task_controllable_tts" not in prompt for prompt in sent_prompts(llm))
