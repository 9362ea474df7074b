"""Graceful shutdown of a real gateway process (``python -m decoder_gateway``).

On SIGTERM the gateway stops listening at once (new connections are refused), lets
the syntheses in progress finish (HTTP streams and WebSocket sessions alike) within
SHUTDOWN_GRACE_S, and exits with status 0; what runs longer is cut when the grace
period ends. Kubernetes relies on this (deploy/k8s, docs/kubernetes.md).
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field

import pytest
import requests
import websockets

from decoder_gateway.client import SpeechSocket
from devtools.process import HOST

SAMPLES_PER_TOKEN = 320
BYTES_PER_TOKEN = 2 * SAMPLES_PER_TOKEN
TEXT = "Oli otya?"
# Semantic tokens the stand-in writes for TEXT (under the gateway's max_tokens for it).
TOKENS = 250


@dataclass
class Download:
    """A streamed HTTP synthesis read on its own thread."""

    url: str
    body: dict
    data: bytearray = field(default_factory=bytearray)
    error: BaseException | None = None
    first_bytes: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)

    def start(self) -> Download:
        threading.Thread(target=self._run, daemon=True).start()
        assert self.first_bytes.wait(30), "no audio arrived"
        return self

    def _run(self) -> None:
        try:
            with requests.post(self.url, json=self.body, stream=True, timeout=60) as response:
                response.raise_for_status()
                for chunk in response.iter_content(chunk_size=None):
                    self.data += chunk
                    self.first_bytes.set()
        except BaseException as err:  # the outcome is what the test looks at
            self.error = err
        finally:
            self.first_bytes.set()
            self.done.set()


def refused(port: int) -> bool:
    """Whether a new TCP connection to the gateway's port is refused now."""
    try:
        socket.create_connection((HOST, port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def wait_refused(port: int, timeout_s: float = 5.0) -> float:
    """Poll until new connections are refused; the time it took."""
    started = time.monotonic()
    while not refused(port):
        assert time.monotonic() - started < timeout_s, "still accepting connections"
        time.sleep(0.05)
    return time.monotonic() - started


def exit_code(process: subprocess.Popen, timeout_s: float) -> int:
    try:
        return process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the gateway did not exit within {timeout_s:g} s")


def test_sigterm_lets_a_running_http_stream_finish_and_refuses_new_connections(make_gateway, llm):
    grace_s = 20.0
    gateway = make_gateway(SHUTDOWN_GRACE_S=str(grace_s))
    llm.control(tokens_per_s=80, tokens_per_segment=TOKENS)  # 3 s to write
    download = Download(f"{gateway.url}/v1/audio/speech/stream", {"text": TEXT}).start()
    signalled = time.monotonic()
    gateway.process.send_signal(signal.SIGTERM)

    wait_refused(gateway.port)
    assert not download.done.is_set(), "the stream ended before new connections were refused"
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{gateway.url}/livez", timeout=5)

    assert download.done.wait(30)
    assert download.error is None
    assert len(download.data) == TOKENS * BYTES_PER_TOKEN  # every byte, none cut
    assert exit_code(gateway.process, grace_s) == 0
    assert time.monotonic() - signalled < grace_s
    log = gateway.log_text()
    assert "Shutting down" in log and "Grace period" not in log


async def _start_synthesis(ws, segment_id: int) -> None:
    """Ask for TEXT and wait for its start frame: the synthesis runs."""
    await ws.send(json.dumps({"input": TEXT, "segment_id": segment_id, "continue": True}))
    first = json.loads(await asyncio.wait_for(ws.recv(), timeout=30))
    assert first["type"] == "start"


async def _closed_at(ws) -> tuple[float, int | None]:
    """Wait for the server to close ``ws``: (when, close code)."""
    with pytest.raises(websockets.ConnectionClosed):
        while True:
            await asyncio.wait_for(ws.recv(), timeout=30)
    return time.monotonic(), ws.close_code


async def test_sigterm_lets_a_running_websocket_synthesis_finish(make_gateway, llm):
    """The busy session gets its whole synthesis and its end frame, then close 1012
    (service restart); an idle session stays open until then and gets 1012 too."""
    grace_s = 20.0
    gateway = make_gateway(SHUTDOWN_GRACE_S=str(grace_s))
    llm.control(tokens_per_s=80, tokens_per_segment=TOKENS)  # 3 s to write
    url = f"{gateway.ws_url}/v1/audio/speech/stream/ws"
    async with websockets.connect(url) as busy, websockets.connect(url) as idle:
        await _start_synthesis(busy, 1)
        signalled = time.monotonic()
        gateway.process.send_signal(signal.SIGTERM)
        idle_closed = asyncio.create_task(_closed_at(idle))

        await asyncio.to_thread(wait_refused, gateway.port)
        frames, audio = await SpeechSocket(busy, timeout_s=30.0).exchange()
        ended = time.monotonic()
        assert frames[-1]["type"] == "end"
        assert len(audio) == TOKENS * BYTES_PER_TOKEN
        assert frames[-1]["samples"] == TOKENS * SAMPLES_PER_TOKEN
        busy_closed, busy_code = await _closed_at(busy)
        idle_closed_at, idle_code = await idle_closed
        assert busy_code == idle_code == 1012
        assert idle_closed_at >= ended - 0.05, "the idle session was closed mid-synthesis"
        assert busy_closed - ended < 2.0
    code = await asyncio.to_thread(exit_code, gateway.process, grace_s)
    assert code == 0
    assert time.monotonic() - signalled < grace_s


async def test_a_synthesis_asked_for_while_draining_is_refused(make_gateway, llm):
    """A WebSocket session that asks for a new synthesis while the gateway drains gets
    an explicit error frame, and does not keep the process alive: it exits once the
    synthesis that was running has ended, not at the grace limit."""
    grace_s = 30.0
    gateway = make_gateway(SHUTDOWN_GRACE_S=str(grace_s))
    llm.control(tokens_per_s=80, tokens_per_segment=TOKENS)  # 3 s to write
    url = f"{gateway.ws_url}/v1/audio/speech/stream/ws"
    async with websockets.connect(url) as busy, websockets.connect(url) as late:
        await _start_synthesis(busy, 1)
        gateway.process.send_signal(signal.SIGTERM)
        await asyncio.to_thread(wait_refused, gateway.port)
        await late.send(json.dumps({"input": TEXT, "segment_id": 7, "continue": True}))
        refusal = json.loads(await asyncio.wait_for(late.recv(), timeout=10))
        assert refusal["type"] == "error" and refusal["code"] == "shutting_down"
        assert refusal["segment_id"] == 7
        frames, audio = await SpeechSocket(busy, timeout_s=30.0).exchange()
        ended = time.monotonic()
        assert frames[-1]["type"] == "end" and len(audio) == TOKENS * BYTES_PER_TOKEN
        _, late_code = await _closed_at(late)
        assert late_code == 1012
    code = await asyncio.to_thread(exit_code, gateway.process, grace_s)
    assert code == 0
    assert time.monotonic() - ended < 5.0, "the draining process waited for the grace limit"


def test_a_stream_longer_than_the_grace_period_is_cut_when_it_ends(make_gateway, llm):
    grace_s = 2.0
    gateway = make_gateway(SHUTDOWN_GRACE_S=str(grace_s))
    llm.control(tokens_per_s=25, tokens_per_segment=TOKENS)  # 10 s: past the grace period
    download = Download(f"{gateway.url}/v1/audio/speech/stream", {"text": TEXT}).start()
    signalled = time.monotonic()
    gateway.process.send_signal(signal.SIGTERM)

    assert exit_code(gateway.process, grace_s + 8) == 0
    exited_after = time.monotonic() - signalled
    assert grace_s - 0.2 <= exited_after < grace_s + 8
    assert download.done.wait(10)
    assert len(download.data) < TOKENS * BYTES_PER_TOKEN
    assert download.error is not None  # the chunked body ends without its last chunk
    assert "Grace period of 2.0 s over" in gateway.log_text()
