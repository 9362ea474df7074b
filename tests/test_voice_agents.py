"""Voice agents: text streamed in over WS /v1/audio/speech/stream (vLLM-Omni's
messages), OpenAI voice aliases, and segment timings on the seed WebSocket.

Real gateway processes on loopback against the stand-in LLM (whose audio length per
sentence is known in advance), with real WebSocket and HTTP clients.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import random
import subprocess
import sys
import time
import wave

import pytest
import requests
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect

from decoder_gateway.llm.prompt import speaker_prompt
from decoder_gateway.text import split_segments
from decoder_gateway.voices.catalog import VoiceCatalog
from devtools.paths import REPO
from devtools.standin_llm import expected_semantic_count

VOICES = VoiceCatalog.load()
PATH = "/v1/audio/speech/stream"
REPLY = (
    "Habari yako rafiki yangu? Nzuri sana, asante kwa kuuliza. "
    "Leo tutazungumza kuhusu hali ya hewa, kilimo, na soko la mji."
)


def sentence_bytes(text: str, voice: str = "swahili_male") -> int:
    """PCM16 bytes the stand-in's tokens make for one sentence."""
    return 2 * 320 * expected_semantic_count(speaker_prompt(VOICES.resolve(voice), text))


def fragments(text: str, rng: random.Random) -> list[str]:
    """``text`` cut at random places (pieces of 0 to 8 characters, words split)."""
    pieces, position = [], 0
    while position < len(text):
        size = rng.randint(0, 8)
        pieces.append(text[position : position + size])
        position += size
    return pieces


def collect(ws: ClientConnection, until: str = "session.done") -> tuple[list[dict], list[bytes]]:
    """JSON frames and binary frames until a frame of type ``until`` (or an error)."""
    frames: list[dict] = []
    binary: list[bytes] = []
    while True:
        message = ws.recv(timeout=30)
        if isinstance(message, bytes):
            binary.append(message)
            continue
        frames.append(json.loads(message))
        if frames[-1]["type"] == until:
            return frames, binary


def config(ws: ClientConnection, **fields: object) -> None:
    ws.send(json.dumps({"type": "session.config", **fields}))


def send_text(ws: ClientConnection, text: str) -> None:
    ws.send(json.dumps({"type": "input.text", "text": text}))


def done(ws: ClientConnection) -> None:
    ws.send(json.dumps({"type": "input.done"}))


# -- streaming text in ---------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_any_fragmentation_gives_the_whole_texts_sentences_and_audio(gateway, llm, seed):
    expected = split_segments(REPLY, max_chars=300)
    with ws_connect(f"{gateway.ws_url}{PATH}") as ws:
        config(ws, voice="swahili_male", response_format="pcm", stream_audio=True)
        for piece in fragments(REPLY, random.Random(seed)):
            send_text(ws, piece)
        done(ws)
        frames, binary = collect(ws)
    starts = [f for f in frames if f["type"] == "audio.start"]
    dones = [f for f in frames if f["type"] == "audio.done"]
    assert [f["sentence_text"] for f in starts] == expected
    assert [f["sentence_index"] for f in starts] == list(range(len(expected)))
    assert all(f["utterance_index"] == 0 and f["format"] == "pcm" for f in starts)
    assert [f["total_bytes"] for f in dones] == [sentence_bytes(t) for t in expected]
    assert not any(f["error"] for f in dones)
    assert sum(map(len, binary)) == sum(sentence_bytes(t) for t in expected)
    assert len(binary) > len(expected)  # token-level chunks, not one frame per sentence
    # Timings: contiguous, in seconds of the utterance's audio.
    assert dones[0]["start_s"] == 0.0
    for before, after in itertools.pairwise(dones):
        assert after["start_s"] == pytest.approx(before["end_s"])
    assert dones[-1]["end_s"] == pytest.approx(sum(map(len, binary)) / 2 / 16000)
    assert frames[-1] == {"type": "session.done", "utterance_index": 0, "total_sentences": 3}
    prompts = [r["prompt"] for r in llm.stats()["requests"]]
    assert all("246: " in p for p in prompts[-3:])  # the configured voice, every sentence


def test_a_sentence_is_spoken_before_the_utterance_ends(gateway, llm):
    with ws_connect(f"{gateway.ws_url}{PATH}") as ws:
        config(ws, response_format="pcm", stream_audio=True)
        send_text(ws, "Habari yako? Nzu")
        start = json.loads(ws.recv(timeout=30))
        assert start["type"] == "audio.start" and start["sentence_text"] == "Habari yako?"
        assert isinstance(ws.recv(timeout=30), bytes)  # audio before input.done
        send_text(ws, "ri sana.")
        done(ws)
        frames, _ = collect(ws)
    texts = [f["sentence_text"] for f in frames if f["type"] == "audio.start"]
    assert texts == ["Nzuri sana."]


def test_text_after_a_failed_utterance_is_dropped_and_the_session_goes_on(gateway, llm):
    """The LLM fails an utterance's first sentence while its client is still writing it:
    the client gets the error and session.done; the rest of that utterance's text, up to
    its input.done, is dropped (no second session.done), and the next one speaks."""
    llm.control(error_after_tokens=3, fault_match="Habari")
    with ws_connect(f"{gateway.ws_url}{PATH}") as ws:
        config(ws, voice="swahili_male", response_format="pcm", stream_audio=True)
        send_text(ws, "Habari yako? Nzu")  # the first sentence is released
        frames, _ = collect(ws)
        assert [f["type"] for f in frames if f["type"] != "audio.start"][-3:] == [
            "audio.done",
            "error",
            "session.done",
        ]
        assert frames[-1]["utterance_index"] == 0
        send_text(ws, "ri sana. Asante kwa ")  # still utterance 0 for the client
        send_text(ws, "kuuliza.")
        done(ws)
        send_text(ws, "Tuonane kesho.")
        done(ws)
        frames, binary = collect(ws)
    assert [f["type"] for f in frames] == ["audio.start", "audio.done", "session.done"]
    assert frames[0]["sentence_text"] == "Tuonane kesho."
    assert frames[-1] == {"type": "session.done", "utterance_index": 1, "total_sentences": 1}
    assert sum(map(len, binary)) == sentence_bytes("Tuonane kesho.")


def test_wav_sentences_are_whole_wav_files_and_utterances_follow_each_other(gateway, llm):
    with ws_connect(f"{gateway.ws_url}{PATH}") as ws:
        config(ws, voice="acholi_female")  # vLLM-Omni's defaults: wav, whole sentences
        for utterance in ("Apwoyo matek. Itye nining?", "Apwoyo."):
            send_text(ws, utterance)
            done(ws)
        first, first_audio = collect(ws)
        second, second_audio = collect(ws)
    assert first[-1] == {"type": "session.done", "utterance_index": 0, "total_sentences": 2}
    assert second[-1] == {"type": "session.done", "utterance_index": 1, "total_sentences": 1}
    assert len(first_audio) == 2 and len(second_audio) == 1  # one frame per sentence
    for frame, text in zip(first_audio, ["Apwoyo matek.", "Itye nining?"], strict=True):
        with wave.open(io.BytesIO(frame)) as wav:
            assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (16000, 1, 2)
            assert wav.getnframes() * 2 == sentence_bytes(text, "acholi_female")


def test_config_while_text_is_buffered_is_refused_and_the_text_kept(gateway, llm):
    with ws_connect(f"{gateway.ws_url}{PATH}") as ws:
        config(ws, response_format="pcm")
        send_text(ws, "Habari")
        config(ws, voice="acholi_female")
        error = json.loads(ws.recv(timeout=10))
        assert error["type"] == "error" and "input.done" in error["message"]
        send_text(ws, " yako?")
        done(ws)
        frames, _ = collect(ws)
        assert [f["sentence_text"] for f in frames if f["type"] == "audio.start"] == [
            "Habari yako?"
        ]
        # Between utterances a new configuration is taken.
        config(ws, voice="acholi_female", response_format="pcm")
        send_text(ws, "Apwoyo.")
        done(ws)
        collect(ws)
    assert "241: Apwoyo." in llm.stats()["requests"][-1]["prompt"]


def test_bad_messages_and_limits_get_error_frames_and_the_session_goes_on(make_gateway, llm):
    gateway = make_gateway(MAX_TEXT_CHARS="200", MAX_SEGMENT_CHARS="100")
    with ws_connect(f"{gateway.ws_url}{PATH}") as ws:
        ws.send("{not json")
        assert json.loads(ws.recv(timeout=10))["code"] == "invalid_json"
        ws.send(json.dumps({"type": "input.nonsense"}))
        assert json.loads(ws.recv(timeout=10))["code"] == "invalid_message"
        config(ws, voice="nobody")
        assert json.loads(ws.recv(timeout=10))["code"] == "voice_not_found"
        config(ws, speed=9)
        assert json.loads(ws.recv(timeout=10))["code"] == "invalid_request"
        config(ws, response_format="pcm")
        send_text(ws, "Habari yako? ")
        send_text(ws, "x" * 300)  # the utterance would pass MAX_TEXT_CHARS
        frames, _ = collect(ws, until="error")
        assert frames[-1]["code"] == "invalid_request" and "limit" in frames[-1]["message"]
        send_text(ws, "Nzuri <|end_content|> sana. Asante")  # prompt markup: refused
        before_error, _ = collect(ws, until="error")
        assert "<|end_content|>" in before_error[-1]["message"]
        done(ws)
        frames, _ = collect(ws)
        frames = before_error + frames
        spoken = [f["sentence_text"] for f in frames if f["type"] == "audio.start"]
        assert spoken == ["Habari yako?", "Asante"]
        assert frames[-1]["total_sentences"] == 2


def test_a_client_that_leaves_mid_utterance_cancels_its_generation(gateway, llm):
    llm.control(tokens_per_s=50)
    with ws_connect(f"{gateway.ws_url}{PATH}") as ws:
        config(ws, response_format="pcm", stream_audio=True)
        send_text(ws, "Habari yako rafiki yangu mpendwa sana? Nzuri")
        assert json.loads(ws.recv(timeout=30))["type"] == "audio.start"
        assert llm.wait_for(lambda s: s["running"] >= 1, 10)
    stats = llm.wait_for(lambda s: s["running"] == 0, 10)
    assert stats["aborted"] >= 1


def test_an_idle_session_is_closed(make_gateway, llm):
    gateway = make_gateway(WS_IDLE_TIMEOUT_S="1")
    with ws_connect(f"{gateway.ws_url}{PATH}") as ws:
        config(ws, response_format="pcm")
        send_text(ws, "Habari yako?")
        done(ws)
        collect(ws)  # playing is not idle
        started = time.monotonic()
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=10)
        assert ws.close_code == 1000 and time.monotonic() - started < 5


def test_session_close_finishes_the_utterance_then_closes(gateway, llm):
    with ws_connect(f"{gateway.ws_url}{PATH}") as ws:
        config(ws, response_format="pcm")
        send_text(ws, "Habari yako?")
        ws.send(json.dumps({"type": "session.close"}))
        frames, _ = collect(ws)
        assert frames[-1]["total_sentences"] == 1
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=10)
        assert ws.close_code == 1000


# -- OpenAI voice aliases ------------------------------------------------------------


def test_voice_aliases_on_every_endpoint(make_gateway, llm):
    gateway = make_gateway(VOICE_ALIASES="alloy=swahili_male,echo=acholi_female")
    response = requests.post(
        f"{gateway.url}/v1/audio/speech",
        json={"input": "Habari yako?", "voice": "alloy", "response_format": "pcm"},
        timeout=30,
    )
    assert response.status_code == 200
    assert "246: Habari yako?" in llm.stats()["requests"][-1]["prompt"]
    response = requests.post(
        f"{gateway.url}/v1/audio/speech/stream",
        json={"text": "Apwoyo.", "voice": "echo"},
        timeout=30,
    )
    assert response.status_code == 200
    assert "241: Apwoyo." in llm.stats()["requests"][-1]["prompt"]
    # Unmapped OpenAI names still speak with the default voice on the OpenAI endpoint.
    response = requests.post(
        f"{gateway.url}/v1/audio/speech",
        json={"input": "Oli otya?", "voice": "nova", "response_format": "pcm"},
        timeout=30,
    )
    assert response.status_code == 200
    assert "248: Oli otya?" in llm.stats()["requests"][-1]["prompt"]
    listed = requests.get(f"{gateway.url}/v1/audio/voices", timeout=10).json()
    assert listed["aliases"] == {"alloy": "swahili_male", "echo": "acholi_female"}


@pytest.mark.parametrize(
    ("aliases", "named"),
    [("alloy=klingon", "klingon"), ("alloy", "alloy"), ("luganda_female=swahili_male", "packaged")],
)
def test_a_bad_alias_stops_the_start_naming_it(aliases, named, tmp_path):
    done_ = subprocess.run(
        [sys.executable, "-m", "decoder_gateway"],
        cwd=REPO,
        env={**os.environ, "VOICE_ALIASES": aliases, "VOICE_LIBRARY_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done_.returncode != 0 and "Traceback" not in done_.stderr
    assert "VOICE_ALIASES" in done_.stderr and named in done_.stderr


# -- segment timings on the seed WebSocket -------------------------------------------


def test_seed_websocket_timestamps(gateway, llm):
    text = "Oli otya? Nze bulungi nnyo. Webale kunjogerako."
    with ws_connect(f"{gateway.ws_url}/v1/audio/speech/stream/ws") as ws:
        ws.send(json.dumps({"input": text, "segment_id": "a", "timestamps": True}))
        frames, binary = collect(ws, until="end")
        ws.send(json.dumps({"input": "Oli otya?", "segment_id": "b"}))
        plain, _ = collect(ws, until="end")
    segments = [f for f in frames if f["type"] == "segment"]
    assert [s["text"] for s in segments] == split_segments(text)
    assert [s["index"] for s in segments] == [0, 1, 2] and segments[0]["start_s"] == 0.0
    for before, after in itertools.pairwise(segments):
        assert after["start_s"] == pytest.approx(before["end_s"])
    end = frames[-1]
    assert segments[-1]["end_s"] == pytest.approx(end["duration_s"])
    assert sum(map(len, binary)) == end["samples"] * 2
    # Each segment frame follows that segment's last audio: its end matches the audio so far.
    assert [f["type"] for f in plain] == ["start", "end"]  # nothing new unless asked


def test_auth_messages_on_the_text_stream_are_answered_as_on_the_seed_websocket(make_gateway, llm):
    gateway = make_gateway(GATEWAY_API_KEY="secret")
    headers = {"Authorization": "Bearer secret"}
    with ws_connect(f"{gateway.ws_url}{PATH}", additional_headers=headers) as ws:
        ws.send(json.dumps({"type": "auth", "api_key": "wrong"}))
        assert json.loads(ws.recv(timeout=10))["code"] == "invalid_api_key"
        ws.send(json.dumps({"type": "auth", "api_key": "secret"}))
        assert json.loads(ws.recv(timeout=10)) == {"type": "auth", "status": "ok"}
        config(ws, response_format="pcm")
        send_text(ws, "Habari yako?")
        done(ws)
        assert collect(ws)[0][-1]["total_sentences"] == 1  # the connection was kept
