"""Operations: metrics, request ids, API keys, limits, CORS and backpressure, through
real clients against real gateway processes (and the stand-in LLM)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import time

import httpx
import pytest
import requests
import websockets

from decoder_gateway.app import decoder_threads
from decoder_gateway.codec import load_decoder
from decoder_gateway.codec.runtime.worker import DecodeWorker
from decoder_gateway.llm.client import LLMClient
from decoder_gateway.metrics import Metrics
from decoder_gateway.serving import SpeechService
from decoder_gateway.serving.capacity import PlaybackClock
from decoder_gateway.settings import Settings
from decoder_gateway.voices.catalog import VoiceCatalog
from decoder_gateway.voices.library import VoiceLibrary
from decoder_gateway.voices.service import VoiceService
from devtools.gateway_server import GOLDEN_BICODEC
from devtools.metrics import sample

TEXT = "Oli otya? Nze bulungi nnyo."
WS_PATH = "/v1/audio/speech/stream/ws"


def speak(url: str, **kwargs: object) -> requests.Response:
    return requests.post(f"{url}/v1/audio/speech/stream", timeout=60, **kwargs)


# -- metrics and request ids -----------------------------------------------------


def test_metrics_count_requests_latency_and_decoder(make_gateway, llm):
    gateway = make_gateway()
    assert speak(gateway.url, json={"text": TEXT}).status_code == 200
    assert speak(gateway.url, json={"text": "hi", "voice": "nope"}).status_code == 400
    llm.control(error_after_tokens=20, fault_requests=1)  # after the first audio
    failed = requests.post(
        f"{gateway.url}/v1/audio/speech/stream",
        json={"text": "Oli otya leero mukwano gwange?"},
        stream=True,
    )
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        b"".join(failed.iter_content(4096))

    text = requests.get(f"{gateway.url}/metrics", timeout=10).text
    assert sample(text, "tts_requests_total", endpoint="stream", outcome="completed") == 1
    assert sample(text, "tts_requests_total", endpoint="stream", outcome="error") == 1
    assert sample(text, "tts_time_to_first_audio_seconds_count", endpoint="stream") == 2
    assert sample(text, "tts_real_time_factor_count", endpoint="stream") == 1
    assert sample(text, "tts_audio_seconds_total", endpoint="stream") > 0
    assert sample(text, "tts_active_streams") == 0
    assert sample(text, "tts_decoder_batch_spans_count") > 0
    assert sample(text, "tts_decoder_batch_seconds_sum") > 0
    assert sample(text, "tts_llm_semantic_tokens_total") > 0
    assert sample(text, "tts_llm_semantic_tokens_per_second_count") >= 2
    assert sample(text, "tts_upstream_errors_total", code="llm_error") == 1


def test_metrics_count_disconnects_and_upstream_aborts(make_gateway, llm):
    gateway = make_gateway()
    llm.control(tokens_per_s=50)
    with httpx.Client(timeout=30) as client:
        with client.stream(
            "POST",
            f"{gateway.url}/v1/audio/speech/stream",
            json={"text": "Oli otya leero mukwano gwange wange nnyo?"},
        ) as response:
            next(response.iter_bytes())
    llm.wait_for(lambda s: s["aborted"] >= 1 and s["running"] == 0, timeout=10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        text = requests.get(f"{gateway.url}/metrics", timeout=10).text
        if sample(text, "tts_active_streams") == 0:
            break
        time.sleep(0.1)
    assert sample(text, "tts_client_disconnects_total", endpoint="stream") == 1
    assert sample(text, "tts_requests_total", endpoint="stream", outcome="client_disconnected") == 1
    assert sample(text, "tts_upstream_aborted_total") >= 1


def test_request_id_is_returned_and_sent_to_vllm(gateway, llm):
    response = speak(gateway.url, json={"text": TEXT}, headers={"X-Request-Id": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"
    sent = sorted(r["request_id"] for r in llm.stats()["requests"])
    assert sent == ["abc-123-0", "abc-123-1"]  # one upstream request per sentence
    assert "abc-123" in gateway.log_text()
    # An unusable client id is replaced by our own.
    response = speak(gateway.url, json={"text": "Oli?"}, headers={"X-Request-Id": "bad id!"})
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])


async def test_ws_start_carries_the_request_id(gateway, llm):
    async with websockets.connect(gateway.ws_url + WS_PATH) as ws:
        await ws.send(json.dumps({"input": "Oli otya?", "segment_id": 1}))
        start = json.loads(await ws.recv())
        assert start["type"] == "start" and re.fullmatch(r"[0-9a-f]{32}", start["request_id"])


def test_json_logs_carry_request_ids(make_gateway, llm):
    gateway = make_gateway(LOG_FORMAT="json")
    response = speak(gateway.url, json={"text": "Oli otya?"}, headers={"X-Request-Id": "r-1"})
    assert response.status_code == 200
    entries = [json.loads(line) for line in gateway.log_text().splitlines() if line.startswith("{")]
    mine = [e for e in entries if e.get("request_id") == "r-1"]
    assert {e.get("outcome") for e in mine} >= {"completed"}
    assert all({"ts", "level", "logger", "message"} <= set(e) for e in entries)


# -- API key -------------------------------------------------------------------


@pytest.fixture
def keyed_gateway(make_gateway, llm):
    return make_gateway(GATEWAY_API_KEY="s3cret-key")


def test_api_key_guards_http(keyed_gateway):
    url = keyed_gateway.url
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret-key"}):
        response = speak(url, json={"text": "Oli?"}, headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert response.headers["www-authenticate"] == "Bearer"
    assert requests.get(f"{url}/v1/voices", timeout=10).status_code == 401
    ok = speak(url, json={"text": "Oli?"}, headers={"Authorization": "Bearer s3cret-key"})
    assert ok.status_code == 200 and len(ok.content) > 0
    assert speak(url, json={"text": "Oli?"}, headers={"X-API-Key": "s3cret-key"}).status_code == 200
    # Health and metrics stay open for probes and scrapers.
    assert requests.get(f"{url}/health", timeout=10).status_code == 200
    assert requests.get(f"{url}/metrics", timeout=10).status_code == 200


async def test_api_key_guards_websocket(keyed_gateway):
    url = keyed_gateway.ws_url + WS_PATH
    async with websockets.connect(url) as ws:  # no key at all
        await ws.send(json.dumps({"input": "Oli?"}))
        assert json.loads(await ws.recv())["code"] == "invalid_api_key"
        with pytest.raises(websockets.ConnectionClosed):
            await ws.recv()
        assert ws.close_code == 1008
    headers = {"Authorization": "Bearer s3cret-key"}
    async with websockets.connect(url, additional_headers=headers) as ws:
        await ws.send(json.dumps({"input": "Oli?"}))
        assert json.loads(await ws.recv())["type"] == "start"
    async with websockets.connect(url, additional_headers=headers) as ws:
        # An auth message as well does no harm: it is acknowledged, not spoken.
        await ws.send(json.dumps({"type": "auth", "api_key": "s3cret-key"}))
        assert json.loads(await ws.recv()) == {"type": "auth", "status": "ok"}
    async with websockets.connect(url) as ws:  # browsers: a first auth message
        await ws.send(json.dumps({"type": "auth", "api_key": "s3cret-key"}))
        assert json.loads(await ws.recv()) == {"type": "auth", "status": "ok"}
        await ws.send(json.dumps({"input": "Oli?"}))
        assert json.loads(await ws.recv())["type"] == "start"
    async with websockets.connect(url) as ws:
        await ws.send(json.dumps({"type": "auth", "api_key": "nope"}))
        assert json.loads(await ws.recv())["code"] == "invalid_api_key"
        with pytest.raises(websockets.ConnectionClosed):
            await ws.recv()


# -- limits --------------------------------------------------------------------


async def test_oversized_ws_message_is_refused_and_the_connection_survives(gateway, llm):
    async with websockets.connect(gateway.ws_url + WS_PATH) as ws:
        await ws.send(json.dumps({"input": "x" * 70_000}))
        frame = json.loads(await ws.recv())
        assert frame["code"] == "message_too_large" and "65536" in frame["message"]
        await ws.send(json.dumps({"input": "Oli otya?"}))
        assert json.loads(await ws.recv())["type"] == "start"


async def test_ws_queue_is_bounded(make_gateway, llm):
    gateway = make_gateway(WS_MAX_QUEUED_MESSAGES="1")
    llm.control(tokens_per_s=100)
    async with websockets.connect(gateway.ws_url + WS_PATH) as ws:
        await ws.send(json.dumps({"input": "Oli otya leero?", "segment_id": 0}))
        assert json.loads(await ws.recv())["type"] == "start"  # 0 speaks
        for i in (1, 2):  # 1 waits, 2 is refused
            await ws.send(json.dumps({"input": "Oli otya leero?", "segment_id": i}))
        refused, ends = None, []
        while len(ends) < 2:
            frame = await asyncio.wait_for(ws.recv(), timeout=30)
            if isinstance(frame, bytes):
                continue
            message = json.loads(frame)
            if message["type"] == "error":
                refused = message
            elif message["type"] == "end":
                ends.append(message["segment_id"])
        assert refused["code"] == "too_many_messages" and refused["segment_id"] == 2
        assert ends == [0, 1]


async def test_idle_websocket_is_closed_and_pings_keep_it_alive(make_gateway, llm):
    gateway = make_gateway(WS_IDLE_TIMEOUT_S="1.5", WS_PING_INTERVAL_S="0.3", WS_PING_TIMEOUT_S="1")
    async with websockets.connect(gateway.ws_url + WS_PATH) as ws:
        started = time.monotonic()
        await asyncio.sleep(0.9)  # several pings answered: still open
        await ws.send(json.dumps({"input": "Oli?", "segment_id": 1}))
        frame: str | bytes = b""
        while isinstance(frame, bytes) or json.loads(frame)["type"] != "end":
            frame = await asyncio.wait_for(ws.recv(), timeout=30)
        with pytest.raises(websockets.ConnectionClosedOK):
            await asyncio.wait_for(ws.recv(), timeout=10)
        assert ws.close_code == 1000 and "idle" in ws.close_reason
        assert time.monotonic() - started >= 1.5


def test_cors_is_configurable(make_gateway, llm, gateway):
    cors = make_gateway(CORS_ALLOW_ORIGINS="https://app.example.org")
    preflight = {
        "Origin": "https://app.example.org",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,authorization",
    }
    url = "/v1/audio/speech/stream"
    response = requests.options(cors.url + url, headers=preflight, timeout=10)
    assert response.headers["access-control-allow-origin"] == "https://app.example.org"
    response = requests.options(
        cors.url + url, headers={**preflight, "Origin": "https://evil.example"}, timeout=10
    )
    assert "access-control-allow-origin" not in response.headers
    # Off by default.
    response = requests.options(gateway.url + url, headers=preflight, timeout=10)
    assert "access-control-allow-origin" not in response.headers


# -- backpressure ----------------------------------------------------------------


async def test_a_consumer_that_stops_pulling_is_bounded_and_closing_aborts_upstream_first(
    standin_server, tmp_path
):
    """In process, through the serving layer's own stream: a consumer that takes one
    chunk and stops holds at most the bounded buffer (generation pauses); closing the
    stream aborts the upstream request before the slot is freed."""
    llm_server = standin_server
    llm_server.reset()
    llm_server.control(tokens_per_s=200, tokens_per_segment=2000)  # 10 s to write
    settings = Settings(
        llm_base_url=llm_server.base_url,
        model_name="spark-tts",
        stream_buffer_chunks=2,
        segment_lookahead=1,
    )
    decoder = load_decoder(GOLDEN_BICODEC)
    metrics = Metrics()
    llm = LLMClient(
        settings.llm_base_url, "EMPTY", settings.model_name, on_abort=metrics.upstream_aborts.inc
    )
    worker = DecodeWorker(decoder, metrics=metrics)
    worker.start()
    voices = VoiceService(
        settings, VoiceCatalog.load(), VoiceLibrary(tmp_path), None, metrics, "not needed here"
    )
    service = SpeechService(settings, llm, worker, voices, metrics)
    long_text = "Oli otya leero mukwano gwange wange nnyo?"
    job = await service.prepare(long_text, max_tokens=4096)
    stream = await service.open(job, "stream")
    slot_freed_after_abort: list[bool] = []
    release = service.slots.release

    def record_release(stream: PlaybackClock) -> None:
        slot_freed_after_abort.append(metrics.upstream_aborts._value.get() == 1)
        release(stream)

    service.slots.release = record_release  # type: ignore[method-assign]
    try:
        await anext(stream.audio())
        await asyncio.sleep(0.5)
        # Generation paused: the upstream request is still open, the buffer is full.
        stats = await llm_server.astats()
        assert stats["running"] == 1
        # Spans decoded so far: the sum of the worker's batch-size histogram.
        spans_decoded = "tts_decoder_batch_spans_sum"
        decoded_while_paused = metrics.registry.get_sample_value(spans_decoded)
        await asyncio.sleep(0.5)
        assert metrics.registry.get_sample_value(spans_decoded) == decoded_while_paused  # no more
        assert service.slots.active == 1
        await stream.aclose()
        assert slot_freed_after_abort == [True]
        assert service.slots.active == 0
        stats = await llm_server.await_for(lambda s: s["running"] == 0, 10)
        assert stats["aborted"] == 1
    finally:
        await stream.aclose()
        await worker.close()
        await llm.close()


def test_a_decoder_on_the_cpu_takes_half_the_cores_unless_told():
    cores = len(os.sched_getaffinity(0))
    assert decoder_threads(None, "cpu") == max(1, cores // 2)
    assert decoder_threads(3, "cpu") == 3
    assert decoder_threads(None, "cuda") is None  # PyTorch's own choice
    assert decoder_threads(2, "cuda") == 2
