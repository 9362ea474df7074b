"""The gateway against the real vLLM OpenAI server (CPU build, tiny Spark-format LM).

The tiny model writes a fixed chain of semantic tokens after
``<|start_semantic_token|>``, so every byte count and even the audio itself are
known in advance.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time

import httpx
import numpy as np
import pytest
import requests
import websockets

from decoder_gateway.audio.pcm import to_pcm16
from decoder_gateway.codec import load_decoder
from decoder_gateway.voices.catalog import VoiceCatalog
from devtools import tiny_spark_lm as tiny
from devtools.gateway_server import GOLDEN_BICODEC, GatewayServer

pytestmark = pytest.mark.vllm

TOKENS_PER_SEGMENT = tiny.DEFAULT_SEMANTIC_LENGTH
BYTES_PER_SEGMENT = TOKENS_PER_SEGMENT * 320 * 2
THREE_SENTENCES = "Oli otya? Nze bulungi nnyo. Webale kunjogerako."


@pytest.fixture(scope="module")
def vllm_gateway(vllm_server, tmp_path_factory):
    with GatewayServer(
        vllm_server.base_url,
        tmp_path_factory.mktemp("gw_vllm"),
        MODEL_NAME=vllm_server.served_model_name,
    ) as server:
        yield server


def metric(text: str, name: str) -> float:
    """Sum of a Prometheus metric's samples (all label sets)."""
    pattern = re.compile(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", re.MULTILINE)
    return sum(float(v) for v in pattern.findall(text))


def test_health_checks_vllm_and_token_ids(vllm_gateway):
    response = requests.get(f"{vllm_gateway.url}/health", timeout=10)
    assert response.status_code == 200, response.text


def test_http_stream_bytes_match_the_tokens_vllm_wrote(vllm_gateway):
    response = requests.post(
        f"{vllm_gateway.url}/v1/audio/speech/stream",
        json={"text": THREE_SENTENCES, "voice": "luganda_female", "temperature": 0.8},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    assert response.headers["x-sample-rate"] == "16000"
    assert len(response.content) == 3 * BYTES_PER_SEGMENT


def test_audio_equals_offline_decode_of_vllm_tokens(vllm_server, tmp_path):
    with GatewayServer(
        vllm_server.base_url,
        tmp_path,
        MODEL_NAME=vllm_server.served_model_name,
        STREAM_FIRST_LOOKAHEAD_TOKENS="67",
    ) as gateway:
        response = requests.post(
            f"{gateway.url}/v1/audio/speech/stream",
            json={"text": "Oli otya?", "speaker_id": 246},
            timeout=120,
        )
    assert response.status_code == 200
    voice = VoiceCatalog.load().resolve(speaker_id=246)
    decoder = load_decoder(GOLDEN_BICODEC)
    expected = np.frombuffer(
        to_pcm16(decoder.decode(tiny.expected_semantic_values(), voice.global_tokens)), "<i2"
    )
    got = np.frombuffer(response.content, "<i2")
    assert got.shape == expected.shape
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1


async def test_websocket_several_messages_in_order(vllm_gateway):
    async with websockets.connect(f"{vllm_gateway.ws_url}/v1/audio/speech/stream/ws") as ws:
        for segment_id, (text, sentences) in enumerate(
            [("Oli otya? Nze bulungi.", 2), ("Habari yako?", 1)]
        ):
            await ws.send(
                json.dumps(
                    {
                        "input": text,
                        "voice": "swahili_male",
                        "segment_id": segment_id,
                        "continue": True,
                    }
                )
            )
            kinds, audio = [], 0
            while True:
                frame = await asyncio.wait_for(ws.recv(), timeout=120)
                if isinstance(frame, bytes):
                    kinds.append("audio")
                    audio += len(frame)
                    continue
                message = json.loads(frame)
                kinds.append(message["type"])
                if message["type"] in ("end", "error"):
                    break
            assert kinds[0] == "start" and kinds[-1] == "end", kinds
            assert set(kinds[1:-1]) == {"audio"} and len(kinds) > 3  # streamed in chunks
            assert audio == sentences * BYTES_PER_SEGMENT
            assert message["samples"] * 2 == audio
        await ws.send(json.dumps({"input": "", "continue": False}))
        with pytest.raises(websockets.ConnectionClosedOK):
            await asyncio.wait_for(ws.recv(), timeout=10)


def test_concurrent_clients(vllm_gateway):
    """Three clients at once, each as a well-behaved client does: a refusal for capacity
    (vLLM on two CPU cores keeps few streams in real time) is retried after the
    Retry-After it names, and every client ends with all of its audio."""
    results: dict[int, requests.Response] = {}

    def run(i: int) -> None:
        deadline = time.monotonic() + 150
        while True:
            response = requests.post(
                f"{vllm_gateway.url}/v1/audio/speech/stream",
                json={"text": f"Ekigambo {i}. Ekirala.", "speaker_id": 241 + i},
                timeout=180,
            )
            if response.status_code != 429 or time.monotonic() > deadline:
                break
            time.sleep(float(response.headers["Retry-After"]))
        results[i] = response

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for response in results.values():
        assert response.status_code == 200
        assert len(response.content) == 2 * BYTES_PER_SEGMENT


def test_a_client_leaving_stops_the_work_in_vllm(vllm_server, tmp_path):
    """A hundred sentences asked, the client gone after the first audio: vLLM soon runs
    nothing and writes a small part of them after that.

    Every sentence may run ahead of playback here (SEGMENT_LOOKAHEAD), so a gateway that
    went on would have vLLM write them all back to back. How many it writes before the
    gateway sees the client gone (at its next send) is timing, hence the wide bound.
    Whether one is still inside
    vLLM when the client leaves is timing: the tiny model writes a sentence in a fraction
    of a second, and the gateway reads its tokens as they come, so vLLM may be done with
    the sentence whose tokens are still on their way. The abort itself, at once, is
    tested against the stand-in (test_gateway.py, test_barge_in.py)."""
    sentences = 100
    text = " ".join(f"Sentensi {i}." for i in range(sentences))
    with (
        GatewayServer(
            vllm_server.base_url,
            tmp_path,
            MODEL_NAME=vllm_server.served_model_name,
            SEGMENT_LOOKAHEAD=str(sentences),
        ) as gateway,
        httpx.Client(timeout=120) as client,
    ):
        # Warm: a cold decoder's first chunk can take longer than a sentence's tokens.
        warm_up = client.post(f"{gateway.url}/v1/audio/speech/stream", json={"text": "Oli?"})
        assert warm_up.status_code == 200
        before = metric(
            client.get(f"{vllm_server.url}/metrics").text, "vllm:generation_tokens_total"
        )
        with client.stream(
            "POST", f"{gateway.url}/v1/audio/speech/stream", json={"text": text}
        ) as response:
            assert response.status_code == 200
            request_id = response.headers["x-request-id"]
            next(response.iter_bytes())  # first audio, then leave
        at_leaving = metric(
            client.get(f"{vllm_server.url}/metrics").text, "vllm:generation_tokens_total"
        )
        # Until vLLM runs nothing and its count of tokens has settled for a second.
        settled, last, deadline = 0, -1.0, time.monotonic() + 60
        while time.monotonic() < deadline and settled < 5:
            metrics = client.get(f"{vllm_server.url}/metrics").text
            generated = metric(metrics, "vllm:generation_tokens_total") - before
            running = metric(metrics, "vllm:num_requests_running")
            settled = settled + 1 if running == 0 and generated == last else 0
            last = generated
            time.sleep(0.2)
    assert settled >= 5, (running, generated)
    after_leaving = before + generated - at_leaving
    assert after_leaving <= sentences // 5 * (TOKENS_PER_SEGMENT + 1), after_leaving
    log = vllm_server.log_path.read_text(errors="replace")
    sent = set(re.findall(rf"Received request cmpl-{request_id}-(\d+)-", log))
    assert 1 <= len(sent) < sentences, sorted(sent)


def test_streamed_in_text_against_real_vllm(vllm_gateway):
    """Text fed word by word over WS /v1/audio/speech/stream (vLLM-Omni's messages):
    the whole text's sentences, each with the audio of the tokens vLLM wrote."""
    from websockets.sync.client import connect

    from decoder_gateway.text import split_segments

    words = THREE_SENTENCES.split(" ")
    fragments = [word + " " for word in words[:-1]] + [words[-1]]
    config = {"response_format": "pcm", "stream_audio": True, "voice": "luganda_female"}
    with connect(f"{vllm_gateway.ws_url}/v1/audio/speech/stream") as ws:
        ws.send(json.dumps({"type": "session.config", **config}))
        for fragment in fragments:
            ws.send(json.dumps({"type": "input.text", "text": fragment}))
        ws.send(json.dumps({"type": "input.done"}))
        frames, audio = [], 0
        while not frames or frames[-1]["type"] != "session.done":
            message = ws.recv(timeout=120)
            if isinstance(message, bytes):
                audio += len(message)
            else:
                frames.append(json.loads(message))
    starts = [f["sentence_text"] for f in frames if f["type"] == "audio.start"]
    assert starts == split_segments(THREE_SENTENCES)
    assert audio == 3 * BYTES_PER_SEGMENT
    assert frames[-1] == {"type": "session.done", "utterance_index": 0, "total_sentences": 3}
