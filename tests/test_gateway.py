"""The gateway end to end: a real uvicorn process, real HTTP and WebSocket clients,
and the fault-injecting stand-in LLM (same wire format as vLLM) for what the real
server cannot be made to do. ``test_gateway_vllm.py`` runs against real vLLM."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import requests
import websockets

from decoder_gateway.audio.pcm import to_pcm16
from decoder_gateway.client import SpeechSocket
from decoder_gateway.codec import load_decoder
from decoder_gateway.llm.client import prompt_token_bound
from decoder_gateway.llm.prompt import speaker_prompt
from decoder_gateway.text import split_segments
from decoder_gateway.voices.catalog import VoiceCatalog
from devtools.gateway_server import GOLDEN_BICODEC
from devtools.standin_llm import expected_semantic_tokens

VOICES = VoiceCatalog.load()
SAMPLES_PER_TOKEN = 320
THREE_SENTENCES = "Oli otya? Nze bulungi nnyo. Webale kunjogerako."


def expected_tokens(text: str, voice: str = "luganda_female", max_tokens: int = 2048) -> list:
    """The stand-in's semantic tokens for each segment the gateway makes of ``text``."""
    v = VOICES.resolve(voice)
    return [
        expected_semantic_tokens(speaker_prompt(v, segment))[:max_tokens]
        for segment in split_segments(text)
    ]


def expected_bytes(text: str, **kwargs: object) -> int:
    return 2 * SAMPLES_PER_TOKEN * sum(len(t) for t in expected_tokens(text, **kwargs))


def speak(gateway, **body: object) -> requests.Response:
    return requests.post(f"{gateway.url}/v1/audio/speech/stream", json=body, timeout=60)


def error_of(response: requests.Response) -> str:
    return response.json()["error"]["message"]


# -- info endpoints ------------------------------------------------------------


def test_voices(gateway):
    voices = requests.get(f"{gateway.url}/v1/voices", timeout=10).json()["voices"]
    assert {(v["id"], v["speaker_id"]) for v in voices} == {
        ("acholi_female", 241),
        ("ateso_female", 242),
        ("runyankore_female", 243),
        ("lugbara_female", 245),
        ("swahili_male", 246),
        ("luganda_female", 248),
    }
    assert all(set(v) == {"id", "speaker_id", "language", "gender", "cloned"} for v in voices)
    assert not any(v["cloned"] for v in voices)


def test_server_info(gateway):
    info = requests.get(f"{gateway.url}/", timeout=10).json()
    assert info["audio_format"] == {
        "encoding": "pcm_s16le",
        "sample_rate": 16000,
        "bit_depth": 16,
        "channels": 1,
    }
    assert "POST /v1/audio/speech/stream" in info["endpoints"]
    assert "WS /v1/audio/speech/stream/ws" in info["endpoints"]
    assert len(info["voices"]) == 6 and info["examples"]["curl"].startswith("curl")


def test_health_ok(gateway, llm):
    response = requests.get(f"{gateway.url}/health", timeout=10)
    assert response.status_code == 200 and response.json()["status"] == "ok"
    health = response.json()  # how the decoder runs, for an operator
    assert health["decoder_device"] == "cpu" and health["decoder_dtype"] == "float32"
    # The small test decoder is 12x narrower than the released one: 12 x 64 tokens.
    assert health["decoder_batch_tokens"] == 768 and health["decoder_cuda_graphs"] is False


# -- streaming over HTTP -------------------------------------------------------


def test_http_stream_headers_and_exact_length(gateway, llm):
    response = speak(gateway, text=THREE_SENTENCES, voice="luganda_female")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "audio/pcm"
    assert response.headers["x-sample-rate"] == "16000"
    assert response.headers["x-bit-depth"] == "16"
    assert response.headers["x-channels"] == "1"
    assert response.headers["x-request-id"]
    assert len(response.content) == expected_bytes(THREE_SENTENCES)
    assert llm.stats()["completed"] == 3  # one completion per sentence


def test_http_audio_equals_full_decode_when_exact(make_gateway, llm):
    """With full look-ahead the stream is sample-exact: PCM equals the offline decode."""
    gateway = make_gateway(STREAM_FIRST_LOOKAHEAD_TOKENS="67")
    text = "Habari yako? Ninafurahi kukuona leo."
    response = speak(gateway, text=text, voice="swahili_male")
    assert response.status_code == 200
    decoder = load_decoder(GOLDEN_BICODEC)
    voice = VOICES.resolve("swahili_male")
    expected = b"".join(
        to_pcm16(decoder.decode(tokens, voice.global_tokens))
        for tokens in expected_tokens(text, voice="swahili_male")
    )
    got = np.frombuffer(response.content, "<i2").astype(int)
    want = np.frombuffer(expected, "<i2").astype(int)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1  # float rounding may flip one LSB


def test_sampling_fields_are_all_sent(gateway, llm):
    assert speak(gateway, text="Oli otya?", speaker_id=241, temperature=0.9).status_code == 200
    body = llm.stats()["last_request"]
    assert body["model"] == "spark-tts" and body["stream"] is True
    assert body["temperature"] == 0.9
    assert body["top_p"] == 0.95 and body["top_k"] == 50
    assert body["repetition_penalty"] == 1.0 and body["min_p"] == 0.0
    assert body["stop_token_ids"] == [165157, 151645]
    assert body["skip_special_tokens"] is False and body["return_token_ids"] is True
    assert 1 <= body["max_tokens"] <= 2048
    assert body["prompt"].startswith("<|task_tts|><|start_content|>241: Oli otya?<|end_content|>")
    globals_ = "".join(
        f"<|bicodec_global_{g}|>" for g in VOICES.resolve("acholi_female").global_tokens
    )
    assert body["prompt"].endswith(globals_ + "<|end_global_token|><|start_semantic_token|>")


def test_max_tokens_is_honoured(gateway, llm):
    response = speak(gateway, text=THREE_SENTENCES, max_tokens=7)
    assert response.status_code == 200
    assert len(response.content) == 3 * 7 * 2 * SAMPLES_PER_TOKEN
    assert all(r["max_tokens"] == 7 for r in llm.stats()["requests"])


def test_segments_are_generated_ahead_of_playback_one_at_a_time(gateway, llm):
    """vLLM writes one sentence of a request at a time (a second would slow the one
    its listener waits for), the next as soon as the one before has all its tokens,
    so the whole text is written far sooner than it plays."""
    llm.control(tokens_per_s=300)  # 6x real time
    text = " ".join(["Oli otya leero mukwano gwange?"] * 6)
    started = time.monotonic()
    response = speak(gateway, text=text)
    wall_s = time.monotonic() - started
    assert response.status_code == 200
    audio_s = len(response.content) / 2 / 16000
    assert llm.stats()["max_running"] == 1
    assert wall_s < audio_s / 2, (wall_s, audio_s)


def test_text_fallback_parses_split_tokens(gateway, llm):
    """Without token_ids, tokens split across chunks and spaced out still parse."""
    llm.control(text_only=True, split_text_tokens=True, text_spaces=True, tokens_per_chunk=3)
    response = speak(gateway, text=THREE_SENTENCES)
    assert response.status_code == 200
    assert len(response.content) == expected_bytes(THREE_SENTENCES)


def test_concurrent_http_clients(gateway, llm):
    texts = [f"Sentence number {i} is here. And another one." for i in range(4)]
    results: dict[int, requests.Response] = {}

    def run(i: int) -> None:
        results[i] = speak(gateway, text=texts[i], voice="ateso_female")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, text in enumerate(texts):
        assert results[i].status_code == 200
        assert len(results[i].content) == expected_bytes(text, voice="ateso_female")


# -- bad input -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"text": ""}, "text is empty"),
        ({"text": "   \n\t "}, "text is empty"),
        ({"text": "... !!! --- ***"}, "text has nothing to speak"),
        ({"text": "x" * 5001}, "limit is 5000"),
        (
            {"text": "hi", "voice": "klingon"},
            "unknown voice 'klingon'; valid voices: acholi_female",
        ),
        ({"text": "hi", "speaker_id": 999}, "unknown speaker_id 999"),
        ({"text": "hi", "voice": "acholi_female", "speaker_id": 248}, "has speaker_id 241"),
        ({"text": "hi", "temperature": 3}, "temperature"),
        ({"text": "hi", "temperature": -0.1}, "temperature"),
        ({"text": "hi", "max_tokens": 0}, "max_tokens"),
        ({"text": "hi", "max_tokens": 100000}, "max_tokens must be in"),
        ({"voice": "acholi_female"}, "text"),
        ({"text": 5}, "text"),
    ],
)
def test_bad_requests_get_400_with_a_message(gateway, llm, body, message):
    response = speak(gateway, **body)
    assert response.status_code == 400
    assert message in error_of(response)
    field = next(iter(k for k in ("temperature", "max_tokens", "speaker_id") if k in body), None)
    if field is None:
        field = "voice" if "voice" in body and "text" in body else "text"
    assert response.json()["error"]["param"] == field
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert llm.stats()["received"] == 0


def test_malformed_json_is_400(gateway):
    response = requests.post(
        f"{gateway.url}/v1/audio/speech/stream",
        data=b"{nope",
        timeout=10,
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 400 and "JSON" in error_of(response)


# -- upstream faults -----------------------------------------------------------


def test_llm_unreachable_is_503_and_health_says_why(make_gateway):
    gateway = make_gateway("http://127.0.0.1:9/v1")  # nothing listens on the discard port
    response = speak(gateway, text="Oli otya?")
    assert response.status_code == 503 and "cannot reach vLLM" in error_of(response)
    health = requests.get(f"{gateway.url}/health", timeout=10)
    assert health.status_code == 503 and "unreachable" in health.json()["reason"]


def test_llm_error_before_stream_is_502(gateway, llm):
    llm.control(fail_before_stream=500)
    response = speak(gateway, text="Oli otya?")
    assert response.status_code == 502 and "vLLM refused the request (500)" in error_of(response)


def test_llm_busy_before_stream_is_503(gateway, llm):
    llm.control(fail_before_stream=503)
    assert speak(gateway, text="Oli otya?").status_code == 503


def test_no_semantic_tokens_is_a_clear_error(gateway, llm):
    llm.control(no_semantic_tokens=True)
    response = speak(gateway, text="Oli otya?")
    assert response.status_code == 502 and "no speech tokens" in error_of(response)


@pytest.mark.parametrize("fault", [{"error_after_tokens": 30}, {"drop_after_tokens": 30}])
def test_mid_stream_failure_breaks_the_http_response(gateway, llm, fault):
    """Not a short clean file: the chunked body ends without its terminator."""
    llm.control(**fault, tokens_per_s=400)
    text = "Oli otya leero mukwano gwange wange?"
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        response = requests.post(
            f"{gateway.url}/v1/audio/speech/stream", json={"text": text}, stream=True, timeout=30
        )
        assert response.status_code == 200
        for _ in response.iter_content(4096):
            pass


def test_failure_in_a_later_segment_still_breaks_the_response(gateway, llm):
    llm.control(error_after_tokens=3, fault_match="Webale")
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        response = requests.post(
            f"{gateway.url}/v1/audio/speech/stream",
            json={"text": THREE_SENTENCES},
            stream=True,
            timeout=30,
        )
        b"".join(response.iter_content(4096))


def test_client_disconnect_aborts_the_upstream_request(gateway, llm):
    llm.control(tokens_per_s=50)  # slow: the client leaves long before the end
    with httpx.Client(timeout=30) as client:
        with client.stream(
            "POST",
            f"{gateway.url}/v1/audio/speech/stream",
            json={"text": "Oli otya leero mukwano gwange wange nnyo nnyo?"},
        ) as response:
            assert response.status_code == 200
            next(response.iter_bytes())
    stats = llm.wait_for(lambda s: s["running"] == 0 and s["aborted"] >= 1, timeout=10)
    assert stats["aborted"] >= 1 and stats["completed"] == 0


def test_too_many_streams_is_429(make_gateway, llm):
    gateway = make_gateway(MAX_CONCURRENT_STREAMS="1")
    llm.control(tokens_per_s=40)
    with httpx.Client(timeout=30) as client:
        with client.stream(
            "POST",
            f"{gateway.url}/v1/audio/speech/stream",
            json={"text": "Oli otya leero mukwano gwange?"},
        ) as first:
            assert first.status_code == 200
            second = speak(gateway, text="Oli otya?")
            assert second.status_code == 429 and "limit of 1" in error_of(second)


# -- voices without pinned global tokens ---------------------------------------


@pytest.fixture
def free_voice_file(tmp_path: Path) -> Path:
    path = tmp_path / "voices.json"
    path.write_text(json.dumps({"voices": [{"id": "free_voice", "speaker_id": 300}]}))
    return path


def test_voice_without_globals_pins_the_generated_ones(make_gateway, llm, free_voice_file):
    gateway = make_gateway(VOICES_FILE=str(free_voice_file))
    voices = requests.get(f"{gateway.url}/v1/voices", timeout=10).json()["voices"]
    assert len(voices) == 7  # the file extends the packaged six
    response = speak(gateway, text=THREE_SENTENCES, voice="free_voice")
    assert response.status_code == 200
    requests_seen = sorted(llm.stats()["requests"], key=lambda r: r["prompt"])
    first = [r for r in requests_seen if r["prompt"].endswith("<|start_global_token|>")]
    later = [r for r in requests_seen if r["prompt"].endswith("<|start_semantic_token|>")]
    assert len(first) == 1 and len(later) == 2  # segment 0 writes them, the others reuse them
    assert "<|bicodec_global_" in later[0]["prompt"]


def test_wrong_number_of_generated_globals_is_an_error(make_gateway, llm, free_voice_file):
    gateway = make_gateway(VOICES_FILE=str(free_voice_file))
    llm.control(global_count=31)
    response = speak(gateway, text="Oli otya?", voice="free_voice")
    assert response.status_code == 502
    assert "wrote 31 global tokens; BiCodec needs exactly 32" in error_of(response)


# -- WebSocket -----------------------------------------------------------------


async def ws_exchange(ws, message: dict) -> tuple[list[dict], bytes]:
    """Send one message; collect JSON frames and audio until end or error."""
    return await SpeechSocket(ws, timeout_s=30.0).exchange(message)


async def test_ws_several_messages_on_one_connection(gateway, llm):
    async with websockets.connect(f"{gateway.ws_url}/v1/audio/speech/stream/ws") as ws:
        for i, (text, voice) in enumerate(
            [(THREE_SENTENCES, "luganda_female"), ("Habari yako?", "swahili_male")]
        ):
            frames, audio = await ws_exchange(
                ws, {"input": text, "voice": voice, "segment_id": f"s{i}", "continue": True}
            )
            start, end = frames[0], frames[-1]
            assert start["type"] == "start" and start["segment_id"] == f"s{i}"
            assert start["speaker_id"] == VOICES.resolve(voice).speaker_id
            assert end == {
                "type": "end",
                "segment_id": f"s{i}",
                "samples": len(audio) // 2,
                "duration_s": pytest.approx(len(audio) / 2 / 16000),
            }
            assert len(audio) == expected_bytes(text, voice=voice)
        await ws.send(json.dumps({"input": "", "continue": False}))
        with pytest.raises(websockets.ConnectionClosedOK):
            await asyncio.wait_for(ws.recv(), timeout=10)
        assert ws.close_code == 1000


async def test_ws_bad_messages_get_error_frames_and_the_connection_survives(gateway, llm):
    async with websockets.connect(f"{gateway.ws_url}/v1/audio/speech/stream/ws") as ws:
        await ws.send("{not json")
        assert json.loads(await ws.recv())["type"] == "error"
        await ws.send(b"\x00\x01binary")
        frame = json.loads(await ws.recv())
        assert frame["type"] == "error" and "binary" in frame["message"]
        await ws.send(json.dumps([1, 2]))
        assert "JSON object" in json.loads(await ws.recv())["message"]
        frames, _ = await ws_exchange(ws, {"input": "hi", "voice": "nope", "segment_id": 7})
        assert frames == [
            {
                "type": "error",
                "code": "voice_not_found",
                "segment_id": 7,
                "message": frames[0]["message"],
            }
        ]
        assert "valid voices" in frames[0]["message"]
        frames, _ = await ws_exchange(ws, {"input": "hi", "temperature": 9, "segment_id": 8})
        assert frames[0]["type"] == "error" and "temperature" in frames[0]["message"]
        assert frames[0]["segment_id"] == 8
        frames, _ = await ws_exchange(ws, {"input": "  ", "continue": True})
        assert frames[0]["message"] == "input is empty"
        # Still usable.
        frames, audio = await ws_exchange(ws, {"input": "Oli otya?", "segment_id": 9})
        assert [f["type"] for f in frames] == ["start", "end"] and len(audio) > 0


async def test_ws_mid_stream_failure_sends_error_not_end(gateway, llm):
    llm.control(error_after_tokens=25, tokens_per_s=400)
    async with websockets.connect(f"{gateway.ws_url}/v1/audio/speech/stream/ws") as ws:
        frames, _ = await ws_exchange(
            ws, {"input": "Oli otya leero mukwano gwange wange?", "segment_id": 1}
        )
        assert [f["type"] for f in frames] == ["start", "error"]
        assert "vLLM failed mid-stream" in frames[-1]["message"]
        llm.control(error_after_tokens=None)
        frames, _ = await ws_exchange(ws, {"input": "Oli otya?", "segment_id": 2})
        assert frames[-1]["type"] == "end"


async def test_ws_llm_unreachable_is_an_error_frame(make_gateway):
    gateway = make_gateway("http://127.0.0.1:9/v1")
    async with websockets.connect(f"{gateway.ws_url}/v1/audio/speech/stream/ws") as ws:
        frames, audio = await ws_exchange(ws, {"input": "Oli otya?", "segment_id": 1})
        assert frames[-1]["type"] == "error" and "cannot reach vLLM" in frames[-1]["message"]
        assert audio == b""


async def test_ws_disconnect_aborts_the_upstream_request(gateway, llm):
    llm.control(tokens_per_s=50)
    async with websockets.connect(f"{gateway.ws_url}/v1/audio/speech/stream/ws") as ws:
        await ws.send(json.dumps({"input": "Oli otya leero mukwano gwange wange nnyo?"}))
        assert json.loads(await ws.recv())["type"] == "start"
        assert isinstance(await asyncio.wait_for(ws.recv(), timeout=30), bytes)
    stats = await asyncio.to_thread(
        llm.wait_for, lambda s: s["running"] == 0 and s["aborted"] >= 1, 10
    )
    assert stats["aborted"] >= 1 and stats["completed"] == 0


def test_first_audio_arrives_before_the_sentence_is_generated(gateway, llm):
    """Audio flows after the first few tokens, not after the whole sentence: when the
    first bytes arrive, the LLM is still writing that sentence (no timing involved)."""
    llm.control(tokens_per_s=50)  # 80 tokens of speech take 1.6 s to write
    text = "Oli otya leero mukwano gwange wange nnyo?"
    with httpx.Client(timeout=30) as client:
        with client.stream(
            "POST", f"{gateway.url}/v1/audio/speech/stream", json={"text": text}
        ) as response:
            chunks = response.iter_bytes()
            next(chunks)
            stats = llm.stats()
            rest = b"".join(chunks)
    assert stats["running"] == 1 and stats["completed"] == 0, stats
    assert len(rest) > 0


def test_max_tokens_fits_vllms_context(make_gateway, llm):
    """vLLM refuses prompt + max_tokens > max_model_len; the gateway caps max_tokens
    from the context length it read at start-up, so a long sentence is not refused."""
    llm.control(max_model_len=400)
    gateway = make_gateway()
    text = "Ekigambo kino kiwanvu nnyo era kirina ebigambo bingi nnyo " * 3
    response = speak(gateway, text=text)
    assert response.status_code == 200, response.text
    sent = llm.stats()["last_request"]
    room = 400 - prompt_token_bound(sent["prompt"])
    assert sent["max_tokens"] == room
    assert len(response.content) == room * 2 * SAMPLES_PER_TOKEN  # cut at the cap


def test_context_too_small_for_any_speech_is_a_clear_error(make_gateway, llm):
    llm.control(max_model_len=60)
    gateway = make_gateway()
    response = speak(gateway, text="Oli otya leero mukwano gwange wange nnyo?")
    assert response.status_code == 502
    assert "max_model_len of 60 tokens leaves no room" in error_of(response)


def test_client_leaving_before_the_first_audio_aborts_upstream_at_once(gateway, llm):
    """The route waits for the first chunk before it answers; a client that goes away
    meanwhile must not keep the LLM busy until the first audio or a timeout."""
    llm.control(stall_s=30, stall_after_tokens=2)  # no audio for 30 s
    body = json.dumps({"text": "Oli otya leero?"}).encode()
    host, port = gateway.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/audio/speech/stream HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        llm.wait_for(lambda s: s["running"] == 1, timeout=10)
    stats = llm.wait_for(lambda s: s["running"] == 0, timeout=5)  # far less than 30 s
    assert stats["aborted"] == 1


def test_mid_stream_abort_logs_one_line_not_a_traceback(make_gateway, llm):
    gateway = make_gateway()
    llm.control(error_after_tokens=30, tokens_per_s=400)
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        response = requests.post(
            f"{gateway.url}/v1/audio/speech/stream",
            json={"text": "Oli otya leero mukwano gwange wange?"},
            stream=True,
            timeout=30,
        )
        b"".join(response.iter_content(4096))
    time.sleep(0.5)
    log = gateway.log_text()
    assert "response aborted mid-stream: vLLM failed mid-stream" in log
    assert "Traceback" not in log and "Exception in ASGI application" not in log
