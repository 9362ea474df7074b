"""Every fault injector of the run: fault clients, in-band LLM faults, LLM restarts.

A fault client records each request it makes (:class:`~.clients.Request`) and
classifies it as the normal clients do: completed, explicit error, abandoned (on
purpose) or lost. What the gateway must do and does not is noted as an anomaly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from typing import Any

import h11

from decoder_gateway.client import SpeechSocket, StreamBroken
from decoder_gateway.settings import Settings
from devtools.faulty_gateway import FAULT_VOICE

from .clients import (
    ABANDONED,
    COMPLETED,
    ERROR,
    HOST,
    HTTP_PATH,
    LOST,
    MAX_TEXT_CHARS,
    OPENAI_PATH,
    SEGMENT_LOOKAHEAD,
    WS_MAX_MESSAGE_BYTES,
    Clients,
    Request,
    RunSettings,
    Texts,
    audio_verdict,
    http_post,
    parse_error_body,
    read_metrics_async,
    slow_client_count,
    ws_handshake,
    ws_text_frame,
)
from .llm import LLM

# How long the audio of a stalled reader's request may take to fill the socket buffers
# before a send blocks (then SLOW_CLIENT_TIMEOUT_S runs).
STALL_FILL_S = 15.0

CLIENT_FAULTS = (
    "http_disconnect",
    "ws_disconnect",
    "http_never_read",
    "ws_never_read",
    "http_stalled_reader",
    "ws_stalled_reader",
    "ws_invalid_json",
    "ws_binary_frame",
    "ws_unknown_voice",
    "ws_oversized_frame",
    "ws_nested_json",
    "ws_foreign_origin",
    "http_invalid_json",
    "http_unknown_voice",
    "http_oversized_text",
    "oversized_body",
    "markup_in_text",
    "surrogate_text",
    "decoder_failure",
    "ws_pipelined",
    "http_leave_before_audio",
    "ws_leave_before_audio",
)
INBAND_FAULTS = ("llm_error_after_tokens", "llm_drop_after_tokens", "llm_stall")
LLM_FAULTS = ("llm_restart", "llm_outage")
# Faults that need the fault-injecting gateway (devtools.faulty_gateway).
FAULTY_GATEWAY_FAULTS = ("decoder_failure",)

ALLOWED_ORIGIN = "http://allowed.example"  # the run's gateway: CORS_ALLOW_ORIGINS
FOREIGN_ORIGIN = "http://evil.example"
MARKUP_TEXT = "Hello <|end_content|><|start_global_token|><|bicodec_global_7|> there."
SURROGATE_JSON = '"Hello \\ud800 there."'  # a JSON string holding a lone surrogate
NESTED_JSON = "[" * 3000 + "]" * 3000
# Over the largest body any path takes (speech requests may carry an inline clip).
OVERSIZED_BODY_BYTES = max(1 << 20, 2 * max(Settings().body_limits().values()))
# A stalled reader's socket: a tiny receive buffer and a small MSS, set before connect.
# The small MSS keeps the gateway's kernel send buffer small too (Linux sizes it from
# the MSS: ~100 kB instead of ~3 MB), so the gateway's sends block within a second.
STALLED_RCVBUF = 4096
STALLED_MSS = 536


class Faults(Clients):
    """The fault clients and LLM faults, on top of the normal clients."""

    def __init__(self, settings: RunSettings, url: str, port: int, llm: LLM):
        super().__init__(settings, url, port, llm.kind)
        self.llm = llm
        self.llm_lock = asyncio.Lock()
        # One stall-type fault (never read, stalled reader) per transport at a time, so
        # that a slow_client count going up is the stalled reader's.
        self.stall_locks = {"http": asyncio.Lock(), "ws": asyncio.Lock()}
        # transport -> seconds the upstream request ran on after a client left before audio
        self.upstream_kept_s: dict[str, list[float]] = {}
        # transport -> seconds from a stalled reader's request to the gateway cutting it
        self.slow_client_cut_s: dict[str, list[float]] = {}

    # ---- clients that leave -------------------------------------------------------------

    async def fault_http_disconnect(self, name: str, texts: Texts) -> None:
        text = texts.long_text()
        request = self.rec.start(name, "http", "http_disconnect")
        async with self.gateway_client() as client:
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

    # ---- clients that stop reading ------------------------------------------------------

    async def _raw_socket(
        self, request: Request, transport: str, payload: bytes, small_mss: bool = False
    ) -> socket.socket | None:
        """A raw socket with a tiny receive buffer that has sent ``payload`` (after the
        WS handshake for "ws"); None, with the request's error, when that failed."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, STALLED_RCVBUF)
        if small_mss:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, STALLED_MSS)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (HOST, self.port)), 10)
            if transport == "ws":
                await loop.sock_sendall(sock, ws_handshake(self.port))
                head = b""
                while b"\r\n\r\n" not in head:  # the handshake answer, nothing more
                    chunk = await asyncio.wait_for(loop.sock_recv(sock, 1), 10)
                    if not chunk:
                        request.end(ERROR, "ws: closed during the handshake")
                        sock.close()
                        return None
                    head += chunk
                if not head.startswith(b"HTTP/1.1 101"):
                    request.end(ERROR, f"ws: handshake refused: {head.splitlines()[0]!r}")
                    sock.close()
                    return None
            await loop.sock_sendall(sock, payload)
        except (OSError, TimeoutError) as err:
            request.end(ERROR, f"{transport}: cannot connect ({type(err).__name__})")
            sock.close()
            return None
        return sock

    def _stall_payload(self, transport: str, text: str, texts: Texts) -> bytes:
        if transport == "http":
            return http_post(self.port, {"text": text})
        return ws_text_frame(json.dumps(self.ws_message(text, texts)).encode())

    async def _never_read(self, name: str, transport: str, texts: Texts) -> None:
        """Send a huge request on a raw socket with a tiny receive buffer, never read, go."""
        async with self.stall_locks[transport]:
            hold_s = max(2.0, min(self.s.never_read_s, self.end_at - time.monotonic()))
            request = self.rec.start(name, transport, f"{transport}_never_read")
            payload = self._stall_payload(transport, texts.huge_text(), texts)
            sock = await self._raw_socket(request, transport, payload)
            if sock is None:
                return
            try:
                await asyncio.sleep(hold_s)
                request.end(ABANDONED, f"never read for {hold_s:.0f} s")
            finally:
                sock.close()  # unread data: the kernel resets the connection

    async def fault_http_never_read(self, name: str, texts: Texts) -> None:
        await self._never_read(name, "http", texts)

    async def fault_ws_never_read(self, name: str, texts: Texts) -> None:
        await self._never_read(name, "ws", texts)

    async def _stalled_reader(self, name: str, transport: str, texts: Texts) -> None:
        """A client that stops reading and keeps its connection open.

        The gateway puts a deadline (SLOW_CLIENT_TIMEOUT_S) on every send: it must end
        the request as ``slow_client`` (``/metrics``), which frees its slot, within
        that time + STALL_FILL_S: a send blocks only once the socket buffers between
        them are full, which takes audio, and audio takes time (a stream's sentences
        are written one at a time). The stand-in faults are kept off the request (its text is
        marked, and no LLM restart runs meanwhile), so nothing else can end it.
        """
        kind = f"{transport}_stalled_reader"
        text = texts.without_faults(texts.long_text())
        async with self.stall_locks[transport], self.llm_lock:
            before_text = await read_metrics_async(self.url)
            request = self.rec.start(name, transport, kind, **texts.expectations(text))
            if before_text is None:
                request.end(ERROR, "gateway /metrics unreadable")
                self.rec.anomaly(f"{name} ({kind}): cannot read the gateway's /metrics")
                return
            before = slow_client_count(before_text, transport)
            payload = self._stall_payload(transport, text, texts)
            sock = await self._raw_socket(request, transport, payload, small_mss=True)
            if sock is None:
                return
            sent = time.monotonic()
            limit_s = self.s.slow_client_timeout_s + STALL_FILL_S
            count: int | None = before
            try:
                while time.monotonic() - sent < limit_s:
                    await asyncio.sleep(0.25)
                    now_text = await read_metrics_async(self.url)
                    count = None if now_text is None else slow_client_count(now_text, transport)
                    if count is not None and count > before:
                        cut_s = round(time.monotonic() - sent, 2)
                        self.slow_client_cut_s.setdefault(transport, []).append(cut_s)
                        request.end(ABANDONED, "stalled reader, cut by the gateway")
                        return
                answer = _peek_error(sock, transport)
                if answer is not None:  # the gateway refused it (LLM down): not a stall
                    request.end(ERROR, answer)
                    return
                request.end(ABANDONED, f"stalled reader, not cut within {limit_s:g} s")
                self.rec.anomaly(
                    f"{name} ({kind}): the gateway did not end a stalled reader as slow_client "
                    f"within SLOW_CLIENT_TIMEOUT_S + {STALL_FILL_S:g} s = {limit_s:g} s "
                    f"(slow_client count {before} -> {count})"
                )
            finally:
                sock.close()

    async def fault_http_stalled_reader(self, name: str, texts: Texts) -> None:
        await self._stalled_reader(name, "http", texts)

    async def fault_ws_stalled_reader(self, name: str, texts: Texts) -> None:
        await self._stalled_reader(name, "ws", texts)

    # ---- clients that leave before their first audio --------------------------------------

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
            ws: SpeechSocket | None = None
            sock: socket.socket | None = None
            try:
                if transport == "ws":
                    ws = await self.ws_connect(request)
                    if ws is None:
                        return
                    await ws.send(self.ws_message(text, texts))
                else:
                    loop = asyncio.get_running_loop()
                    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    sock.setblocking(False)
                    await asyncio.wait_for(loop.sock_connect(sock, (HOST, self.port)), 10)
                    await loop.sock_sendall(sock, http_post(self.port, {"text": text}))
                answer = await _first_answer(ws, sock, 0.5 if control else 0.02)
                if answer is None:
                    request.end(ABANDONED, "left before the first audio")
                elif answer.startswith(("http 200", "ws start")):
                    request.end(ABANDONED, f"left after the first answer ({answer})")
                else:  # answered with an error before the client left
                    request.end(ERROR, answer)
            except (OSError, TimeoutError) as err:
                request.end(ERROR, f"{transport}: cannot connect ({type(err).__name__})")
            finally:
                if ws is not None:  # gone at once: the TCP connection cut, no close frame
                    ws.connection.transport.abort()
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

    async def fault_http_leave_before_audio(self, name: str, texts: Texts) -> None:
        await self._leave_before_audio(name, "http", texts)

    async def fault_ws_leave_before_audio(self, name: str, texts: Texts) -> None:
        await self._leave_before_audio(name, "ws", texts)

    # ---- many WS messages at once ---------------------------------------------------------

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
        except TimeoutError:
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
        ws: SpeechSocket,
        messages: list[dict[str, Any]],
        requests: dict[str, Request],
        name: str,
    ) -> None:
        for message in messages:
            await ws.send(message)
        order = list(requests)
        current: Request | None = None
        last_started = -1
        try:
            while any(not r.outcome for r in requests.values()):
                # The gateway works on the first unanswered message only.
                waiting = [r for r in requests.values() if not r.outcome]
                for r in waiting:
                    r.upstream = 1 if r is waiting[0] else 0
                data = await ws.receive()
                if isinstance(data, bytes):
                    if current is None:
                        self.rec.anomaly(f"{name} (ws_pipelined): audio outside start/end")
                        continue
                    current.audio(len(data))
                    continue
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
        except StreamBroken as err:
            code = err.close_code
            for request in requests.values():
                request.end(ERROR, f"ws: closed with code {code}")

    # ---- malformed WS messages ------------------------------------------------------------

    async def _ws_bad_then_good(
        self,
        name: str,
        kind: str,
        texts: Texts,
        bad: dict[str, Any] | str | bytes,
        expected_code: str | None = None,
        upstream: int = 0,
    ) -> None:
        """A bad message must get an error; the connection must then still serve.

        ``expected_code``: the code the error frame must carry (any when None);
        ``upstream``: the streams the gateway may start for the bad message.
        """
        request = self.rec.start(name, "ws", kind, expect_error=True, upstream=upstream)
        ws = await self.ws_connect(request)
        if ws is None:
            return
        try:
            usable = await self.ws_request(ws, request, bad)
            if request.outcome == ERROR and not request.reason.startswith("ws error frame"):
                if kind != "ws_oversized_frame":  # closing on 2 MB (1009) is fair
                    self.rec.anomaly(f"{name} ({kind}): {request.reason}, not an error frame")
            elif expected_code is not None and request.outcome == ERROR:
                if request.error_code != expected_code:
                    self.rec.anomaly(
                        f"{name} ({kind}): error frame {request.error_code!r}, "
                        f"expected {expected_code!r}"
                    )
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
        # A 2 MB text frame of valid JSON, or three times the default WS_MAX_MESSAGE_BYTES.
        size = 2 * 1024 * 1024 if texts.rng.random() < 0.5 else 3 * WS_MAX_MESSAGE_BYTES
        filler = "word " * (size // 5)
        await self._ws_bad_then_good(
            name, "ws_oversized_frame", texts, {"input": filler, "segment_id": "big"}
        )

    async def fault_ws_nested_json(self, name: str, texts: Texts) -> None:
        """~6 kB of nested brackets while a speech is in progress, then a normal message.

        Expected: an ``invalid_json`` error frame, the speech in progress completes,
        and the queued message is served after it, on the same connection.
        """
        kind = "ws_nested_json"
        text_a, text_b = texts.text(sentences=(3, 3), words=(6, 8)), texts.text()
        speech = self.rec.start(name, "ws", f"{kind}/in-progress", **texts.expectations(text_a))
        ws = await self.ws_connect(speech)
        if ws is None:
            return
        bad = self.rec.start(name, "ws", kind, expect_error=True, upstream=0)
        queued = self.rec.start(name, "ws", f"{kind}/queued", **texts.expectations(text_b))
        message_a, message_b = self.ws_message(text_a, texts), self.ws_message(text_b, texts)
        by_segment = {message_a["segment_id"]: speech, message_b["segment_id"]: queued}
        try:
            await asyncio.wait_for(
                self._ws_nested(ws, message_a, message_b, by_segment, bad),
                self.s.request_timeout_s,
            )
        except TimeoutError:
            pass
        except StreamBroken as err:
            reason = f"ws: closed with code {err.close_code}"
            for request in (speech, bad, queued):
                request.end(ERROR, reason)
            self.rec.anomaly(f"{name} ({kind}): connection closed ({reason}), not kept")
        except Exception as err:
            self.rec.anomaly(f"{name} ({kind}): client failure {err!r}")
        finally:
            for request in (speech, bad, queued):
                state = f"{request.received} audio bytes" if request.received else "no audio"
                request.end(LOST, f"no end after {self.s.request_timeout_s:g} s ({state})")
            await ws.close()
        if bad.outcome != ERROR or bad.error_code != "invalid_json":
            self.rec.anomaly(
                f"{name} ({kind}): nested brackets got {bad.reason or bad.outcome!r}, "
                "expected an invalid_json error frame"
            )

    async def _ws_nested(
        self,
        ws: SpeechSocket,
        message_a: dict[str, Any],
        message_b: dict[str, Any],
        by_segment: dict[str, Request],
        bad: Request,
    ) -> None:
        await ws.send(message_a)
        sent_bad = False
        current: Request | None = None
        while any(not r.outcome for r in (*by_segment.values(), bad)):
            data = await ws.receive()
            if isinstance(data, bytes):
                if current is None:
                    self.rec.anomaly(f"{bad.client} (ws_nested_json): audio outside start/end")
                    continue
                current.audio(len(data))
                continue
            kind, segment_id = data.get("type"), data.get("segment_id")
            request = by_segment.get(segment_id, bad if segment_id is None else None)
            if request is None:
                self.rec.anomaly(f"{bad.client} (ws_nested_json): {kind} for {segment_id!r}")
                continue
            if kind == "start":
                current = request
                if not sent_bad:  # the speech is in progress: now the brackets
                    sent_bad = True
                    await ws.send(NESTED_JSON)
                    await ws.send(message_b)
            elif kind == "end":
                request.end(*audio_verdict(request, int(data.get("samples", -1))))
                current = None if current is request else current
            elif kind == "error":
                request.error_code = data.get("code")
                request.end(ERROR, f"ws error frame: {data.get('code')}")
                current = None if current is request else current
                if request is not bad and not sent_bad:  # the speech failed at once
                    sent_bad = True
                    await ws.send(NESTED_JSON)
                    await ws.send(message_b)

    async def fault_ws_foreign_origin(self, name: str, texts: Texts) -> None:
        """A handshake from a foreign Origin is refused (403); allowed or none: served."""
        kind = "ws_foreign_origin"
        request = self.rec.start(name, "ws", kind, expect_error=True, upstream=0)
        ws = await self.ws_connect(request, origin=FOREIGN_ORIGIN)
        if ws is not None:
            await ws.close()
            request.end(ABANDONED, "foreign origin accepted; closed")
            self.rec.anomaly(f"{name} ({kind}): a handshake from {FOREIGN_ORIGIN} was accepted")
        elif request.status != 403:
            self.rec.anomaly(f"{name} ({kind}): {request.reason}, expected HTTP 403")
        for origin, label in ((ALLOWED_ORIGIN, "allowed-origin"), (None, "no-origin")):
            text = texts.text()
            follow = self.rec.start(name, "ws", f"{kind}/{label}", **texts.expectations(text))
            ws = await self.ws_connect(follow, origin=origin)
            if ws is None:
                self.rec.anomaly(f"{name} ({kind}): {label} handshake: {follow.reason}")
                continue
            try:
                await self.ws_request(ws, follow, self.ws_message(text, texts))
            finally:
                await ws.close()

    # ---- malformed HTTP requests ----------------------------------------------------------

    async def _http_bad(
        self,
        name: str,
        kind: str,
        body: dict[str, Any] | bytes,
        path: str = HTTP_PATH,
        expected: tuple[int, str | None, str | None] | None = None,
    ) -> Request:
        """A request the gateway must refuse with a 4xx JSON error.

        ``expected``: (status, code, param) it must carry (None: any of them).
        """
        request = self.rec.start(name, "http", kind, expect_error=True, upstream=0)
        async with self.gateway_client() as client:
            await self.http_request(client, request, body, path=path)
        if request.outcome == ERROR and not request.reason.startswith("http 4"):
            self.rec.anomaly(f"{name} ({kind}): {request.reason}, not a 4xx")
        elif expected is not None and request.outcome == ERROR:
            self._check_error(name, kind, request, expected)
        return request

    def _check_error(
        self, name: str, kind: str, request: Request, expected: tuple[int, str | None, str | None]
    ) -> None:
        status, code, param = expected
        got = (request.status, request.error_code, request.error_param)
        if got[0] != status or (code and got[1] != code) or (param and got[2] != param):
            self.rec.anomaly(
                f"{name} ({kind}): got status {got[0]} code {got[1]!r} param {got[2]!r}, "
                f"expected {status} {code!r}" + (f" param {param!r}" if param else "")
            )

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

    async def fault_markup_in_text(self, name: str, texts: Texts) -> None:
        """Spark prompt markup in the text: 400 naming the field; WS: an error frame."""
        kind = "markup_in_text"
        await self._http_bad(name, kind, {"text": MARKUP_TEXT}, expected=(400, None, "text"))
        await self._http_bad(
            name,
            kind,
            {"input": MARKUP_TEXT, "response_format": "pcm", "sample_rate": 16000},
            path=OPENAI_PATH,
            expected=(400, None, "input"),
        )
        message = {"input": MARKUP_TEXT, "segment_id": f"s{next(self.segment_ids)}"}
        await self._ws_bad_then_good(name, kind, texts, message, expected_code="invalid_request")

    async def fault_surrogate_text(self, name: str, texts: Texts) -> None:
        """A lone surrogate (valid JSON, not encodable text): 400; WS: an error frame."""
        kind = "surrogate_text"
        body = ('{"text": ' + SURROGATE_JSON + "}").encode()
        await self._http_bad(name, kind, body, expected=(400, "invalid_request", None))
        segment_id = f"s{next(self.segment_ids)}"
        frame = '{"input": ' + SURROGATE_JSON + f', "segment_id": "{segment_id}"}}'
        await self._ws_bad_then_good(name, kind, texts, frame, expected_code="invalid_request")

    async def fault_oversized_body(self, name: str, texts: Texts) -> None:
        """A body over the path's limit, with a Content-Length and chunked: 413."""
        kind = "oversized_body"
        filler = "word " * (OVERSIZED_BODY_BYTES // 5)
        body = json.dumps({"text": filler}).encode()
        for chunked in (False, True):
            request = self.rec.start(name, "http", kind, expect_error=True, upstream=0)
            framing = "chunked" if chunked else f"Content-Length {len(body)}"
            try:
                status, raw = await asyncio.wait_for(
                    self._raw_post(body, chunked), self.s.request_timeout_s
                )
            except TimeoutError:
                request.end(LOST, f"no answer after {self.s.request_timeout_s:g} s ({framing})")
                continue
            except (OSError, h11.ProtocolError) as err:
                request.end(ERROR, f"http: connection closed without a response ({framing})")
                self.rec.anomaly(f"{name} ({kind}, {framing}): {type(err).__name__}: {err}")
                continue
            request.status = status
            error = parse_error_body(raw)
            if status == 200:
                request.end(COMPLETED, f"accepted ({framing})")
            elif error is None:
                request.end(ERROR, f"http {status} ? ({framing})")
                self.rec.anomaly(f"{name} ({kind}): HTTP {status} without a JSON error body")
            else:
                request.error_code = error.get("code")
                request.end(ERROR, f"http {status} {request.error_code}")
            if (status, request.error_code) != (413, "request_too_large"):
                self.rec.anomaly(
                    f"{name} ({kind}, {framing}): HTTP {status} {request.error_code!r}, "
                    "expected 413 'request_too_large'"
                )

    async def _raw_post(self, body: bytes, chunked: bool) -> tuple[int, bytes]:
        """POST ``body`` (in 64 kB pieces) while reading the answer, which may come early.

        Returns (status, body of the answer). The gateway may answer before the body is
        sent and close the connection: the sending then ends quietly, and the answer is
        still read from the socket (a raw socket, as the kernel keeps it readable after
        the reset that unread data causes; asyncio streams would raise instead).
        """
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        conn = h11.Connection(our_role=h11.CLIENT)
        framing = [("Transfer-Encoding", "chunked")] if chunked else []
        if not chunked:
            framing = [("Content-Length", str(len(body)))]
        headers = [("Host", f"{HOST}:{self.port}"), ("Content-Type", "application/json")]
        head = h11.Request(method="POST", target=HTTP_PATH, headers=[*headers, *framing])

        async def send() -> None:
            with contextlib.suppress(OSError, h11.LocalProtocolError):
                await loop.sock_sendall(sock, conn.send(head) or b"")
                for start in range(0, len(body), 65536):
                    piece = h11.Data(data=body[start : start + 65536])
                    await loop.sock_sendall(sock, conn.send(piece) or b"")
                await loop.sock_sendall(sock, conn.send(h11.EndOfMessage()) or b"")

        async def receive() -> tuple[int, bytes]:
            status, parts = 0, []
            while True:
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError:
                    if status:  # cut off after the status line: what came is the answer
                        return status, b"".join(parts)
                    raise
                if event is h11.NEED_DATA:
                    try:
                        data = await loop.sock_recv(sock, 65536)
                    except ConnectionResetError:  # raised once the buffered answer is read
                        data = b""
                    if not data and not status:
                        raise ConnectionResetError("closed without a response")
                    conn.receive_data(data)
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    parts.append(bytes(event.data))
                elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    return status, b"".join(parts)

        try:
            await asyncio.wait_for(loop.sock_connect(sock, (HOST, self.port)), 10)
            sender = asyncio.create_task(send())
            try:
                return await receive()
            finally:
                sender.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sender
        finally:
            sock.close()

    # ---- a decoder that fails ---------------------------------------------------------------

    async def fault_decoder_failure(self, name: str, texts: Texts) -> None:
        """Requests for the voice whose decoder batches raise (the faulty gateway).

        Expected: 500 ``decoder_error`` on ``/v1/audio/speech/stream`` and
        ``/v1/audio/speech``; an SSE ``error`` event (or that 500) with
        ``stream_format: sse``; a WS error frame ``decoder_error``, and the connection
        then serves a normal message. The stand-in's faults and LLM restarts are kept
        off these requests, so the decoder is the only thing that fails.
        """
        kind = "decoder_failure"
        text = texts.without_faults(texts.text(sentences=(1, 2), words=(4, 8)))
        upstream = min(SEGMENT_LOOKAHEAD, text.count("."))
        openai_body = {
            "input": text,
            "voice": FAULT_VOICE,
            "response_format": "pcm",
            "sample_rate": 16000,
        }
        calls: list[tuple[str, dict[str, Any]]] = [
            (HTTP_PATH, {"text": text, "voice": FAULT_VOICE}),
            (OPENAI_PATH, openai_body),
            (OPENAI_PATH, {**openai_body, "stream_format": "sse"}),
        ]
        async with self.llm_lock:
            async with self.gateway_client() as client:
                for path, body in calls:
                    request = self.rec.start(
                        name, "http", kind, expect_error=True, upstream=upstream
                    )
                    await self.http_request(client, request, body, path=path)
                    self._expect_decoder_error(name, f"{kind} {path}", request)
            message = {"input": text, "voice": FAULT_VOICE, "segment_id": "fault"}
            await self._ws_bad_then_good(
                name, kind, texts, message, expected_code="decoder_error", upstream=upstream
            )

    def _expect_decoder_error(self, name: str, what: str, request: Request) -> None:
        if request.outcome == ERROR and request.error_code == "decoder_error":
            return
        self.rec.anomaly(
            f"{name} ({what}): {request.reason or request.outcome}, expected decoder_error"
        )

    # ---- LLM faults -----------------------------------------------------------------------

    async def llm_down(self, graceful: bool, down_s: float) -> None:
        async with self.llm_lock:
            await asyncio.to_thread(self.llm.stop, graceful)
            await asyncio.sleep(down_s)
            await asyncio.to_thread(self.llm.start)

    async def fault_llm_restart(self, name: str, texts: Texts) -> None:
        await self.llm_down(True, self.s.restart_down_s)

    async def fault_llm_outage(self, name: str, texts: Texts) -> None:
        await self.llm_down(False, self.s.outage_down_s)

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


# --------------------------------------------------------------------------------------
# Raw-socket helpers


async def _first_answer(
    ws: SpeechSocket | None, sock: socket.socket | None, wait_s: float
) -> str | None:
    """What the gateway answered within ``wait_s`` ("http 503", "ws error ..."), or None."""
    try:
        if ws is not None:
            data = await asyncio.wait_for(ws.receive(), wait_s)
            if isinstance(data, bytes):
                return "ws start"
            if data.get("type") == "error":
                return f"ws error frame: {data.get('code')}"
            return f"ws {data.get('type')}"
        assert sock is not None
        loop = asyncio.get_running_loop()
        head = await asyncio.wait_for(loop.sock_recv(sock, 4096), wait_s)
    except TimeoutError:
        return None
    except StreamBroken as err:
        return f"ws: closed with code {err.close_code}"
    parts = head.split(b" ", 2)
    return f"http {parts[1].decode(errors='replace')}" if len(parts) > 1 else "http: closed"


def _peek_error(sock: socket.socket, transport: str) -> str | None:
    """An error the gateway answered on a socket not read yet ("http 503"), else None."""
    try:
        data = sock.recv(STALLED_RCVBUF, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except OSError:
        return None
    if transport == "http":
        parts = data.split(b" ", 2)
        if data.startswith(b"HTTP/1.1 ") and len(parts) > 1 and not parts[1].startswith(b"2"):
            return f"http {parts[1].decode(errors='replace')}"
        return None
    if len(data) > 2 and data[0] == 0x81 and b'"error"' in data[:400]:
        return "ws error frame"
    return None
