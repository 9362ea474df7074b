"""Load and fault run: the gateway under concurrent clients while things go wrong.

    .venv/bin/python benchmarks/load_fault_run.py [--duration 60] [--clients 8]
        [--llm standin|vllm] [--llm-restarts N] [--llm-outages N] [--seed S]
        [--json PATH] [--log-dir DIR]

Everything runs on loopback (127.0.0.1) and stops by itself. By default it starts
its own LLM, the vLLM wire-format stand-in (``tests/support/standin_llm.py``) as a
subprocess on a fixed port at a GPU-like rate (200 tokens/s per stream), and its
own gateway process (``python -m decoder_gateway``, golden-small BiCodec decoder)
pointed at it; ``--llm vllm`` uses the real vLLM CPU server on the tiny
Spark-format model instead (about 60 s to start; LLM restarts and outages are then
off unless asked for, as each one costs another start).

For ``--duration`` seconds, ``--clients`` clients (half WebSocket, half HTTP) loop
over requests with short random texts and voices (seeded), while fault clients
and LLM faults are injected on a seeded schedule:

* a client that disconnects mid-stream (HTTP, WS: a close frame, or a dropped TCP
  connection), one that leaves before its first audio (while the stand-in stalls
  that one request), one that never reads (a streaming HTTP request or a WS message
  whose audio it never reads, for a long time, then gone);
* malformed and oversized messages (invalid JSON and binary WS frames, an unknown
  voice, 2 MB and 200 kB WS text frames, HTTP bodies that are not JSON or over the
  text limit); a WS connection that got an error frame must stay usable, so a valid
  request follows on it; 12 WS messages sent at once (more than the gateway queues),
  each of which must get its own ``end`` or ``error``;
* the LLM restarted (stopped, back on the same port ~2 s later), unreachable for a
  while (killed, back after ~5 s), and in-band stream faults of the stand-in
  (``POST /control`` with ``fault_requests: 1`` and ``error_after_tokens``,
  ``drop_after_tokens``, or a stall 5 s longer than the gateway's ``LLM_TIMEOUT_S``,
  which the run sets to ``--llm-timeout``, 10 s).

Every request a client starts ends in one of four classes: completed with audio
(the whole stream, of the length the LLM was asked to write), an explicit error the
client can tell (an HTTP error status with a JSON error, an HTTP body cut off
mid-stream, a WS error frame, a WS close or a refused connection), abandoned on
purpose by a fault client, or LOST: none of these (a hang past the per-request
timeout, a stream that ended cleanly but short, an ``end`` whose sample count is not
what was sent). During the run, upstream streams beyond what the live client requests
account for (orphans: kept after their client went) are tracked from the LLM's
running count. After the clients stop, the LLM must have no request left running,
and the gateway's memory (VmHWM, VmRSS) and ``/metrics`` are read. The exit status
is 1 when a request was lost, an upstream request was left running, or the gateway
died; 0 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from support.gateway_server import GatewayServer, free_port  # noqa: E402
from support.tiny_spark_lm import write_model  # noqa: E402
from support.vllm_server import VllmServer, vllm_venv_problem  # noqa: E402

from decoder_gateway.text import split_segments  # noqa: E402
from decoder_gateway.voices import VoiceCatalog  # noqa: E402

HOST = "127.0.0.1"  # loopback only, always
SAMPLE_RATE = 16000
BYTES_PER_TOKEN = 640  # 320 samples of PCM16 per semantic token
STANDIN_MODEL = "spark-tts"
STANDIN_TOKENS_PER_WORD = 10
VLLM_SEMANTIC_LENGTH = 60
SEGMENT_LOOKAHEAD = 2  # the gateway's SEGMENT_LOOKAHEAD: upstream streams per request, at most
HTTP_PATH = "/v1/audio/speech/stream"
WS_PATH = "/v1/audio/speech/stream/ws"
MAX_TEXT_CHARS = 5000  # the gateway's default MAX_TEXT_CHARS

VOICES = VoiceCatalog.load().ids  # the packaged six
SPEAKER_IDS = [241, 242, 243, 245, 246, 248]
WORDS = (
    "market morning farmer tomato onion banana village stall river water school "
    "teacher student clinic nurse doctor road lake rain weather football team family "
    "child mother father friend house garden kitchen bread coffee music song evening "
    "bicycle station letter window door table chair bridge forest mountain sunrise"
).split()

SHORT_WORDS = "go to at in on up we me be so no do it is as by my he an or".split()

COMPLETED, ERROR, ABANDONED, LOST = "completed", "explicit_error", "abandoned", "lost"
OUTCOMES = (COMPLETED, ERROR, ABANDONED, LOST)

CLIENT_FAULTS = (
    "http_disconnect",
    "ws_disconnect",
    "http_never_read",
    "ws_never_read",
    "ws_invalid_json",
    "ws_binary_frame",
    "ws_unknown_voice",
    "ws_oversized_frame",
    "http_invalid_json",
    "http_unknown_voice",
    "http_oversized_text",
    "ws_pipelined",
    "http_leave_before_audio",
    "ws_leave_before_audio",
)
INBAND_FAULTS = ("llm_error_after_tokens", "llm_drop_after_tokens", "llm_stall")
LLM_FAULTS = ("llm_restart", "llm_outage")


# --------------------------------------------------------------------------------------
# Records


@dataclass
class Request:
    """One request a client started, and what became of it."""

    client: str  # "http-0", "ws-3", "fault-12"
    transport: str  # "http" | "ws"
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

    def end(self, outcome: str, reason: str = "") -> None:
        if not self.outcome:  # the first verdict stands
            self.outcome, self.reason = outcome, reason
            self.duration_s = time.monotonic() - self.started


@dataclass
class Recorder:
    requests: list[Request] = field(default_factory=list)
    faults: Counter[str] = field(default_factory=Counter)
    anomalies: list[str] = field(default_factory=list)

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
        while sum(len(x) + 1 for x in sentences) < 4800 - 40:
            chosen = [self.rng.choice(SHORT_WORDS) for _ in range(10)]
            sentences.append(" ".join([chosen[0].capitalize(), *chosen[1:]]) + ".")
        return " ".join(sentences)

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
# The LLM


def _wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not up after {timeout_s:.0f} s")
        time.sleep(0.05)


class StandinLLM:
    """The stand-in as a subprocess on a fixed port; can be killed and started again."""

    kind = "standin"
    model = STANDIN_MODEL
    supports_control = True

    def __init__(self, log_dir: Path, tokens_per_s: float, prefill_s: float) -> None:
        self.port = free_port()
        self.root_url = f"http://{HOST}:{self.port}"
        self.base_url = f"{self.root_url}/v1"
        self.log_dir = log_dir
        self.tokens_per_s = tokens_per_s
        self.prefill_s = prefill_s
        self.process: subprocess.Popen[bytes] | None = None
        self.generation = 0
        self.totals: Counter[str] = Counter()  # stats of the instances that are gone
        self.running_at_stop = 0  # streams in flight when an instance was stopped
        self.description = (
            f"stand-in vLLM (subprocess): {tokens_per_s:g} tokens/s per stream after "
            f"{prefill_s * 1000:g} ms prefill, {STANDIN_TOKENS_PER_WORD} tokens per word"
        )

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.root_url}/health", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    def start(self) -> None:
        self.generation += 1
        log = (self.log_dir / f"standin-{self.generation}.log").open("wb")
        self.process = subprocess.Popen(
            [
                sys.executable,
                str(REPO / "tests" / "support" / "standin_llm.py"),
                *("--host", HOST, "--port", str(self.port), "--model", STANDIN_MODEL),
                *("--tokens-per-s", str(self.tokens_per_s), "--prefill-s", str(self.prefill_s)),
                *("--tokens-per-word", str(STANDIN_TOKENS_PER_WORD)),
            ],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        process = self.process

        def up() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"the stand-in exited; see {self.log_dir}")
            return self._healthy()

        _wait_until(up, 30, "the stand-in")

    def stop(self, graceful: bool) -> None:
        """SIGTERM (then SIGKILL after 3 s) when graceful, else SIGKILL at once."""
        stats = self.stats()
        if stats:
            self.running_at_stop += int(stats.get("running", 0))
            self.totals.update(
                {k: v for k, v in stats.items() if isinstance(v, int) and k != "running"}
            )
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        if graceful:
            process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(3)
        if process.poll() is None:
            process.kill()
        process.wait()

    def stats(self) -> dict[str, Any] | None:
        try:
            response = httpx.get(f"{self.root_url}/control/stats", timeout=5.0)
            response.raise_for_status()
            data = response.json()
        except (httpx.HTTPError, ValueError):
            return None
        data.pop("requests", None)
        data.pop("last_request", None)
        return data

    def running_requests(self) -> int | None:
        stats = self.stats()
        return None if stats is None else int(stats["running"])

    def control(self, **settings: Any) -> bool:
        try:
            response = httpx.post(f"{self.root_url}/control", json=settings, timeout=5.0)
            return response.status_code == 200
        except httpx.HTTPError:
            return False

    def summary(self) -> dict[str, Any]:
        final = self.stats() or {}
        totals = Counter(self.totals)
        totals.update({k: v for k, v in final.items() if isinstance(v, int) and k != "running"})
        keys = ("received", "rejected", "started", "completed", "aborted", "errored", "dropped")
        return {
            "instances": self.generation,
            **{k: totals.get(k, 0) for k in keys},
            "running_when_killed": self.running_at_stop,
        }


class VllmLLM:
    """The real vLLM CPU server on the tiny model, on a fixed port."""

    kind = "vllm"
    supports_control = False

    def __init__(self, log_dir: Path) -> None:
        problem = vllm_venv_problem()
        if problem:
            raise RuntimeError(problem)
        self.model_dir = write_model(log_dir / "tiny_spark_lm", VLLM_SEMANTIC_LENGTH)
        self.log_dir = log_dir
        self.port = free_port()
        self.server: VllmServer | None = None
        self.generation = 0
        self.model = "tiny-spark"
        self.root_url = f"http://{HOST}:{self.port}"
        self.base_url = f"{self.root_url}/v1"
        self.running_at_stop = 0
        self.description = (
            f"real vLLM (CPU) on the tiny Spark-format model, {VLLM_SEMANTIC_LENGTH} "
            "semantic tokens per sentence"
        )

    def start(self) -> None:
        self.generation += 1
        self.server = VllmServer(
            self.model_dir,
            self.log_dir / f"vllm-{self.generation}.log",
            served_model_name=self.model,
            port=self.port,
            max_model_len=2048,
        )
        self.server.start()

    def stop(self, graceful: bool) -> None:
        running = self.running_requests()
        self.running_at_stop += running or 0
        server, self.server = self.server, None
        if server is not None:
            server.stop(timeout_s=5.0 if graceful else 0.0)

    def running_requests(self) -> int | None:
        try:
            text = httpx.get(f"{self.root_url}/metrics", timeout=5.0).text
        except httpx.HTTPError:
            return None
        values = re.findall(r"^vllm:num_requests_running(?:\{[^}]*\})? ([0-9.eE+-]+)$", text, re.M)
        return round(sum(float(v) for v in values)) if values else None

    def control(self, **settings: Any) -> bool:
        return False

    def summary(self) -> dict[str, Any]:
        return {"instances": self.generation, "running_when_killed": self.running_at_stop}


LLM = StandinLLM | VllmLLM


# --------------------------------------------------------------------------------------
# Gateway memory


class MemorySampler(threading.Thread):
    """Samples VmHWM / VmRSS of a process from /proc every ``interval_s``."""

    def __init__(self, pid: int, interval_s: float = 0.25) -> None:
        super().__init__(name="memory-sampler", daemon=True)
        self.path = Path(f"/proc/{pid}/status")
        self.interval_s = interval_s
        self.peak_hwm_kb = 0
        self.peak_rss_kb = 0
        self.last_rss_kb = 0
        self.first_rss_kb = 0
        self.timeline: list[tuple[float, float]] = []  # (s, RSS MiB) every ~5 s
        self._t0 = time.monotonic()
        self._stop_event = threading.Event()

    def sample(self) -> None:
        try:
            text = self.path.read_text()
        except OSError:
            return
        fields = dict(re.findall(r"^(Vm\w+):\s+(\d+) kB", text, re.M))
        rss = int(fields.get("VmRSS", 0))
        self.first_rss_kb = self.first_rss_kb or rss
        self.last_rss_kb = rss
        self.peak_rss_kb = max(self.peak_rss_kb, rss)
        self.peak_hwm_kb = max(self.peak_hwm_kb, int(fields.get("VmHWM", 0)))
        elapsed = time.monotonic() - self._t0
        if not self.timeline or elapsed - self.timeline[-1][0] >= 5.0:
            self.timeline.append((round(elapsed, 1), round(rss / 1024, 1)))

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(self.interval_s)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)
        self.sample()


# --------------------------------------------------------------------------------------
# Client plumbing


@dataclass
class Settings:
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
    faults: bool = True
    only: tuple[str, ...] = ()  # client and in-band fault kinds to inject (all when empty)


class Run:
    """The clients, the fault schedule, and what they saw."""

    def __init__(self, settings: Settings, gateway: GatewayServer, llm: LLM) -> None:
        self.s = settings
        self.gateway = gateway
        self.llm = llm
        self.http_url = f"{gateway.url}{HTTP_PATH}"
        self.ws_url = f"{gateway.ws_url}{WS_PATH}"
        self.port = gateway.port
        self.rec = Recorder()
        self.rng = random.Random(settings.seed)
        self.end_at = 0.0
        self.llm_lock = asyncio.Lock()
        self.fault_tasks: set[asyncio.Task[None]] = set()
        self.segment_ids = iter(range(1, 1 << 62))
        self.orphans_peak = 0  # upstream streams no live client request accounts for
        self.orphan_seconds = 0.0  # ... summed over time (stream-seconds)
        # transport -> seconds the upstream request ran on after a client left before audio
        self.upstream_kept_s: dict[str, list[float]] = {}
        self.clients_done = False

    # ---- HTTP -------------------------------------------------------------------

    async def http_request(
        self,
        client: httpx.AsyncClient,
        request: Request,
        body: dict[str, Any] | bytes,
        abandon_after_chunks: int | None = None,
    ) -> None:
        """POST and classify; ``abandon_after_chunks``: leave after that many chunks."""
        try:
            await asyncio.wait_for(
                self._http_once(client, request, body, abandon_after_chunks),
                self.s.request_timeout_s,
            )
        except asyncio.TimeoutError:
            state = f"{request.received} audio bytes" if request.received else "no audio"
            request.end(LOST, f"no end after {self.s.request_timeout_s:g} s ({state})")
        except Exception as err:
            request.end(LOST, f"client failure {type(err).__name__}: {err}")

    async def _http_once(
        self,
        client: httpx.AsyncClient,
        request: Request,
        body: dict[str, Any] | bytes,
        abandon_after_chunks: int | None,
    ) -> None:
        kwargs: dict[str, Any] = (
            {"content": body, "headers": {"Content-Type": "application/json"}}
            if isinstance(body, bytes)
            else {"json": body}
        )
        status = 0
        try:
            async with client.stream("POST", self.http_url, **kwargs) as response:
                status = response.status_code
                if status != 200:
                    raw = await response.aread()
                    request.end(ERROR, http_error_reason(status, raw, self.rec))
                    return
                chunks = 0
                async for chunk in response.aiter_raw():
                    if not chunk:
                        continue
                    if request.first_audio_s is None:
                        request.first_audio_s = time.monotonic() - request.started
                    request.received += len(chunk)
                    chunks += 1
                    if abandon_after_chunks is not None and chunks >= abandon_after_chunks:
                        request.end(ABANDONED, "disconnected mid-stream")
                        return  # leaving the block closes the connection
            request.end(*audio_verdict(request))
        except httpx.RemoteProtocolError as err:
            if status == 200:
                request.end(ERROR, "http: body cut off mid-stream")
            else:
                request.end(ERROR, f"http: connection closed without a response ({err})")
        except httpx.ConnectError:
            request.end(ERROR, "http: connection refused")
        except httpx.ReadTimeout:
            request.end(LOST, "http: read timeout")

    # ---- WebSocket ----------------------------------------------------------------

    async def ws_connect(self, request: Request | None = None) -> ClientConnection | None:
        """A connection, or None (and the request's error) when it is refused."""
        try:
            return await connect(
                self.ws_url, max_size=None, open_timeout=10, close_timeout=2, ping_interval=None
            )
        except InvalidStatus as err:
            reason = f"ws: handshake refused with HTTP {err.response.status_code}"
        except (OSError, InvalidHandshake, asyncio.TimeoutError) as err:
            reason = f"ws: cannot connect ({type(err).__name__})"
        if request is not None:
            request.end(ERROR, reason)
        return None

    async def ws_request(
        self,
        ws: ClientConnection,
        request: Request,
        message: dict[str, Any] | str | bytes,
        abandon: str | None = None,
    ) -> bool:
        """Send one message, classify its answer; True when the connection is still usable.

        ``abandon``: "close" (a close frame) or "drop" (the TCP connection cut) after
        the first audio frame.
        """
        try:
            return await asyncio.wait_for(
                self._ws_once(ws, request, message, abandon), self.s.request_timeout_s
            )
        except asyncio.TimeoutError:
            state = f"{request.received} audio bytes" if request.received else "no audio"
            request.end(LOST, f"no end after {self.s.request_timeout_s:g} s ({state})")
            return False
        except Exception as err:
            request.end(LOST, f"client failure {type(err).__name__}: {err}")
            return False

    async def _ws_once(
        self,
        ws: ClientConnection,
        request: Request,
        message: dict[str, Any] | str | bytes,
        abandon: str | None,
    ) -> bool:
        segment_id = message.get("segment_id") if isinstance(message, dict) else None
        started = False
        try:
            await ws.send(json.dumps(message) if isinstance(message, dict) else message)
            while True:
                frame = await ws.recv()
                if isinstance(frame, bytes):
                    if not started:
                        self.rec.anomaly(f"{request.client}: audio before 'start'")
                    if request.first_audio_s is None:
                        request.first_audio_s = time.monotonic() - request.started
                    request.received += len(frame)
                    if abandon is not None:
                        if abandon == "drop":
                            ws.transport.abort()
                        else:
                            await ws.close()
                        request.end(ABANDONED, f"ws: {abandon} mid-stream")
                        return False
                    continue
                data = json.loads(frame)
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
                    request.end(ERROR, f"ws error frame: {data.get('code')}")
                    return True
                else:
                    self.rec.anomaly(f"{request.client}: unknown message {frame[:200]!r}")
        except ConnectionClosed as err:
            if err.rcvd is not None:
                request.end(ERROR, f"ws: closed with code {err.rcvd.code}")
            else:
                request.end(ERROR, "ws: connection dropped without a close frame")
            return False

    def ws_message(self, text: str, texts: Texts) -> dict[str, Any]:
        return {
            "input": text,
            **texts.voice_fields(),
            "temperature": round(texts.rng.uniform(0.3, 1.0), 2),
            "segment_id": f"s{next(self.segment_ids)}",
        }

    # ---- normal clients ---------------------------------------------------------------

    def running(self) -> bool:
        return time.monotonic() < self.end_at

    async def http_client(self, index: int) -> None:
        name = f"http-{index}"
        texts = Texts(random.Random(self.s.seed * 1000 + index), self.llm.kind)
        async with httpx.AsyncClient(timeout=self.s.request_timeout_s) as client:
            while self.running():
                text = texts.text()
                body = {"text": text, **texts.voice_fields()}
                request = self.rec.start(name, "http", "normal", **texts.expectations(text))
                await self.http_request(client, request, body)
                await asyncio.sleep(texts.rng.uniform(0, 0.1) + (0.5 if request.reason else 0))

    async def ws_client(self, index: int) -> None:
        name = f"ws-{index}"
        texts = Texts(random.Random(self.s.seed * 1000 + 500 + index), self.llm.kind)
        ws: ClientConnection | None = None
        try:
            while self.running():
                text = texts.text()
                request = self.rec.start(name, "ws", "normal", **texts.expectations(text))
                if ws is None:
                    ws = await self.ws_connect(request)
                    if ws is None:
                        await asyncio.sleep(0.2)
                        continue
                if not await self.ws_request(ws, request, self.ws_message(text, texts)):
                    await ws.close()
                    ws = None
                await asyncio.sleep(texts.rng.uniform(0, 0.1) + (0.5 if request.reason else 0))
        finally:
            if ws is not None:
                await ws.close()

    # ---- fault clients ----------------------------------------------------------------

    async def fault_http_disconnect(self, name: str, texts: Texts) -> None:
        text = texts.long_text()
        request = self.rec.start(name, "http", "http_disconnect")
        async with httpx.AsyncClient(timeout=self.s.request_timeout_s) as client:
            await self.http_request(
                client, request, {"text": text}, abandon_after_chunks=texts.rng.randint(1, 4)
            )

    async def fault_ws_disconnect(self, name: str, texts: Texts) -> None:
        request = self.rec.start(name, "ws", "ws_disconnect")
        ws = await self.ws_connect(request)
        if ws is None:
            return
        how = texts.rng.choice(["close", "drop"])
        try:
            await self.ws_request(ws, request, self.ws_message(texts.long_text(), texts), how)
        finally:
            await ws.close()

    async def _never_read(self, name: str, transport: str, payload: bytes, hold_s: float) -> None:
        """Send ``payload`` on a raw socket with a tiny receive buffer, never read, then go."""
        request = self.rec.start(name, transport, f"{transport}_never_read")
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (HOST, self.port)), 10)
            if transport == "ws":
                key = base64.b64encode(os.urandom(16)).decode()
                await loop.sock_sendall(
                    sock,
                    (
                        f"GET {WS_PATH} HTTP/1.1\r\nHost: {HOST}:{self.port}\r\n"
                        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                    ).encode(),
                )
                head = b""
                while b"\r\n\r\n" not in head:  # the handshake answer, nothing more
                    chunk = await asyncio.wait_for(loop.sock_recv(sock, 1), 10)
                    if not chunk:
                        request.end(ERROR, "ws: closed during the handshake")
                        return
                    head += chunk
                if not head.startswith(b"HTTP/1.1 101"):
                    request.end(ERROR, f"ws: handshake refused: {head.splitlines()[0]!r}")
                    return
            await loop.sock_sendall(sock, payload)
            await asyncio.sleep(hold_s)
            request.end(ABANDONED, f"never read for {hold_s:.0f} s")
        except (OSError, asyncio.TimeoutError) as err:
            request.end(ERROR, f"{transport}: cannot connect ({type(err).__name__})")
        finally:
            sock.close()  # unread data: the kernel resets the connection

    def _hold_s(self) -> float:
        return max(2.0, min(self.s.never_read_s, self.end_at - time.monotonic()))

    async def fault_http_never_read(self, name: str, texts: Texts) -> None:
        payload = http_post(self.port, {"text": texts.huge_text()})
        await self._never_read(name, "http", payload, self._hold_s())

    async def fault_ws_never_read(self, name: str, texts: Texts) -> None:
        message = json.dumps(self.ws_message(texts.huge_text(), texts)).encode()
        await self._never_read(name, "ws", ws_text_frame(message), self._hold_s())

    async def _leave_before_audio(self, name: str, transport: str, texts: Texts) -> None:
        """Send a request and leave before its first audio, while the LLM is slow to answer.

        The stand-in stalls this one request (matched by a word of its text) for
        0.8 x LLM_TIMEOUT_S after two tokens, so the gateway has no audio yet when the
        client goes; it should abort the upstream request at once. How long the
        stand-in's ``aborted`` count takes to go up after the client left is noted in
        ``upstream_kept_s`` (other aborts meanwhile can only make it look quicker).
        With vLLM: leave after 20 ms, nothing measured.
        """
        kind = f"{transport}_leave_before_audio"
        marker = f"zq{texts.rng.randrange(10**8)}"
        text = f"{texts.sentence(6)[:-1]} {marker}."
        request = self.rec.start(name, transport, kind, upstream=1)
        stall_s = 0.8 * self.s.llm_timeout_s
        control = self.llm.supports_control
        before: dict[str, Any] | None = None
        # No LLM restart or other in-band fault until the abort is timed.
        async with self.llm_lock:
            if control:
                ok = await asyncio.to_thread(
                    self.llm.control,
                    fault_requests=1,
                    fault_match=marker,
                    error_after_tokens=None,
                    drop_after_tokens=None,
                    stall_s=stall_s,
                    stall_after_tokens=2,
                )
                if not ok:
                    self.rec.anomaly(f"{kind}: POST /control failed")
                before = await asyncio.to_thread(self.llm.stats)
            ws: ClientConnection | None = None
            sock: socket.socket | None = None
            try:
                if transport == "ws":
                    ws = await self.ws_connect(request)
                    if ws is None:
                        return
                    await ws.send(json.dumps(self.ws_message(text, texts)))
                else:
                    loop = asyncio.get_running_loop()
                    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    sock.setblocking(False)
                    await asyncio.wait_for(loop.sock_connect(sock, (HOST, self.port)), 10)
                    await loop.sock_sendall(sock, http_post(self.port, {"text": text}))
                answer = await self._first_answer(ws, sock, 0.5 if control else 0.02)
                if answer is None:
                    request.end(ABANDONED, "left before the first audio")
                elif answer.startswith(("http 200", "ws start")):
                    request.end(ABANDONED, f"left after the first answer ({answer})")
                else:  # answered with an error before the client left
                    request.end(ERROR, answer)
            except (OSError, asyncio.TimeoutError) as err:
                request.end(ERROR, f"{transport}: cannot connect ({type(err).__name__})")
            finally:
                if ws is not None:
                    ws.transport.abort()
                if sock is not None:
                    sock.close()
            if before is not None and request.reason == "left before the first audio":
                kept = await self._time_to_abort(before, stall_s + 1.0)
                if kept is not None:
                    self.upstream_kept_s.setdefault(transport, []).append(round(kept, 2))

    async def _time_to_abort(self, before: dict[str, Any], patience_s: float) -> float | None:
        """Seconds until the stand-in counts one more aborted stream (None: cannot tell)."""
        left = time.monotonic()
        generation = self.llm.generation
        while time.monotonic() - left < patience_s:
            stats = await asyncio.to_thread(self.llm.stats)
            if stats is None or self.llm.generation != generation:
                return None
            if stats["aborted"] > before["aborted"]:
                return time.monotonic() - left
            await asyncio.sleep(0.1)
        return patience_s

    @staticmethod
    async def _first_answer(
        ws: ClientConnection | None, sock: socket.socket | None, wait_s: float
    ) -> str | None:
        """What the gateway answered within ``wait_s`` ("http 503", "ws error ..."), or None."""
        try:
            if ws is not None:
                frame = await asyncio.wait_for(ws.recv(), wait_s)
                if isinstance(frame, bytes):
                    return "ws start"
                data = json.loads(frame)
                if data.get("type") == "error":
                    return f"ws error frame: {data.get('code')}"
                return f"ws {data.get('type')}"
            assert sock is not None
            loop = asyncio.get_running_loop()
            head = await asyncio.wait_for(loop.sock_recv(sock, 4096), wait_s)
        except asyncio.TimeoutError:
            return None
        except ConnectionClosed as err:
            return f"ws: closed with code {err.rcvd.code if err.rcvd else None}"
        parts = head.split(b" ", 2)
        return f"http {parts[1].decode(errors='replace')}" if len(parts) > 1 else "http: closed"

    async def fault_http_leave_before_audio(self, name: str, texts: Texts) -> None:
        await self._leave_before_audio(name, "http", texts)

    async def fault_ws_leave_before_audio(self, name: str, texts: Texts) -> None:
        await self._leave_before_audio(name, "ws", texts)

    async def fault_ws_pipelined(self, name: str, texts: Texts) -> None:
        """Many messages at once: each must get its own end or error, in order."""
        requests: dict[str, Request] = {}
        messages = []
        for _ in range(12):
            text = texts.text(sentences=(1, 1), words=(2, 4))
            message = self.ws_message(text, texts)
            messages.append(message)
            requests[message["segment_id"]] = self.rec.start(
                name, "ws", "ws_pipelined", expected_bytes=texts.expected_bytes(text), upstream=0
            )
        first = next(iter(requests.values()))
        ws = await self.ws_connect(first)
        if ws is None:
            for request in requests.values():
                request.end(first.outcome, first.reason)
            return
        try:
            await asyncio.wait_for(
                self._ws_collect(ws, messages, requests, name), self.s.request_timeout_s
            )
        except asyncio.TimeoutError:
            pass
        except Exception as err:
            self.rec.anomaly(f"{name} (ws_pipelined): client failure {err!r}")
        finally:
            for request in requests.values():
                state = f"{request.received} audio bytes" if request.received else "no audio"
                request.end(LOST, f"no end after {self.s.request_timeout_s:g} s ({state})")
            await ws.close()

    async def _ws_collect(
        self,
        ws: ClientConnection,
        messages: list[dict[str, Any]],
        requests: dict[str, Request],
        name: str,
    ) -> None:
        for message in messages:
            await ws.send(json.dumps(message))
        order = list(requests)
        current: Request | None = None
        last_started = -1
        try:
            while any(not r.outcome for r in requests.values()):
                # The gateway works on the first unanswered message only.
                waiting = [r for r in requests.values() if not r.outcome]
                for r in waiting:
                    r.upstream = 1 if r is waiting[0] else 0
                frame = await ws.recv()
                if isinstance(frame, bytes):
                    if current is None:
                        self.rec.anomaly(f"{name} (ws_pipelined): audio outside start/end")
                        continue
                    if current.first_audio_s is None:
                        current.first_audio_s = time.monotonic() - current.started
                    current.received += len(frame)
                    continue
                data = json.loads(frame)
                kind, segment_id = data.get("type"), data.get("segment_id")
                request = requests.get(segment_id)
                if request is None:
                    self.rec.anomaly(f"{name} (ws_pipelined): {kind} for segment {segment_id!r}")
                    continue
                if kind == "start":
                    index = order.index(segment_id)
                    if index < last_started or current is not None:
                        self.rec.anomaly(f"{name} (ws_pipelined): {segment_id} out of order")
                    last_started, current = index, request
                elif kind == "end":
                    request.end(*audio_verdict(request, int(data.get("samples", -1))))
                    current = None if current is request else current
                elif kind == "error":
                    request.end(ERROR, f"ws error frame: {data.get('code')}")
                    current = None if current is request else current
        except ConnectionClosed as err:
            code = err.rcvd.code if err.rcvd is not None else None
            for request in requests.values():
                request.end(ERROR, f"ws: closed with code {code}")

    async def _ws_bad_then_good(
        self, name: str, kind: str, texts: Texts, bad: dict[str, Any] | str | bytes
    ) -> None:
        """A bad message must get an error; the connection must then still serve."""
        request = self.rec.start(name, "ws", kind, expect_error=True, upstream=0)
        ws = await self.ws_connect(request)
        if ws is None:
            return
        try:
            usable = await self.ws_request(ws, request, bad)
            if request.outcome == ERROR and not request.reason.startswith("ws error frame"):
                if kind != "ws_oversized_frame":  # closing on 2 MB (1009) is fair
                    self.rec.anomaly(f"{name} ({kind}): {request.reason}, not an error frame")
            if not usable:
                return
            text = texts.text()
            follow = self.rec.start(name, "ws", f"{kind}/follow-up", **texts.expectations(text))
            await self.ws_request(ws, follow, self.ws_message(text, texts))
            if follow.outcome == ERROR and follow.reason.startswith("ws: "):
                self.rec.anomaly(f"{name} ({kind}): connection unusable after the error frame")
        finally:
            await ws.close()

    async def fault_ws_invalid_json(self, name: str, texts: Texts) -> None:
        await self._ws_bad_then_good(name, "ws_invalid_json", texts, '{"input": "hello", ')

    async def fault_ws_binary_frame(self, name: str, texts: Texts) -> None:
        await self._ws_bad_then_good(name, "ws_binary_frame", texts, os.urandom(64))

    async def fault_ws_unknown_voice(self, name: str, texts: Texts) -> None:
        message = {**self.ws_message(texts.text(), texts), "voice": "klingon_male"}
        message.pop("speaker_id", None)
        await self._ws_bad_then_good(name, "ws_unknown_voice", texts, message)

    async def fault_ws_oversized_frame(self, name: str, texts: Texts) -> None:
        # A 2 MB text frame of valid JSON, or 200 kB (over WS_MAX_MESSAGE_BYTES' default).
        size = 2 * 1024 * 1024 if texts.rng.random() < 0.5 else 200 * 1024
        filler = "word " * (size // 5)
        await self._ws_bad_then_good(
            name, "ws_oversized_frame", texts, {"input": filler, "segment_id": "big"}
        )

    async def _http_bad(self, name: str, kind: str, body: dict[str, Any] | bytes) -> None:
        request = self.rec.start(name, "http", kind, expect_error=True, upstream=0)
        async with httpx.AsyncClient(timeout=self.s.request_timeout_s) as client:
            await self.http_request(client, request, body)
        if request.outcome == ERROR and not request.reason.startswith("http 4"):
            self.rec.anomaly(f"{name} ({kind}): {request.reason}, not a 4xx")

    async def fault_http_invalid_json(self, name: str, texts: Texts) -> None:
        await self._http_bad(name, "http_invalid_json", b'{"text": "hello" voice}')

    async def fault_http_unknown_voice(self, name: str, texts: Texts) -> None:
        await self._http_bad(name, "http_unknown_voice", {"text": texts.text(), "voice": "nope"})

    async def fault_http_oversized_text(self, name: str, texts: Texts) -> None:
        if texts.rng.random() < 0.5:
            text = texts.sentence(9) + " "
            text = (text * (MAX_TEXT_CHARS // len(text) + 20))[: MAX_TEXT_CHARS + 500]
        else:
            text = "word " * (2 * 1024 * 1024 // 5)  # a 2 MB body
        await self._http_bad(name, "http_oversized_text", {"text": text})

    # ---- LLM faults ---------------------------------------------------------------------

    async def llm_down(self, kind: str, graceful: bool, down_s: float) -> None:
        async with self.llm_lock:
            await asyncio.to_thread(self.llm.stop, graceful)
            await asyncio.sleep(down_s)
            await asyncio.to_thread(self.llm.start)

    async def fault_llm_restart(self, name: str, texts: Texts) -> None:
        await self.llm_down("llm_restart", True, self.s.restart_down_s)

    async def fault_llm_outage(self, name: str, texts: Texts) -> None:
        await self.llm_down("llm_outage", False, self.s.outage_down_s)

    async def _inband(self, kind: str, **fault: Any) -> None:
        """The stand-in's next request gets ``fault`` (and no other in-band fault)."""
        settings = {
            "error_after_tokens": None,
            "drop_after_tokens": None,
            "stall_s": 0.0,
            "fault_match": None,
        }
        async with self.llm_lock:
            ok = await asyncio.to_thread(
                self.llm.control, fault_requests=1, **{**settings, **fault}
            )
        if not ok:
            self.rec.anomaly(f"{kind}: POST /control failed")

    async def fault_llm_error_after_tokens(self, name: str, texts: Texts) -> None:
        tokens = texts.rng.randint(3, 40)
        await self._inband("llm_error_after_tokens", error_after_tokens=tokens)

    async def fault_llm_drop_after_tokens(self, name: str, texts: Texts) -> None:
        tokens = texts.rng.randint(3, 40)
        await self._inband("llm_drop_after_tokens", drop_after_tokens=tokens)

    async def fault_llm_stall(self, name: str, texts: Texts) -> None:
        """A stream that hangs for longer than the gateway's LLM_TIMEOUT_S."""
        await self._inband(
            "llm_stall",
            stall_s=self.s.llm_timeout_s + 5.0,
            stall_after_tokens=texts.rng.randint(3, 30),
        )

    # ---- the schedule -------------------------------------------------------------------

    def schedule(self) -> list[tuple[float, str]]:
        """(seconds after the start, fault kind), seeded.

        Every client and in-band fault once in the first 70% of the run, in a shuffled
        order, then more at random every ~``fault_interval_s`` until 90% of it; LLM
        restarts and outages spread over the middle of the run.
        """
        duration = self.s.duration_s
        if not self.s.faults:
            return []
        kinds = list(CLIENT_FAULTS) + (list(INBAND_FAULTS) if self.llm.supports_control else [])
        kinds = [k for k in kinds if not self.s.only or k in self.s.only]
        self.rng.shuffle(kinds)
        spacing = min(self.s.fault_interval_s, 0.7 * duration / max(1, len(kinds)))
        plan = [(0.5 + i * spacing, kind) for i, kind in enumerate(kinds)]
        t = plan[-1][0] if plan else 0.5
        while kinds:
            t += self.rng.expovariate(1 / self.s.fault_interval_s)
            if t > 0.9 * duration:
                break
            plan.append((t, self.rng.choice(kinds)))
        llm_events = ["llm_restart"] * self.s.llm_restarts + ["llm_outage"] * self.s.llm_outages
        for i, kind in enumerate(llm_events):
            down = self.s.restart_down_s if kind == "llm_restart" else self.s.outage_down_s
            at = duration * (0.2 + 0.45 * i / max(1, len(llm_events)))
            plan.append((min(at, max(0.0, duration - down - 3)), kind))
        return sorted(plan)

    async def run_faults(self, started: float) -> None:
        for index, (at, kind) in enumerate(self.schedule()):
            delay = started + at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if not self.running():
                break
            texts = Texts(random.Random(self.s.seed * 7919 + index), self.llm.kind)
            action: Callable[[str, Texts], Awaitable[None]] = getattr(self, f"fault_{kind}")
            self.rec.faults[kind] += 1
            task = asyncio.create_task(self._guarded(kind, action(f"fault-{index}", texts)))
            self.fault_tasks.add(task)
            task.add_done_callback(self.fault_tasks.discard)

    async def _guarded(self, kind: str, job: Awaitable[None]) -> None:
        try:
            await job
        except Exception as err:
            self.rec.anomaly(f"fault {kind} failed in the harness: {type(err).__name__}: {err}")

    async def watch_upstream(self) -> None:
        """Track upstream streams beyond what the live client requests account for.

        Each live request may have ``Request.upstream`` streams upstream (at most
        SEGMENT_LOOKAHEAD, one per segment of its text); more than all of them
        together for three samples in a row (over a second) are orphans: streams the
        gateway kept after their client went.
        """
        streak = 0
        while not self.clients_done:
            running = await asyncio.to_thread(self.llm.running_requests)
            allowed = sum(r.upstream for r in self.rec.requests if not r.outcome)
            excess = 0 if running is None else running - allowed
            streak = streak + 1 if excess > 0 else 0
            if streak >= 3:
                self.orphans_peak = max(self.orphans_peak, excess)
                self.orphan_seconds += excess * (1.5 if streak == 3 else 0.5)
            await asyncio.sleep(0.5)

    async def main(self) -> None:
        started = time.monotonic()
        self.end_at = started + self.s.duration_s
        ws_count = (self.s.clients + 1) // 2
        clients = [self.ws_client(i) for i in range(ws_count)]
        clients += [self.http_client(i) for i in range(self.s.clients - ws_count)]
        watcher = asyncio.create_task(self.watch_upstream())
        try:
            await asyncio.gather(self.run_faults(started), *clients)
            if self.fault_tasks:
                await asyncio.wait(set(self.fault_tasks))
        finally:
            self.clients_done = True
            await watcher


def http_post(port: int, body: dict[str, Any]) -> bytes:
    """The bytes of a speech request, for raw sockets."""
    data = json.dumps(body).encode()
    head = (
        f"POST {HTTP_PATH} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    return head.encode() + data


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


def http_error_reason(status: int, raw: bytes, rec: Recorder) -> str:
    """``http <status> <code>`` of an error answer; odd bodies are noted as anomalies."""
    try:
        error = json.loads(raw)["error"]
        code = error.get("code") or error.get("type")
        if not isinstance(error.get("message"), str):
            raise ValueError("no message")
    except (ValueError, KeyError, TypeError, AttributeError):
        rec.anomaly(f"HTTP {status} without a JSON error body: {raw[:200]!r}")
        code = "?"
    if status < 400:
        rec.anomaly(f"HTTP {status} answered a speech request")
    return f"http {status} {code}"


# --------------------------------------------------------------------------------------
# Report


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q) - 1]


def metrics_summary(text: str, limit: int = 40) -> list[str]:
    """The gateway's own series from a Prometheus text, histogram buckets left out."""
    lines = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name.startswith(("python_", "process_")) or name.endswith(("_bucket", "_created")):
            continue
        lines.append(line)
    return lines[:limit] + ([f"... {len(lines) - limit} more"] if len(lines) > limit else [])


def gateway_log_problems(log_text: str) -> dict[str, Any]:
    """Tracebacks and error lines in the gateway log (a few distinct ones shown)."""
    tracebacks = log_text.count("Traceback (most recent call last)")
    errors: Counter[str] = Counter()
    for line in log_text.splitlines():
        if " ERROR " in line or line.startswith("ERROR:"):
            errors[re.sub(r"[0-9a-f]{12,}|\d+", "N", line.split("ERROR", 1)[1])[:160]] += 1
    exceptions = Counter(
        m.group(0)[:160]
        for m in re.finditer(r"^\w+(?:\.\w+)*(?:Error|Exception)\b.*$", log_text, re.M)
    )
    return {
        "tracebacks": tracebacks,
        "error_lines": sum(errors.values()),
        "top_errors": [f"{n} x {text.strip()}" for text, n in errors.most_common(6)],
        "top_exceptions": [f"{n} x {text}" for text, n in exceptions.most_common(6)],
    }


def build_report(
    run: Run,
    llm: LLM,
    memory: MemorySampler,
    upstream_running: int | None,
    gateway_alive: bool,
    metrics_text: str | None,
    log_text: str,
    wall_s: float,
) -> dict[str, Any]:
    requests = run.rec.requests
    for request in requests:
        if not request.outcome:
            request.end(LOST, "never classified")
    outcomes = Counter(r.outcome for r in requests)
    reasons = Counter(r.reason for r in requests if r.outcome == ERROR)
    completed = [r for r in requests if r.outcome == COMPLETED]
    accepted_bad = [r for r in requests if r.expect_error and r.outcome == COMPLETED]
    for r in accepted_bad:
        run.rec.anomaly(f"{r.client} ({r.kind}): a bad request was answered with audio")
    first_audio = [r.first_audio_s for r in completed if r.first_audio_s is not None]
    audio_s = sum(r.received for r in requests) / 2 / SAMPLE_RATE
    lost = [r for r in requests if r.outcome == LOST]
    by_kind: dict[str, Counter[str]] = {"normal": Counter(), "fault clients": Counter()}
    for r in requests:
        by_kind["normal" if r.kind == "normal" else "fault clients"][r.outcome] += 1
    fault_outcomes: dict[str, Counter[str]] = {}
    for r in requests:
        if r.kind != "normal":
            fault_outcomes.setdefault(r.kind, Counter())[r.reason or r.outcome] += 1
    failures = []
    if lost:
        failures.append(f"{len(lost)} requests lost")
    if upstream_running is None:
        failures.append("upstream running count unknown")
    elif upstream_running:
        failures.append(f"{upstream_running} upstream requests left running")
    if not gateway_alive:
        failures.append("the gateway process died")
    return {
        "settings": asdict(run.s),
        "llm": llm.description,
        "wall_s": round(wall_s, 1),
        "requests_started": len(requests),
        "outcomes": {k: outcomes.get(k, 0) for k in OUTCOMES},
        "by_client": {k: {o: v.get(o, 0) for o in OUTCOMES} for k, v in by_kind.items()},
        "fault_client_outcomes": {
            k: dict(v.most_common()) for k, v in sorted(fault_outcomes.items())
        },
        "requests_by_transport": dict(Counter(r.transport for r in requests)),
        "explicit_errors_by_reason": dict(reasons.most_common()),
        "lost_requests": [
            {k: v for k, v in asdict(r).items() if k in ("client", "kind", "reason", "received")}
            for r in lost[:50]
        ],
        "audio_seconds_delivered": round(audio_s, 1),
        "audio_seconds_completed": round(sum(r.received for r in completed) / 2 / SAMPLE_RATE, 1),
        "first_audio_s": {
            "p50": _round(percentile(first_audio, 50)),
            "p90": _round(percentile(first_audio, 90)),
        },
        "faults_injected": dict(sorted(run.rec.faults.items())),
        "upstream_running_after": upstream_running,
        "upstream_orphans_peak": run.orphans_peak,
        "upstream_orphan_seconds": round(run.orphan_seconds, 1),
        "upstream_kept_after_leaving_before_audio_s": run.upstream_kept_s,
        "llm_stats": llm.summary(),
        "gateway_alive": gateway_alive,
        "gateway_memory_mib": {
            "peak_vmhwm": round(memory.peak_hwm_kb / 1024, 1),
            "rss_start": round(memory.first_rss_kb / 1024, 1),
            "rss_end": round(memory.last_rss_kb / 1024, 1),
            "rss_timeline": memory.timeline,
        },
        "gateway_metrics": metrics_summary(metrics_text) if metrics_text is not None else None,
        "gateway_log": gateway_log_problems(log_text),
        "anomalies": sorted(Counter(run.rec.anomalies).items(), key=lambda kv: -kv[1])[:30],
        "failures": failures,
        "ok": not failures,
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def print_report(report: dict[str, Any]) -> None:
    out = report["outcomes"]
    memory = report["gateway_memory_mib"]
    fa = report["first_audio_s"]
    rows = [
        ("requests started", report["requests_started"]),
        ("completed with audio", out[COMPLETED]),
        ("ended with an explicit error", out[ERROR]),
        ("abandoned by fault clients", out[ABANDONED]),
        ("LOST", out[LOST]),
        ("upstream requests running after the run", report["upstream_running_after"]),
        (
            "upstream orphans during the run (peak / stream-seconds)",
            f"{report['upstream_orphans_peak']} / {report['upstream_orphan_seconds']}",
        ),
        (
            "upstream kept after a client left before audio (max s)",
            ", ".join(
                f"{k} {max(v)}"
                for k, v in report["upstream_kept_after_leaving_before_audio_s"].items()
            )
            or "-",
        ),
        ("gateway peak RSS (VmHWM)", f"{memory['peak_vmhwm']} MiB"),
        ("gateway RSS start / end", f"{memory['rss_start']} / {memory['rss_end']} MiB"),
        ("audio delivered (all / completed)",
         f"{report['audio_seconds_delivered']} s / {report['audio_seconds_completed']} s"),
        ("first audio p50 / p90 (completed)", f"{fa['p50']} s / {fa['p90']} s"),
        ("gateway alive at the end", report["gateway_alive"]),
        ("wall time", f"{report['wall_s']} s"),
    ]  # fmt: skip
    print(f"\n## Load and fault run ({report['llm']})\n")
    _table(("", "value"), rows)
    print()
    _table(
        ("clients", *OUTCOMES),
        [(k, *v.values()) for k, v in report["by_client"].items()],
    )
    print()
    _table(("fault injected", "times"), list(report["faults_injected"].items()))
    print()
    _table(
        ("fault client request", "outcomes"),
        [
            (k, ", ".join(f"{n} {why}" for why, n in v.items()))
            for k, v in report["fault_client_outcomes"].items()
        ],
    )
    print()
    _table(("explicit error", "count"), list(report["explicit_errors_by_reason"].items()))
    print()
    _table(("LLM", "value"), list(report["llm_stats"].items()))
    if report["lost_requests"]:
        print("\nLost requests:")
        for r in report["lost_requests"]:
            print(f"  {r['client']} {r['kind']}: {r['reason']} ({r['received']} bytes)")
    if report["anomalies"]:
        print("\nAnomalies:")
        for text, n in report["anomalies"]:
            print(f"  {n} x {text}")
    log = report["gateway_log"]
    print(f"\nGateway log: {log['tracebacks']} tracebacks, {log['error_lines']} ERROR lines")
    for line in log["top_errors"] + log["top_exceptions"]:
        print(f"  {line}")
    if report["gateway_metrics"] is not None:
        print("\nGateway /metrics:")
        for line in report["gateway_metrics"]:
            print(f"  {line}")
    print(f"\nResult: {'OK' if report['ok'] else 'FAILED: ' + '; '.join(report['failures'])}")


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")


# --------------------------------------------------------------------------------------
# Main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--clients", type=int, default=8, help="normal clients, half WS")
    parser.add_argument("--llm", choices=["standin", "vllm"], default="standin")
    parser.add_argument("--tokens-per-s", type=float, default=200.0, help="stand-in rate")
    parser.add_argument("--prefill-s", type=float, default=0.02, help="stand-in prefill")
    parser.add_argument(
        "--llm-restarts", type=int, default=None, help="LLM restarts (stand-in 1, vLLM 0)"
    )
    parser.add_argument(
        "--llm-outages", type=int, default=None, help="LLM down windows (stand-in 1, vLLM 0)"
    )
    parser.add_argument("--restart-down-s", type=float, default=2.0)
    parser.add_argument("--outage-down-s", type=float, default=5.0)
    parser.add_argument("--fault-interval", type=float, default=2.0, help="mean s between faults")
    parser.add_argument("--never-read-s", type=float, default=30.0, help="never-read hold time")
    parser.add_argument("--request-timeout", type=float, default=60.0)
    parser.add_argument("--settle-s", type=float, default=3.0, help="wait after the clients")
    parser.add_argument(
        "--llm-timeout",
        type=float,
        default=10.0,
        help="the gateway's LLM_TIMEOUT_S; stalled streams (llm_stall) hang 5 s longer",
    )
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--no-faults", action="store_true", help="load only, for a baseline")
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated client / in-band fault kinds to inject (default: all of "
        + ", ".join(CLIENT_FAULTS + INBAND_FAULTS)
        + ")",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    parser.add_argument("--log-dir", type=Path, default=None, help="keep server logs here")
    parser.add_argument(
        "--gateway-root",
        type=Path,
        default=None,
        help="run the gateway package from this checkout instead of this one",
    )
    args = parser.parse_args(argv)
    if args.clients < 1 or args.duration <= 0:
        parser.error("--clients must be >= 1 and --duration > 0")
    unknown = set(filter(None, args.only.split(","))) - set(CLIENT_FAULTS + INBAND_FAULTS)
    if unknown:
        parser.error(f"unknown fault kinds: {', '.join(sorted(unknown))}")
    default_llm_faults = 1 if args.llm == "standin" and not args.no_faults else 0
    if args.llm_restarts is None:
        args.llm_restarts = default_llm_faults
    if args.llm_outages is None:
        args.llm_outages = default_llm_faults
    return args


def wait_upstream_idle(llm: LLM, settle_s: float, patience_s: float = 10.0) -> int | None:
    """``running`` of the LLM after ``settle_s``, polled for up to ``patience_s`` more."""
    time.sleep(settle_s)
    deadline = time.monotonic() + patience_s
    while True:
        running = llm.running_requests()
        if running == 0 or time.monotonic() > deadline:
            return running
        time.sleep(0.25)


def read_metrics(url: str) -> str | None:
    try:
        response = httpx.get(f"{url}/metrics", timeout=10.0)
    except httpx.HTTPError:
        return None
    return response.text if response.status_code == 200 else None


def warm_up(gateway: GatewayServer) -> None:
    body = {"text": "Good morning friend."}
    with httpx.stream("POST", f"{gateway.url}{HTTP_PATH}", json=body, timeout=60) as response:
        response.read()
        if response.status_code != 200:
            raise RuntimeError(f"warm-up request failed: {response.status_code} {response.text}")


def run(args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    settings = Settings(
        duration_s=args.duration,
        clients=args.clients,
        request_timeout_s=args.request_timeout,
        never_read_s=args.never_read_s,
        fault_interval_s=args.fault_interval,
        llm_restarts=args.llm_restarts,
        llm_outages=args.llm_outages,
        restart_down_s=args.restart_down_s,
        outage_down_s=args.outage_down_s,
        settle_s=args.settle_s,
        llm_timeout_s=args.llm_timeout,
        seed=args.seed,
        faults=not args.no_faults,
        only=tuple(k for k in args.only.split(",") if k),
    )
    llm: LLM
    if args.llm == "standin":
        llm = StandinLLM(log_dir, args.tokens_per_s, args.prefill_s)
    else:
        llm = VllmLLM(log_dir)
    env = {
        "MODEL_NAME": llm.model,
        "SEGMENT_LOOKAHEAD": str(SEGMENT_LOOKAHEAD),
        "LLM_TIMEOUT_S": str(args.llm_timeout),
    }
    if args.gateway_root is not None:  # import the package from there, not from cwd
        env.update(PYTHONPATH=str(args.gateway_root.resolve()), PYTHONSAFEPATH="1")
    print(f"starting the LLM ({args.llm}) and the gateway; logs in {log_dir}", flush=True)
    llm.start()
    try:
        gateway = GatewayServer(llm.base_url, log_dir, **env).start()
        try:
            assert gateway.process is not None
            warm_up(gateway)
            memory = MemorySampler(gateway.process.pid)
            memory.start()
            load = Run(settings, gateway, llm)
            print(
                f"running {settings.clients} clients for {settings.duration_s:g} s "
                f"{'with' if settings.faults else 'without'} faults (seed {settings.seed}) ...",
                flush=True,
            )
            began = time.monotonic()
            hard_limit = settings.duration_s + settings.request_timeout_s + settings.never_read_s
            try:
                asyncio.run(asyncio.wait_for(load.main(), hard_limit + 30))
            except asyncio.TimeoutError:
                load.rec.anomaly("the run passed its hard time limit; clients were cancelled")
            if llm.running_requests() is None:  # a restart left it down: bring it back
                with contextlib.suppress(Exception):
                    llm.start()
            upstream_running = wait_upstream_idle(llm, settings.settle_s)
            wall_s = time.monotonic() - began
            memory.stop()
            alive = gateway.process.poll() is None
            metrics = read_metrics(gateway.url) if alive else None
            return build_report(
                load, llm, memory, upstream_running, alive, metrics, gateway.log_text(), wall_s
            )
        finally:
            gateway.stop()
    finally:
        llm.stop(graceful=False)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with contextlib.ExitStack() as stack:
        if args.log_dir is not None:
            log_dir = args.log_dir
            log_dir.mkdir(parents=True, exist_ok=True)
        else:
            log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lfr-")))
        previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            report = run(args, log_dir)
        finally:
            signal.signal(signal.SIGTERM, previous)
    print_report(report)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
