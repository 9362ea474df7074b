"""Request records, seeded texts, wire helpers, and the normal HTTP / WebSocket clients.

Ordinary requests go through the package's :class:`~decoder_gateway.client.GatewayClient`;
what only a fault test does (raw sockets, hand-made frames) is built here from the wire
helpers.
"""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import json
import os
import random
import re
import time
import wave
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from decoder_gateway.api.protocol import SAMPLE_RATE
from decoder_gateway.client import (
    OPENAI_SPEECH_PATH,
    SPEECH_STREAM_PATH,
    SPEECH_WS_PATH,
    ClientError,
    ConnectFailed,
    GatewayClient,
    ReplyTimeout,
    ServerError,
    SpeechResponse,
    SpeechSocket,
    StreamBroken,
    TextInSocket,
)
from decoder_gateway.llm.prompt import GENDERS, LEVELS
from decoder_gateway.settings import Settings as GatewaySettings
from decoder_gateway.text import split_segments
from decoder_gateway.voices.catalog import VoiceCatalog
from devtools.paths import GOLDEN_SPEAKER

T = TypeVar("T")
S = TypeVar("S", SpeechSocket, TextInSocket)


def gateway_default(name: str) -> Any:
    """The default of a gateway setting: what a gateway started without it uses."""
    return GatewaySettings.model_fields[name].default


HOST = "127.0.0.1"  # loopback only, always
BYTES_PER_TOKEN = 2 * SAMPLE_RATE // 50  # PCM16 of one semantic token (50 per second)
STANDIN_MODEL = "spark-tts"
STANDIN_TOKENS_PER_WORD = 10
VLLM_SEMANTIC_LENGTH = 60
HTTP_PATH = SPEECH_STREAM_PATH
OPENAI_PATH = OPENAI_SPEECH_PATH
WS_PATH = SPEECH_WS_PATH
# Reference clips the library client clones (the speaker encoder's golden clips).
CLIPS = sorted((GOLDEN_SPEAKER / "clips").glob("*.wav"))
# The gateway's defaults (the run leaves them as they are, SEGMENT_LOOKAHEAD set explicitly).
SEGMENT_LOOKAHEAD: int = gateway_default("segment_lookahead")  # upstream streams per request
MAX_TEXT_CHARS: int = gateway_default("max_text_chars")
WS_MAX_MESSAGE_BYTES: int = gateway_default("ws_max_message_bytes")
MAX_REQUEST_BODY_BYTES: int = gateway_default("max_request_body_bytes")
# Requests whose text holds this word get no stand-in fault (its fault_exclude).
NO_FAULT_MARKER = "zqclean"
# Candidates the designing client asks for (generated concurrently, under one slot).
DESIGN_CANDIDATES = 2
GLOBAL_TOKENS = 32
WAV_DATA_URL = "data:audio/wav;base64,"

CATALOG = VoiceCatalog.load()  # the packaged six
VOICES = CATALOG.ids
SPEAKER_IDS = [voice.speaker_id for voice in CATALOG]
WORDS = (
    "market morning farmer tomato onion banana village stall river water school "
    "teacher student clinic nurse doctor road lake rain weather football team family "
    "child mother father friend house garden kitchen bread coffee music song evening "
    "bicycle station letter window door table chair bridge forest mountain sunrise"
).split()
SHORT_WORDS = "go to at in on up we me be so no do it is as by my he an or".split()

COMPLETED, ERROR, ABANDONED, LOST = "completed", "explicit_error", "abandoned", "lost"
CANCELLED = "cancelled"  # stopped by its client's cancel (a barge-in), answered as promised
OUTCOMES = (COMPLETED, ERROR, ABANDONED, CANCELLED, LOST)
# A cancel's answer later than this is an anomaly (the gateway promises 0.5 s; the
# rest is room for a machine shared with the LLM, the faults and every other client).
CANCEL_ANSWER_BOUND_S = 2.0


# --------------------------------------------------------------------------------------
# Settings and records


@dataclass
class RunSettings:
    """What one run does (the report's ``settings``)."""

    duration_s: float
    clients: int
    request_timeout_s: float
    never_read_s: float
    fault_interval_s: float
    llm_restarts: int
    llm_outages: int
    restart_down_s: float
    outage_down_s: float
    settle_s: float
    llm_timeout_s: float
    seed: int
    slow_client_timeout_s: float = 3.0
    faults: bool = True
    only: tuple[str, ...] = ()  # client and in-band fault kinds to inject (all when empty)


@dataclass
class Request:
    """One request a client started, and what became of it."""

    client: str  # "http-0", "ws-3", "textin-1", "voices-0", "design-0", "fault-12"
    # "http" | "ws" | "textin" (one utterance of a streaming-text session) | "voices"
    # (one upload, speech in the cloned voice, and its deletion) | "design" (a design,
    # one candidate saved, speech in it, and its deletion)
    transport: str
    kind: str  # "normal", a fault kind, or "<fault kind>/follow-up"
    started: float
    expected_bytes: int | None = None
    expect_error: bool = False  # a malformed or oversized request
    # Upstream streams the gateway may hold for it while it is live (SEGMENT_LOOKAHEAD
    # at most, one per segment of its text; none for a request it must refuse).
    upstream: int = SEGMENT_LOOKAHEAD
    outcome: str = ""
    reason: str = ""
    received: int = 0  # audio bytes
    first_audio_s: float | None = None
    duration_s: float | None = None
    status: int | None = None  # HTTP status of the answer
    error_code: str | None = None  # the code of an HTTP error body or a WS error frame
    error_param: str | None = None  # the param of an HTTP error body

    def audio(self, size: int) -> None:
        """``size`` bytes of audio arrived (the first ones set the time to first audio)."""
        if self.first_audio_s is None:
            self.first_audio_s = time.monotonic() - self.started
        self.received += size

    def end(self, outcome: str, reason: str = "") -> None:
        if not self.outcome:  # the first verdict stands
            self.outcome, self.reason = outcome, reason
            self.duration_s = time.monotonic() - self.started


@dataclass
class Recorder:
    requests: list[Request] = field(default_factory=list)
    faults: Counter[str] = field(default_factory=Counter)
    anomalies: list[str] = field(default_factory=list)
    # The designing client's steps that succeeded: "designs", "candidates", "saved",
    # "spoken" (speech in the saved voice completed).
    design_steps: Counter[str] = field(default_factory=Counter)

    def start(self, client: str, transport: str, kind: str, **kw: Any) -> Request:
        request = Request(client, transport, kind, time.monotonic(), **kw)
        self.requests.append(request)
        return request

    def anomaly(self, text: str) -> None:
        self.anomalies.append(text)


def audio_verdict(request: Request, wire_samples: int | None = None) -> tuple[str, str]:
    """Outcome of a stream that ended cleanly, from its byte count."""
    n = request.received
    if n <= 0:
        return LOST, "clean end without audio"
    if n % BYTES_PER_TOKEN:
        return LOST, f"clean end after {n} bytes, not a multiple of {BYTES_PER_TOKEN}"
    if wire_samples is not None and wire_samples * 2 != n:
        return LOST, f"end says {wire_samples} samples, {n // 2} received"
    if request.expected_bytes is not None and n != request.expected_bytes:
        what = "short" if n < request.expected_bytes else "long"
        return LOST, f"clean end, {what}: {n} bytes of {request.expected_bytes}"
    return COMPLETED, ""


# --------------------------------------------------------------------------------------
# Texts


class Texts:
    """Seeded random texts and voices, with the audio length the LLM will write."""

    def __init__(self, rng: random.Random, llm_kind: str) -> None:
        self.rng = rng
        self.llm_kind = llm_kind

    def sentence(self, words: int) -> str:
        chosen = [self.rng.choice(WORDS) for _ in range(words)]
        return " ".join([chosen[0].capitalize(), *chosen[1:]]) + "."

    def text(self, sentences: tuple[int, int] = (1, 3), words: tuple[int, int] = (2, 8)) -> str:
        count = self.rng.randint(*sentences)
        return " ".join(self.sentence(self.rng.randint(*words)) for _ in range(count))

    def long_text(self) -> str:
        """~25 s of audio: long enough to outlast a quick client."""
        return self.text(sentences=(12, 12), words=(9, 11))

    def huge_text(self) -> str:
        """Short words up to ~4800 characters: ~320 s (10 MB) of audio with the stand-in.

        That is more than the socket buffers of both ends can hold (Linux autotunes a
        send buffer up to 4 MB), so a client that never reads holds the stream up.
        """
        sentences: list[str] = []
        while sum(len(x) + 1 for x in sentences) < MAX_TEXT_CHARS - 240:
            chosen = [self.rng.choice(SHORT_WORDS) for _ in range(10)]
            sentences.append(" ".join([chosen[0].capitalize(), *chosen[1:]]) + ".")
        return " ".join(sentences)

    @staticmethod
    def without_faults(text: str) -> str:
        """``text`` with :data:`NO_FAULT_MARKER` in every sentence: no stand-in fault hits it."""
        return text.replace(".", f" {NO_FAULT_MARKER}.")

    def voice_fields(self) -> dict[str, Any]:
        pick = self.rng.random()
        if pick < 0.6:
            return {"voice": self.rng.choice(VOICES)}
        if pick < 0.85:
            return {"speaker_id": self.rng.choice(SPEAKER_IDS)}
        return {}

    def expectations(self, text: str) -> dict[str, Any]:
        """``Request`` fields for a valid request of ``text``."""
        segments = len(split_segments(text))
        return {
            "expected_bytes": self.expected_bytes(text),
            "upstream": min(SEGMENT_LOOKAHEAD, segments),
        }

    def expected_bytes(self, text: str) -> int | None:
        """Audio bytes of a complete answer to ``text`` (None when unknown)."""
        if self.llm_kind == "standin":
            return BYTES_PER_TOKEN * STANDIN_TOKENS_PER_WORD * len(text.split())
        if self.llm_kind == "vllm":
            return BYTES_PER_TOKEN * VLLM_SEMANTIC_LENGTH * len(split_segments(text))
        return None


# --------------------------------------------------------------------------------------
# Wire helpers


def http_request_bytes(
    port: int, path: str, body: bytes, content_type: str = "application/json"
) -> bytes:
    """The bytes of a POST with a Content-Length, for raw sockets."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def http_post(port: int, body: dict[str, Any], path: str = HTTP_PATH) -> bytes:
    """The bytes of a speech request, for raw sockets."""
    return http_request_bytes(port, path, json.dumps(body).encode())


def ws_handshake(port: int, origin: str | None = None) -> bytes:
    """A client's opening handshake on :data:`WS_PATH` (RFC 6455), for raw sockets."""
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {WS_PATH} HTTP/1.1",
        f"Host: {HOST}:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        *([f"Origin: {origin}"] if origin else []),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def ws_text_frame(payload: bytes) -> bytes:
    """A masked client text frame (RFC 6455)."""
    size = len(payload)
    if size < 126:
        head = bytes([0x81, 0x80 | size])
    elif size < 1 << 16:
        head = bytes([0x81, 0x80 | 126]) + size.to_bytes(2, "big")
    else:
        head = bytes([0x81, 0x80 | 127]) + size.to_bytes(8, "big")
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def parse_error_body(raw: bytes) -> dict[str, Any] | None:
    """The ``error`` object of an OpenAI-shaped error body (None when it is not one)."""
    try:
        error = json.loads(raw)["error"]
        if not isinstance(error, dict) or not isinstance(error.get("message"), str):
            return None
    except (ValueError, KeyError, TypeError):
        return None
    return error


def http_error_reason(request: Request, status: int, raw: bytes, rec: Recorder) -> str:
    """``http <status> <code>`` of an error answer, noted on ``request``; odd bodies are
    anomalies."""
    request.status = status
    error = parse_error_body(raw)
    if error is None:
        rec.anomaly(f"HTTP {status} without a JSON error body: {raw[:200]!r}")
        code = "?"
    else:
        code = error.get("code") or error.get("type")
        request.error_code = None if code is None else str(code)
        request.error_param = error.get("param")
    if status < 400:
        rec.anomaly(f"HTTP {status} answered a speech request")
    return f"http {status} {code}"


_SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(?:\{([^}]*)\})?\s+(\S+)", re.M)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
REQUESTS_FAMILY = ("tts_requests_total", "gateway_requests_total")
ACTIVE_STREAMS_FAMILY = ("tts_active_streams", "gateway_active_streams")
WS_ENDPOINTS = frozenset({"websocket", "ws"})  # the endpoint label of WS requests


def metric_samples(text: str, names: tuple[str, ...]) -> list[tuple[dict[str, str], float]]:
    """``(labels, value)`` of every sample of the metrics ``names`` in a Prometheus text."""
    samples = []
    for name, labels, value in _SAMPLE.findall(text):
        if name in names:
            samples.append((dict(_LABEL.findall(labels)), float(value)))
    return samples


def active_streams(text: str) -> int | None:
    """The gateway's active-streams gauge (None when the text has none)."""
    samples = metric_samples(text, ACTIVE_STREAMS_FAMILY)
    return round(sum(v for _, v in samples)) if samples else None


def slow_client_count(text: str, transport: str) -> int:
    """Requests of ``transport`` the gateway ended as ``slow_client`` so far."""
    total = 0.0
    for labels, value in metric_samples(text, REQUESTS_FAMILY):
        ws = labels.get("endpoint") in WS_ENDPOINTS
        if labels.get("outcome") == "slow_client" and ws == (transport == "ws"):
            total += value
    return round(total)


async def read_metrics_async(url: str) -> str | None:
    """``GET /metrics`` of the gateway (None when it does not answer 200)."""
    try:
        async with GatewayClient(url, timeout_s=10.0) as client:
            return await client.metrics()
    except ClientError:
        return None


# --------------------------------------------------------------------------------------
# The clients


class Clients:
    """HTTP and WebSocket requests, classified; the normal clients' loops."""

    def __init__(self, settings: RunSettings, url: str, port: int, llm_kind: str):
        self.s = settings
        self.url = url
        # The WebSocket sessions' client: no limit per frame, as each request is bounded
        # as a whole (:meth:`bounded`); it opens no HTTP pool.
        self.sockets = GatewayClient(url, timeout_s=None, connect_timeout_s=10.0)
        self.port = port
        self.llm_kind = llm_kind
        self.rec = Recorder()
        self.end_at = 0.0
        self.segment_ids = iter(range(1, 1 << 62))

    def running(self) -> bool:
        return time.monotonic() < self.end_at

    def gateway_client(self) -> GatewayClient:
        """A client with its own HTTP pool, each request limited to the request timeout."""
        return GatewayClient(self.url, timeout_s=self.s.request_timeout_s)

    # ---- HTTP -------------------------------------------------------------------

    async def http_request(
        self,
        client: GatewayClient,
        request: Request,
        body: dict[str, Any] | bytes,
        abandon_after_chunks: int | None = None,
        path: str = HTTP_PATH,
    ) -> None:
        """POST and classify; ``abandon_after_chunks``: leave after that many chunks."""
        await self.bounded(
            request, self._http_once(client, request, body, abandon_after_chunks, path)
        )

    async def bounded(
        self, request: Request, exchange: Awaitable[T], waiting_for: str = "end"
    ) -> T | None:
        """``exchange``'s result, or None when it ran past the request timeout or the
        client itself failed: the request is then LOST (no answer is an answer lost)."""
        try:
            return await asyncio.wait_for(exchange, self.s.request_timeout_s)
        except TimeoutError:
            state = f"{request.received} audio bytes" if request.received else "no audio"
            limit = self.s.request_timeout_s
            request.end(LOST, f"no {waiting_for} after {limit:g} s ({state})")
        except Exception as err:
            request.end(LOST, f"client failure {type(err).__name__}: {err}")
        return None

    async def _http_once(
        self,
        client: GatewayClient,
        request: Request,
        body: dict[str, Any] | bytes,
        abandon_after_chunks: int | None,
        path: str,
    ) -> None:
        try:
            async with client.post_stream(path, body) as response:
                request.status = response.status
                if response.content_type.startswith("text/event-stream"):
                    await self._read_sse(response, request)
                    return
                chunks = 0
                async for chunk in response.chunks():
                    request.audio(len(chunk))
                    chunks += 1
                    if abandon_after_chunks is not None and chunks >= abandon_after_chunks:
                        request.end(ABANDONED, "disconnected mid-stream")
                        return  # leaving the block closes the connection
            request.end(*audio_verdict(request))
        except ServerError as err:
            assert err.status is not None
            request.end(ERROR, http_error_reason(request, err.status, err.body, self.rec))
        except StreamBroken as err:
            if err.received is not None:
                request.end(ERROR, "http: body cut off mid-stream")
            else:
                request.end(ERROR, f"http: connection closed without a response ({err.detail})")
        except ConnectFailed:
            request.end(ERROR, "http: connection refused")
        except ReplyTimeout:
            request.end(LOST, "http: read timeout")

    async def _read_sse(self, response: SpeechResponse, request: Request) -> None:
        """``/v1/audio/speech`` with ``stream_format: sse``: deltas, then done or error."""
        async for event in response.events():
            kind = event.get("type")
            if kind == "speech.audio.delta":
                request.audio(len(base64.b64decode(event.get("audio", ""))))
            elif kind == "speech.audio.done":
                request.end(COMPLETED if request.received else LOST, "sse: done")
                return
            elif kind == "error":
                error = event.get("error") or {}
                request.error_code = error.get("code")
                request.end(ERROR, f"sse error event: {request.error_code}")
                return
            else:
                self.rec.anomaly(f"{request.client}: unknown SSE event {str(event)[:200]!r}")
        request.end(LOST, "sse: ended without a done or error event")

    # ---- WebSocket ----------------------------------------------------------------

    async def ws_connect(
        self, request: Request | None = None, origin: str | None = None
    ) -> SpeechSocket | None:
        """A seed WebSocket session, or None (and the request's error) when refused."""
        return await self._open(self.sockets.speech_socket(origin), request)

    async def text_in_connect(self, request: Request | None = None) -> TextInSocket | None:
        """A streaming-text WebSocket session, or None (and the request's error)."""
        return await self._open(self.sockets.text_in_socket(), request)

    async def _open(self, opening: Awaitable[S], request: Request | None) -> S | None:
        try:
            return await opening
        except ServerError as err:
            if request is not None:
                request.status = err.status
            reason = f"ws: handshake refused with HTTP {err.status}"
        except ConnectFailed as err:
            reason = f"ws: cannot connect ({type(err.__cause__).__name__})"
        if request is not None:
            request.end(ERROR, reason)
        return None

    async def ws_request(
        self,
        ws: SpeechSocket,
        request: Request,
        message: dict[str, Any] | str | bytes,
        abandon: str | None = None,
    ) -> bool:
        """Send one message, classify its answer; True when the connection is still usable.

        ``abandon``: "close" (a close frame) or "drop" (the TCP connection cut) after
        the first audio frame.
        """
        usable = await self.bounded(request, self._ws_once(ws, request, message, abandon))
        return bool(usable)

    async def _ws_once(
        self,
        ws: SpeechSocket,
        request: Request,
        message: dict[str, Any] | str | bytes,
        abandon: str | None,
    ) -> bool:
        segment_id = message.get("segment_id") if isinstance(message, dict) else None
        started = False
        try:
            async for data in ws.frames(message):
                if isinstance(data, bytes):
                    if not started:
                        self.rec.anomaly(f"{request.client}: audio before 'start'")
                    request.audio(len(data))
                    if abandon is not None:
                        if abandon == "drop":  # the TCP connection cut, no close frame
                            ws.connection.transport.abort()
                        else:
                            await ws.close()
                        request.end(ABANDONED, f"ws: {abandon} mid-stream")
                        return False
                    continue
                kind = data.get("type")
                echoed = data.get("segment_id")
                # A message refused unread (too big) cannot have its segment_id echoed.
                unread = request.expect_error and kind == "error" and echoed is None
                if segment_id is not None and echoed != segment_id and not unread:
                    self.rec.anomaly(
                        f"{request.client}: {kind} for segment {echoed!r}, expected {segment_id!r}"
                    )
                if kind == "start":
                    if started:
                        self.rec.anomaly(f"{request.client}: a second 'start'")
                    started = True
                elif kind == "end":
                    if not started:
                        self.rec.anomaly(f"{request.client}: 'end' without 'start'")
                    request.end(*audio_verdict(request, int(data.get("samples", -1))))
                    return True
                elif kind == "error":
                    request.error_code = data.get("code")
                    request.end(ERROR, f"ws error frame: {data.get('code')}")
                    return True
                else:
                    self.rec.anomaly(f"{request.client}: unknown message {str(data)[:200]!r}")
        except StreamBroken as err:
            if err.close_code is not None:
                request.end(ERROR, f"ws: closed with code {err.close_code}")
            else:
                request.end(ERROR, "ws: connection dropped without a close frame")
            return False
        return True  # not reached: the frames end with an end or error frame

    def ws_message(self, text: str, texts: Texts) -> dict[str, Any]:
        return {
            "input": text,
            **texts.voice_fields(),
            "temperature": round(texts.rng.uniform(0.3, 1.0), 2),
            "segment_id": f"s{next(self.segment_ids)}",
        }

    # ---- streaming text in ------------------------------------------------------------

    async def text_in_request(
        self, ws: TextInSocket, request: Request, text: str, texts: Texts
    ) -> bool:
        """One utterance over the streaming-text WebSocket, sent in random fragments
        (parts of words too); True when the session is still usable."""
        exchange = self._text_in_once(ws, request, text, texts)
        return bool(await self.bounded(request, exchange, waiting_for="session.done"))

    async def _text_in_once(
        self, ws: TextInSocket, request: Request, text: str, texts: Texts
    ) -> bool:
        try:
            await ws.configure(response_format="pcm", stream_audio=True, **texts.voice_fields())
            at = 0
            while at < len(text):  # fragments of 1-12 characters, a few ms apart
                size = texts.rng.randint(1, 12)
                await ws.write(text[at : at + size])
                at += size
                await asyncio.sleep(texts.rng.uniform(0, 0.01))
            await ws.done()
            wire_bytes, failed, error_code = 0, False, None
            async for data in ws.frames():
                if isinstance(data, bytes):
                    request.audio(len(data))
                    continue
                kind = data.get("type")
                if kind == "audio.start":
                    continue
                if kind == "audio.done":
                    wire_bytes += int(data.get("total_bytes", 0))
                    failed = failed or bool(data.get("error"))
                elif kind == "error":
                    error_code = error_code or data.get("code")
                elif kind == "session.done":
                    if error_code is not None or failed:
                        request.error_code = error_code
                        request.end(ERROR, f"textin error frame: {error_code}")
                    else:
                        request.end(*audio_verdict(request, wire_bytes // 2))
                    return True
                else:
                    self.rec.anomaly(f"{request.client}: unknown message {str(data)[:200]!r}")
        except StreamBroken as err:
            if err.close_code is not None:
                request.end(ERROR, f"textin: closed with code {err.close_code}")
            else:
                request.end(ERROR, "textin: connection dropped without a close frame")
            return False
        return True  # not reached: the frames end with session.done

    # ---- normal clients ---------------------------------------------------------------

    async def http_client(self, index: int) -> None:
        name = f"http-{index}"
        texts = Texts(random.Random(self.s.seed * 1000 + index), self.llm_kind)
        async with self.gateway_client() as client:
            while self.running():
                text = texts.text()
                body = {"text": text, **texts.voice_fields()}
                request = self.rec.start(name, "http", "normal", **texts.expectations(text))
                await self.http_request(client, request, body)
                await asyncio.sleep(texts.rng.uniform(0, 0.1) + (0.5 if request.reason else 0))

    async def ws_client(self, index: int) -> None:
        texts = Texts(random.Random(self.s.seed * 1000 + 500 + index), self.llm_kind)

        async def speak(ws: SpeechSocket, request: Request, text: str) -> bool:
            return await self.ws_request(ws, request, self.ws_message(text, texts))

        await self._session_client(f"ws-{index}", "ws", self.ws_connect, texts, speak)

    async def text_in_client(self, index: int) -> None:
        """A voice agent: utterances written in fragments over one streaming-text session."""
        texts = Texts(random.Random(self.s.seed * 1000 + 800 + index), self.llm_kind)

        async def speak(ws: TextInSocket, request: Request, text: str) -> bool:
            return await self.text_in_request(ws, request, text, texts)

        await self._session_client(f"textin-{index}", "textin", self.text_in_connect, texts, speak)

    async def _session_client(
        self,
        name: str,
        transport: str,
        connect: Callable[[Request], Awaitable[S | None]],
        texts: Texts,
        speak: Callable[[S, Request, str], Awaitable[bool]],
    ) -> None:
        """Requests one after another over one WebSocket, reconnecting when ``speak``
        says the connection is no longer usable."""
        ws: S | None = None
        try:
            while self.running():
                text = texts.text()
                request = self.rec.start(name, transport, "normal", **texts.expectations(text))
                if ws is None:
                    ws = await connect(request)
                    if ws is None:
                        await asyncio.sleep(0.2)
                        continue
                if not await speak(ws, request, text):
                    await ws.close()
                    ws = None
                await asyncio.sleep(texts.rng.uniform(0, 0.1) + (0.5 if request.reason else 0))
        finally:
            if ws is not None:
                await ws.close()

    async def barging_client(self, index: int) -> None:
        """A voice agent whose user talks over it: utterances on the streaming-text and
        the seed WebSocket in turn, each cancelled a few audio frames in. The cancel's
        answer must come, say exactly how much audio was sent, and end that audio; the
        session then serves the next utterance."""
        name = f"barge-{index}"
        texts = Texts(random.Random(self.s.seed * 1000 + 700 + index), self.llm_kind)
        sessions: dict[str, SpeechSocket | TextInSocket | None] = {"textin": None, "ws": None}
        try:
            for turn in itertools.count():
                if not self.running():
                    break
                socket = ("textin", "ws")[turn % 2]
                text = texts.text(sentences=(2, 4), words=(5, 9))
                request = self.rec.start(name, "barge", "normal", **texts.expectations(text))
                ws = sessions[socket]
                if ws is None:
                    connect = self.text_in_connect if socket == "textin" else self.ws_connect
                    ws = sessions[socket] = await connect(request)
                    if ws is None:
                        await asyncio.sleep(0.2)
                        continue
                usable = await self.bounded(
                    request, self._barge_once(ws, request, text, texts), waiting_for="answer"
                )
                if not usable:
                    await ws.close()
                    sessions[socket] = None
                await asyncio.sleep(texts.rng.uniform(0, 0.1) + (0.5 if request.reason else 0))
        finally:
            for ws in sessions.values():
                if ws is not None:
                    await ws.close()

    async def _barge_once(
        self, ws: SpeechSocket | TextInSocket, request: Request, text: str, texts: Texts
    ) -> bool:
        """One utterance, cancelled after 1-6 audio frames (unless it ends first)."""
        cut_after = texts.rng.randint(1, 6)
        segment_id = f"b{next(self.segment_ids)}"
        if isinstance(ws, TextInSocket):
            await ws.configure(response_format="pcm", stream_audio=True, **texts.voice_fields())
            await ws.write(text)
            await ws.done()
            ends, answers = ("session.done",), "audio.cancelled"
        else:
            await ws.send({"input": text, "segment_id": segment_id, **texts.voice_fields()})
            ends, answers = ("end", "error"), "cancelled"
        frames = 0
        cancel_sent_at: float | None = None
        ended: tuple[str, str] | None = None  # the verdict of an utterance that ran out
        error_code = None
        try:
            while True:
                data = await ws.receive()
                if isinstance(data, bytes):
                    request.audio(len(data))
                    frames += 1
                    if frames == cut_after and cancel_sent_at is None and ended is None:
                        cancel_sent_at = time.monotonic()
                        if isinstance(ws, TextInSocket):
                            await ws.cancel()
                        else:
                            await ws.cancel(segment_id)
                    continue
                kind = data.get("type")
                if kind == "error":
                    error_code = error_code or data.get("code")
                if kind in ends:
                    if error_code is not None:
                        request.error_code = error_code
                        ended = (ERROR, f"barge error frame: {error_code}")
                    else:
                        samples = data.get("samples") if kind == "end" else None
                        ended = audio_verdict(request, samples)
                    if cancel_sent_at is None:
                        request.end(*ended)
                        return True
                elif kind == answers:
                    assert cancel_sent_at is not None, data
                    return self._cancel_verdict(request, data, cancel_sent_at, ended)
        except StreamBroken as err:
            request.end(ERROR, f"barge: connection ended ({err.close_code})")
            return False

    def _cancel_verdict(
        self,
        request: Request,
        answer: dict[str, Any],
        sent_at: float,
        ended: tuple[str, str] | None,
    ) -> bool:
        took = time.monotonic() - sent_at
        if took > CANCEL_ANSWER_BOUND_S:
            self.rec.anomaly(f"{request.client}: a cancel answered after {took:.2f} s")
        stopped = answer.get("utterance_index") is not None or answer.get("status") == "cancelled"
        if not stopped:  # it had ended first: the answer says nothing changed
            if ended is None:
                request.end(LOST, f"cancel answered as a no-op before the end: {answer}")
            else:
                request.end(*ended)
            return True
        sent = round(float(answer.get("audio_seconds", -1)) * SAMPLE_RATE) * 2
        if sent != request.received:
            request.end(LOST, f"cancel says {sent} bytes were sent, {request.received} came")
        else:
            request.end(CANCELLED, f"answered in {took * 1000:.0f} ms")
        return True

    async def voice_library_client(self, index: int) -> None:
        """Clones voices while the others speak: upload a clip, speak in the new voice
        over HTTP, delete it. One request each time; every step must answer."""
        name = f"voices-{index}"
        texts = Texts(random.Random(self.s.seed * 1000 + 900 + index), self.llm_kind)
        async with self.gateway_client() as client:
            for round_ in itertools.count():
                if not self.running():
                    break
                text = texts.text(sentences=(1, 1))
                request = self.rec.start(name, "voices", "normal", **texts.expectations(text))
                voice = f"lf{self.s.seed}x{index}x{round_}"
                exchange = self._clone_speak_delete(client, request, voice, text, texts)
                await self.bounded(request, exchange, waiting_for="answer")
                await asyncio.sleep(texts.rng.uniform(0.1, 0.4) + (0.5 if request.reason else 0))

    async def design_client(self, index: int) -> None:
        """Designs voices while the others speak (the run's gateway has VOICE_DESIGN on):
        design candidates for random style labels, save one under a new name, speak in
        it over HTTP, delete it. One request each time; every step must answer, and a
        design answered 200 must hold valid voices and previews."""
        name = f"design-{index}"
        texts = Texts(random.Random(self.s.seed * 1000 + 950 + index), self.llm_kind)
        async with self.gateway_client() as client:
            for round_ in itertools.count():
                if not self.running():
                    break
                text = texts.text(sentences=(1, 1))
                expectations = texts.expectations(text)
                # The candidates' streams are upstream at once during the design.
                expectations["upstream"] = max(DESIGN_CANDIDATES, expectations["upstream"])
                request = self.rec.start(name, "design", "normal", **expectations)
                voice = f"lfd{self.s.seed}x{index}x{round_}"
                exchange = self._design_save_speak(client, request, voice, text, texts)
                await self.bounded(request, exchange, waiting_for="answer")
                await asyncio.sleep(texts.rng.uniform(0.1, 0.4) + (0.5 if request.reason else 0))

    async def _design_save_speak(
        self, client: GatewayClient, request: Request, voice: str, text: str, texts: Texts
    ) -> None:
        style = {
            "gender": texts.rng.choice(GENDERS),
            "pitch": texts.rng.choice(LEVELS),
            "speed": texts.rng.choice(LEVELS),
        }
        preview = texts.sentence(texts.rng.randint(2, 6))
        try:
            candidates = await client.design_voices(
                **style,
                text=preview,
                candidates=DESIGN_CANDIDATES,
                seed=texts.rng.randrange(1 << 30),
            )
        except ServerError as err:
            assert err.status is not None
            request.end(
                ERROR, "design: " + http_error_reason(request, err.status, err.body, self.rec)
            )
            return
        if problem := self.design_problem(candidates, texts.expected_bytes(preview)):
            request.end(LOST, f"design answered 200 with {problem}")
            return
        self.rec.design_steps["designs"] += 1
        self.rec.design_steps["candidates"] += len(candidates)
        tokens = texts.rng.choice(candidates)["global_tokens"]
        try:
            await client.save_voice(voice, tokens, gender=style["gender"])
        except ServerError as err:
            assert err.status is not None
            request.end(
                ERROR, "save: " + http_error_reason(request, err.status, err.body, self.rec)
            )
            return
        self.rec.design_steps["saved"] += 1
        try:
            await self._http_once(client, request, {"text": text, "voice": voice}, None, HTTP_PATH)
        finally:
            try:
                await client.delete_voice(voice)
            except ServerError as err:
                self.rec.anomaly(f"{request.client}: DELETE {voice} answered {err.status}")
        if request.outcome == COMPLETED:
            self.rec.design_steps["spoken"] += 1

    @staticmethod
    def design_problem(candidates: list[dict[str, Any]], preview_bytes: int | None) -> str | None:
        """What is wrong with a design's candidates (None: nothing): each must hold 32
        global tokens in 0..4095 and a WAV preview of the audio the LLM was asked for."""
        if len(candidates) != DESIGN_CANDIDATES:
            return f"{len(candidates)} candidates, {DESIGN_CANDIDATES} asked for"
        for number, candidate in enumerate(candidates, 1):
            tokens = candidate.get("global_tokens")
            if (
                not isinstance(tokens, list)
                or len(tokens) != GLOBAL_TOKENS
                or not all(isinstance(t, int) and 0 <= t < 4096 for t in tokens)
            ):
                return f"candidate {number}: global_tokens {str(tokens)[:80]}"
            audio = candidate.get("audio")
            if not isinstance(audio, str) or not audio.startswith(WAV_DATA_URL):
                return f"candidate {number}: audio {str(audio)[:40]!r}"
            try:
                with wave.open(io.BytesIO(base64.b64decode(audio[len(WAV_DATA_URL) :]))) as wav:
                    shape = (wav.getframerate(), wav.getnchannels(), wav.getsampwidth())
                    pcm = len(wav.readframes(wav.getnframes()))
            except (ValueError, EOFError, wave.Error) as err:
                return f"candidate {number}: a preview that is no WAV file ({err})"
            if shape != (SAMPLE_RATE, 1, 2) or pcm <= 0:
                return f"candidate {number}: a preview of {pcm} bytes as {shape}"
            if preview_bytes is not None and pcm != preview_bytes:
                return f"candidate {number}: a preview of {pcm} PCM bytes, {preview_bytes} expected"
        return None

    async def _clone_speak_delete(
        self, client: GatewayClient, request: Request, voice: str, text: str, texts: Texts
    ) -> None:
        clip = texts.rng.choice(CLIPS)
        try:
            await client.add_voice(voice, clip.read_bytes(), clip.name, media_type="audio/wav")
        except ServerError as err:
            assert err.status is not None
            request.end(ERROR, http_error_reason(request, err.status, err.body, self.rec))
            return
        try:
            await self._http_once(client, request, {"text": text, "voice": voice}, None, HTTP_PATH)
        finally:
            try:
                await client.delete_voice(voice)
            except ServerError as err:
                self.rec.anomaly(f"{request.client}: DELETE {voice} answered {err.status}")
