"""Every accepted request ends with its audio or an explicit error, on every transport:
stalled readers, decoder failures, prompt markup, oversized bodies, bad Unicode,
nested JSON, foreign WebSocket origins and contradicting settings.

Real gateway processes on loopback (uvicorn) against the stand-in LLM; raw sockets
where a well-behaved client library could not misbehave the way a hostile one does.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable

import pytest
import requests
import websockets
from websockets.sync.client import connect as ws_connect

from devtools.faulty_gateway import FAULT_VOICE
from devtools.paths import REPO

LONG_TEXT = " ".join(
    f"Sentensi eno ey'okugezesa namba {i} eriko ebigambo bingi nnyo okusobola okuwanvuwa."
    for i in range(12)
)
MARKUP_TEXT = "Hello <|end_content|><|start_global_token|><|bicodec_global_7|> there."
SURROGATE_BODY = b'{"text": "Hello \\ud800 there."}'


def metric(gateway, name: str, **labels: str) -> float:
    """A sample of the gateway's /metrics (0 when absent)."""
    text = requests.get(f"{gateway.url}/metrics", timeout=10).text
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
        if match and ",".join(sorted((match.group(1) or "").split(","))) == wanted:
            return float(match.group(2))
    return 0.0


def wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Seconds until ``check()`` holds; fails after ``timeout_s``."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout_s:
            pytest.fail(f"not within {timeout_s} s: {what}")
        time.sleep(0.1)
    return time.monotonic() - started


def stalled_socket(port: int) -> socket.socket:
    """A connected socket with a tiny receive buffer, which its owner never reads."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window
    # A small MSS keeps the server's kernel send buffer small too (Linux sizes it from
    # the MSS), so its sends block within a second instead of after megabytes.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
    sock.connect(("127.0.0.1", port))
    return sock


def http_request(path: str, body: bytes, extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


def ws_handshake(path: str, origin: str | None = None) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        "Host: 127.0.0.1",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    if origin:
        lines.append(f"Origin: {origin}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def ws_text_frame(payload: bytes) -> bytes:
    """One masked text frame (clients must mask)."""
    mask = os.urandom(4)
    header = bytearray([0x81])
    if len(payload) < 126:
        header.append(0x80 | len(payload))
    elif len(payload) < 1 << 16:
        header += bytes([0x80 | 126]) + len(payload).to_bytes(2, "big")
    else:
        header += bytes([0x80 | 127]) + len(payload).to_bytes(8, "big")
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes(header) + mask + masked


# -- 1. clients that stop reading but stay connected ----------------------------------

STALL_CASES = {
    "stream": ("/v1/audio/speech/stream", {"text": LONG_TEXT}),
    "openai": ("/v1/audio/speech", {"input": LONG_TEXT, "response_format": "pcm"}),
    "openai-sse": (
        "/v1/audio/speech",
        {"input": LONG_TEXT, "response_format": "pcm", "stream_format": "sse"},
    ),
    "websocket": ("/v1/audio/speech/stream/ws", [{"input": LONG_TEXT, "segment_id": 1}]),
    "text_stream": (
        "/v1/audio/speech/stream",
        [
            {"type": "session.config", "response_format": "pcm", "stream_audio": True},
            {"type": "input.text", "text": LONG_TEXT},
            {"type": "input.done"},
        ],
    ),
}
WS_CASES = {"websocket", "text_stream"}


@pytest.mark.parametrize("case", list(STALL_CASES))
def test_a_stalled_reader_loses_its_slot_and_its_upstream_requests(make_gateway, llm, case):
    """A client that stops reading with its socket open (receive window closed) is cut
    off within SLOW_CLIENT_TIMEOUT_S plus a margin: slot freed, upstream aborted,
    counted as slow_client; the next request is served while the socket stays open."""
    timeout_s = 2.0
    gateway = make_gateway(
        SLOW_CLIENT_TIMEOUT_S=str(timeout_s), MAX_CONCURRENT_STREAMS="1", STREAM_BUFFER_CHUNKS="2"
    )
    # 30 s of audio per sentence, written in 5 s: still running when the client is cut.
    llm.control(tokens_per_s=300, tokens_per_segment=1500)
    path, body = STALL_CASES[case]
    endpoint = case if case in ("stream", *WS_CASES) else "openai"
    sock = stalled_socket(gateway.port)
    try:
        if case in WS_CASES:
            sock.sendall(ws_handshake(path))
            # Frames go after the server's 101: uvicorn may drop bytes that arrive with
            # the upgrade request itself.
            answer = b""
            while b"\r\n\r\n" not in answer:
                answer += sock.recv(1024)
            assert answer.startswith(b"HTTP/1.1 101")
            for message in body:
                sock.sendall(ws_text_frame(json.dumps(message).encode()))
        else:
            sock.sendall(http_request(path, json.dumps(body).encode()))
        started = {"endpoint": endpoint, "outcome": "slow_client"}
        wait_until(
            lambda: (
                metric(gateway, "tts_active_streams") == 1
                or metric(gateway, "tts_requests_total", **started) == 1
            ),
            60,
            "the stream starts",
        )
        # Generation runs ahead until the socket's buffers are full, then the send
        # blocks; from then on the deadline runs.
        wait_until(
            lambda: (
                metric(gateway, "tts_requests_total", endpoint=endpoint, outcome="slow_client") == 1
            ),
            timeout_s + 25,
            "the stalled client is cut off",
        )
        assert metric(gateway, "tts_active_streams") == 0
        stats = llm.wait_for(lambda s: s["running"] == 0, 10)
        assert stats["aborted"] >= 1
        # The one slot is free again, with the stalled socket still open.
        llm.control(tokens_per_segment=None)
        response = requests.post(
            f"{gateway.url}/v1/audio/speech/stream", json={"text": "Oli otya?"}, timeout=30
        )
        assert response.status_code == 200 and len(response.content) > 0
    finally:
        sock.close()


def test_the_slow_client_clock_counts_only_time_the_client_could_take_audio(make_gateway, llm):
    """A first sentence that the LLM stalls on (the server's delay) while the next one
    is ready and its buffer full: a client that reads everything is not cut off."""
    gateway = make_gateway(SLOW_CLIENT_TIMEOUT_S="2", STREAM_BUFFER_CHUNKS="1")
    llm.control(stall_s=4.0, stall_after_tokens=20, fault_match="Esooka")
    text = "Esooka eno erwawo nnyo. Eyokubiri eno ejja mangu nnyo era mpanvu."
    response = requests.post(
        f"{gateway.url}/v1/audio/speech/stream", json={"text": text}, timeout=60
    )
    assert response.status_code == 200
    assert len(response.content) > 0
    # Recorded as the response closes, just after its last byte.
    wait_until(
        lambda: metric(gateway, "tts_requests_total", endpoint="stream", outcome="completed") == 1,
        10,
        "the request is recorded as completed",
    )
    assert metric(gateway, "tts_requests_total", endpoint="stream", outcome="slow_client") == 0


# -- 2. decoder failures ------------------------------------------------------------


@pytest.fixture
def faulty_gateway(make_gateway):
    return make_gateway(faulty=True)


def test_decoder_failure_is_a_typed_500_on_the_http_stream(faulty_gateway, llm):
    response = requests.post(
        f"{faulty_gateway.url}/v1/audio/speech/stream",
        json={"text": "Oli otya?", "voice": FAULT_VOICE},
        timeout=30,
    )
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == "decoder_error" and error["type"] == "server_error"
    assert "CUDA out of memory" in error["message"]
    # The worker survives a failed batch: other voices still speak, /health is fine.
    ok = requests.post(
        f"{faulty_gateway.url}/v1/audio/speech/stream", json={"text": "Oli otya?"}, timeout=30
    )
    assert ok.status_code == 200 and len(ok.content) > 0
    assert requests.get(f"{faulty_gateway.url}/health", timeout=10).status_code == 200
    assert metric(faulty_gateway, "tts_decoder_failures_total") >= 1
    stats = llm.wait_for(lambda s: s["running"] == 0, 10)
    assert stats["running"] == 0


@pytest.mark.parametrize("response_format", ["mp3", "pcm"])
def test_decoder_failure_on_openai_speech_is_openais_error_shape(
    faulty_gateway, llm, response_format
):
    response = requests.post(
        f"{faulty_gateway.url}/v1/audio/speech",
        json={"input": "Oli otya?", "voice": FAULT_VOICE, "response_format": response_format},
        timeout=30,
    )
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "decoder_error"


def test_decoder_failure_mid_stream_on_sse_is_an_error_event(faulty_gateway, llm):
    """Fails after the first audio (a later chunk): an SSE error event, no done."""
    response = requests.post(
        f"{faulty_gateway.url}/v1/audio/speech",
        json={
            "input": "Oli otya leero mukwano gwange wange nnyo?",
            "voice": FAULT_VOICE + "_late",
            "response_format": "pcm",
            "stream_format": "sse",
        },
        timeout=30,
    )
    assert response.status_code == 200
    events = [
        json.loads(line[5:]) for line in response.text.splitlines() if line.startswith("data:")
    ]
    assert events[0]["type"] == "speech.audio.delta"
    assert events[-1]["type"] == "error"
    assert events[-1]["error"]["code"] == "decoder_error"
    assert all(e["type"] != "speech.audio.done" for e in events)


def test_decoder_failure_mid_stream_aborts_the_http_body(faulty_gateway, llm):
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        response = requests.post(
            f"{faulty_gateway.url}/v1/audio/speech/stream",
            json={
                "text": "Oli otya leero mukwano gwange wange nnyo?",
                "voice": FAULT_VOICE + "_late",
            },
            stream=True,
            timeout=30,
        )
        assert response.status_code == 200
        b"".join(response.iter_content(4096))
    assert metric(faulty_gateway, "tts_requests_total", endpoint="stream", outcome="error") == 1


def test_decoder_failure_on_the_websocket_is_an_error_frame_and_the_connection_lives(
    faulty_gateway, llm
):
    with ws_connect(f"{faulty_gateway.ws_url}/v1/audio/speech/stream/ws") as ws:
        ws.send(json.dumps({"input": "Oli otya?", "voice": FAULT_VOICE, "segment_id": 1}))
        frame = json.loads(ws.recv(timeout=30))
        assert frame["type"] == "error" and frame["code"] == "decoder_error"
        assert frame["segment_id"] == 1
        ws.send(json.dumps({"input": "Oli otya?", "segment_id": 2}))
        kinds = []
        while not kinds or kinds[-1] not in ("end", "error"):
            message = ws.recv(timeout=30)
            if isinstance(message, str):
                kinds.append(json.loads(message)["type"])
        assert kinds == ["start", "end"]


# -- 3. prompt markup -------------------------------------------------------------


def test_prompt_markup_in_the_text_is_refused_before_the_llm(gateway, llm):
    before = llm.stats()["received"]
    response = requests.post(
        f"{gateway.url}/v1/audio/speech/stream", json={"text": MARKUP_TEXT}, timeout=30
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "text" and "<|end_content|>" in error["message"]
    response = requests.post(
        f"{gateway.url}/v1/audio/speech", json={"input": MARKUP_TEXT}, timeout=30
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "input"
    with ws_connect(f"{gateway.ws_url}/v1/audio/speech/stream/ws") as ws:
        ws.send(json.dumps({"input": MARKUP_TEXT, "segment_id": 3}))
        frame = json.loads(ws.recv(timeout=30))
        assert frame["type"] == "error" and frame["code"] == "invalid_request"
        assert frame["segment_id"] == 3
    assert llm.stats()["received"] == before  # nothing reached the LLM
    # Lookalikes that are not markup are spoken.
    response = requests.post(
        f"{gateway.url}/v1/audio/speech/stream", json={"text": "a <| b and c |"}, timeout=30
    )
    assert response.status_code == 200


# -- 4. settings that contradict each other ---------------------------------------


def test_the_default_max_tokens_follows_the_limit(make_gateway, llm):
    gateway = make_gateway(MAX_TOKENS_LIMIT="1024")
    response = requests.post(
        f"{gateway.url}/v1/audio/speech/stream", json={"text": "Oli otya?"}, timeout=30
    )
    assert response.status_code == 200, response.text
    assert llm.stats()["requests"][-1]["max_tokens"] <= 1024


@pytest.mark.parametrize(
    ("env", "names"),
    [
        (
            {"MAX_SEGMENT_CHARS": "500", "MAX_TEXT_CHARS": "400"},
            ["MAX_SEGMENT_CHARS", "MAX_TEXT_CHARS"],
        ),
        ({"MAX_TOKENS_LIMIT": "500"}, ["MAX_TOKENS_LIMIT", "MAX_SEGMENT_CHARS"]),
        ({"MAX_SEGMENT_CHARS": "5000"}, ["MAX_SEGMENT_CHARS"]),
        ({"MAX_REQUEST_BODY_BYTES": "4096"}, ["MAX_REQUEST_BODY_BYTES", "MAX_TEXT_CHARS"]),
        ({"SLOW_CLIENT_TIMEOUT_S": "0.5"}, ["SLOW_CLIENT_TIMEOUT_S"]),
        (
            {"DECODER_CUDA_GRAPHS": "true", "DECODER_DEVICE": "cpu"},
            ["DECODER_CUDA_GRAPHS", "DECODER_DEVICE"],
        ),
    ],
)
def test_contradicting_settings_stop_the_start_with_a_message_naming_them(env, names):
    done = subprocess.run(
        [sys.executable, "-m", "decoder_gateway"],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "invalid settings" in done.stderr and "Traceback" not in done.stderr
    for name in names:
        assert name in done.stderr, done.stderr


# -- 5. zero look-ahead ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "tokens"),
    [
        ({"STREAM_FIRST_LOOKAHEAD_TOKENS": "0"}, 10),
        ({"STREAM_FIRST_LOOKAHEAD_TOKENS": "0"}, 57),
        ({"STREAM_ASSUMED_SPEEDUP": "1"}, 120),
    ],
)
def test_every_chunking_setting_gives_every_sample(make_gateway, llm, env, tokens):
    """320 samples per token, whatever the schedule (a held crossfade tail was lost)."""
    gateway = make_gateway(**env)
    llm.control(tokens_per_segment=tokens)
    response = requests.post(
        f"{gateway.url}/v1/audio/speech/stream", json={"text": "Oli otya?"}, timeout=30
    )
    assert response.status_code == 200
    assert len(response.content) == 2 * 320 * tokens


# -- 9. request bodies -------------------------------------------------------------


def test_a_body_over_the_limit_is_413_before_it_is_read(gateway):
    declared = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
    declared.putrequest("POST", "/v1/audio/speech/stream")
    declared.putheader("Content-Type", "application/json")
    declared.putheader("Content-Length", str(200 * 1024 * 1024))
    declared.endheaders()
    declared.send(b'{"text": "')  # the other 200 MB never come
    response = declared.getresponse()
    assert response.status == 413
    assert json.loads(response.read())["error"]["code"] == "request_too_large"
    declared.close()

    def chunks():
        yield b'{"text": "'
        for _ in range(512):  # 2 MB: over any path's limit (an inline clip's included)
            yield b"a" * 4096

    response = requests.post(
        f"{gateway.url}/v1/audio/speech/stream",
        data=chunks(),  # chunked: no Content-Length
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


@pytest.mark.parametrize("size", [2 * 1024 * 1024, 6 * 1024 * 1024])
def test_a_client_that_sends_its_whole_oversized_body_reads_the_413(gateway, size):
    """A client that writes all of a declared body before reading (as most do) gets the
    413, not a connection reset: the gateway reads (and drops) a body of a few MB before
    it answers and closes."""
    for _ in range(3):
        connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
        body = b'{"text": "' + b"word " * ((size - 12) // 5) + b'"}'
        connection.request(
            "POST", "/v1/audio/speech/stream", body, {"Content-Type": "application/json"}
        )
        response = connection.getresponse()
        assert response.status == 413
        assert json.loads(response.read())["error"]["code"] == "request_too_large"
        connection.close()


# -- 10. inputs that used to crash ------------------------------------------------


def test_a_lone_surrogate_is_a_400_and_the_connection_stays_usable(gateway, llm):
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
    for path in ("/v1/audio/speech/stream", "/v1/audio/speech"):
        body = (
            SURROGATE_BODY.replace(b'"text"', b'"input"')
            if "stream" not in path
            else SURROGATE_BODY
        )
        connection.request("POST", path, body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        error = json.loads(response.read())["error"]
        assert response.status == 400 and error["code"] == "invalid_request"
        assert error["param"] in ("text", "input")
        assert "surrogate" in error["message"] or "unicode" in error["message"]
    # The same keep-alive connection serves a normal request.
    connection.request(
        "POST",
        "/v1/audio/speech/stream",
        json.dumps({"text": "Oli otya?"}),
        {"Content-Type": "application/json"},
    )
    response = connection.getresponse()
    assert response.status == 200 and len(response.read()) > 0
    connection.close()
    assert metric(gateway, "tts_active_streams") == 0


def test_ws_surrogates_and_nested_json_get_error_frames_and_keep_the_speech(gateway, llm):
    """While a speech is in progress: a nested-JSON bomb and a lone surrogate each get
    their error frame; the speech in progress ends normally and the queued message
    after them is served."""
    llm.control(tokens_per_s=300)
    labels = {"endpoint": "websocket", "outcome": "client_disconnected"}
    disconnected_before = metric(gateway, "tts_requests_total", **labels)
    with ws_connect(f"{gateway.ws_url}/v1/audio/speech/stream/ws", max_size=None) as ws:
        ws.send(json.dumps({"input": "Oli otya leero mukwano gwange?", "segment_id": 1}))
        ws.send("[" * 3000 + "]" * 3000)
        ws.send('{"input": "Hello \\ud800 there.", "segment_id": 2}')
        ws.send(json.dumps({"input": "Webale nnyo.", "segment_id": 3}))
        frames = []
        while len([f for f in frames if f["type"] in ("end", "error")]) < 4:
            message = ws.recv(timeout=30)
            if isinstance(message, str):
                frames.append(json.loads(message))
    by_kind = [(f["type"], f.get("code"), f.get("segment_id")) for f in frames]
    assert ("error", "invalid_json", None) in by_kind
    assert ("error", "invalid_request", 2) in by_kind
    ends = [f["segment_id"] for f in frames if f["type"] == "end"]
    assert ends == [1, 3]
    assert metric(gateway, "tts_requests_total", **labels) == disconnected_before


def test_a_surrogate_api_key_is_a_wrong_key_not_a_crash(make_gateway):
    gateway = make_gateway(GATEWAY_API_KEY="secret")
    with ws_connect(f"{gateway.ws_url}/v1/audio/speech/stream/ws") as ws:
        ws.send('{"type": "auth", "api_key": "\\ud800"}')
        frame = json.loads(ws.recv(timeout=10))
        assert frame["code"] == "invalid_api_key"
        with pytest.raises(websockets.ConnectionClosed):
            ws.recv(timeout=10)
        assert ws.close_code == 1008
    assert "Traceback" not in gateway.log_text()


# -- 11. WebSocket origins ---------------------------------------------------------


async def test_ws_handshakes_from_foreign_origins_are_refused(make_gateway, llm):
    gateway = make_gateway(CORS_ALLOW_ORIGINS="http://allowed.example")
    url = f"{gateway.ws_url}/v1/audio/speech/stream/ws"
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with websockets.connect(url, origin="http://evil.example"):
            pass
    assert refused.value.response.status_code == 403
    for origin in ("http://allowed.example", None):
        async with websockets.connect(url, origin=origin) as ws:
            await ws.send(json.dumps({"input": "Oli otya?", "segment_id": 1}))
            assert json.loads(await asyncio.wait_for(ws.recv(), 30))["type"] == "start"


# -- 12. smaller ------------------------------------------------------------------


def test_json_with_the_wrong_content_type_says_so(gateway):
    for content_type in ("text/plain", None):
        headers = {"Content-Type": content_type} if content_type else {}
        response = requests.post(
            f"{gateway.url}/v1/audio/speech/stream",
            data=json.dumps({"text": "Oli otya?"}),
            headers=headers,
            timeout=10,
        )
        assert response.status_code == 400
        assert "Content-Type: application/json" in response.json()["error"]["message"]


@pytest.mark.parametrize("field", ["speaker_id", "max_tokens"])
def test_booleans_are_not_integers(gateway, field):
    response = requests.post(
        f"{gateway.url}/v1/audio/speech/stream", json={"text": "Oli otya?", field: True}, timeout=10
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == field


def test_ws_boolean_segment_id_is_refused(gateway):
    with ws_connect(f"{gateway.ws_url}/v1/audio/speech/stream/ws") as ws:
        ws.send(json.dumps({"input": "Oli otya?", "segment_id": True}))
        frame = json.loads(ws.recv(timeout=10))
        assert frame["type"] == "error" and frame["code"] == "invalid_request"
        assert frame["segment_id"] is None and "segment_id" in frame["message"]


def test_either_key_header_may_carry_the_key(make_gateway, llm):
    gateway = make_gateway(GATEWAY_API_KEY="secret")
    url = f"{gateway.url}/v1/voices"
    for headers in (
        {"X-API-Key": "wrong", "Authorization": "Bearer secret"},
        {"Authorization": "Bearer wrong", "X-API-Key": "secret"},
    ):
        assert requests.get(url, headers=headers, timeout=10).status_code == 200
    both_wrong = {"Authorization": "Bearer wrong", "X-API-Key": "wrong"}
    assert requests.get(url, headers=both_wrong, timeout=10).status_code == 401


def test_liveness_does_not_depend_on_vllm(make_gateway):
    gateway = make_gateway("http://127.0.0.1:9/v1", GATEWAY_API_KEY="secret")
    assert requests.get(f"{gateway.url}/health", timeout=10).status_code == 503
    live = requests.get(f"{gateway.url}/livez", timeout=10)  # open without the key
    assert live.status_code == 200 and live.json() == {"status": "alive"}
