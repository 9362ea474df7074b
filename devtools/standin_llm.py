"""A fault-injecting stand-in for vLLM's OpenAI server, speaking Spark-TTS tokens.

It answers what the gateway uses of ``vllm serve`` (vLLM 0.32) with the same wire
format, so the gateway can be tested against faults the real server cannot be made
to show, and benchmarked at GPU-like token rates without a GPU:

* ``POST /v1/completions`` (streaming as server-sent events, or one JSON answer),
* ``GET /health``, ``GET /v1/models``, ``POST /tokenize``, ``POST /detokenize``,
  ``GET /metrics`` (a few ``vllm:`` gauges and counters),
* ``POST /control`` / ``GET /control`` / ``GET /control/stats`` to change the
  behaviour and read counters at run time (not part of vLLM).

What a completion holds is decided by the prompt (see :func:`expected_output_ids`):

* a prompt that ends with ``<|start_global_token|>`` (no pinned voice) first gets
  ``global_count`` (32) ``<|bicodec_global_N|>`` tokens, then
  ``<|end_global_token|><|start_semantic_token|>``;
* a controllable (voice-design) prompt, ending with ``<|end_style_label|>``, first
  gets attribute tokens as the base model writes before its voice (here its style
  labels again and ``<|start_global_token|>``; ``attribute_tokens=False``: none), then
  the globals as above; they depend on the labels and on the request's ``seed``
  (:func:`expected_global_tokens`), so candidates of one design differ;
* then come the ``<|bicodec_semantic_N|>`` tokens: ``tokens_per_segment`` of them
  when that is set, else ``tokens_per_word`` (10) per whitespace-separated word of
  the content text, at least ``min_semantic_tokens`` (5)
  (:func:`expected_semantic_count`); the content text is what stands between
  ``<|start_content|>`` and ``<|end_content|>``, less a leading ``speaker_id: ``
  in ``<|task_tts|>`` prompts; values are a deterministic function of that text;
* then ``<|end_semantic_token|>`` (165157), then ``<|im_end|>`` (151645, the EOS).

A request's ``structured_outputs`` (the gateway's design grammar) is recorded with
the request and otherwise ignored: what the stand-in writes fits that grammar anyway
but for its attribute tokens, which the gateway's reader skips.

Stopping follows vLLM's order: the EOS stops (``stop_reason`` null), a token in
``stop_token_ids`` stops (``stop_reason`` = its id), and the ``max_tokens``-th token
ends with ``finish_reason`` "length". The stopping token's text is left out of the
text, its id stays in ``token_ids`` (as seen on the real server).

Faults are configuration fields (:class:`StandinConfig`, :data:`FAULT_FIELDS`), set
at creation, at run time with ``POST /control``, or for one request with a
``"standin": {...}`` object in the request body (``extra_body`` with the openai
client). ``fault_requests`` and ``fault_match`` narrow which requests get them;
``fault_exclude`` keeps them off requests whose prompt holds that text.

``total_tokens_per_s`` caps the tokens/s of all streams together, as a GPU's batch
shares one decode step: with n streams generating, each gets about
min(tokens_per_s, total_tokens_per_s / n), so a benchmark can push a server past the
number of streams its LLM keeps in real time.

Run it alone for benchmarks::

    python -m devtools.standin_llm --port 8000 --tokens-per-s 200 --prefill-s 0.02 \
        --total-tokens-per-s 1000

or as :class:`StandinProcess` from Python; :class:`StandinServer` runs it in a thread.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import re
import socket
import sys
import threading
import time
import uuid
import zlib
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from devtools.process import HOST, ServerProcess, ServerStartError, free_port

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------
# The Spark-TTS vocabulary (PROTOCOL.md: the upstream tokenizer's ids)

GLOBAL_BASE = 151665  # <|bicodec_global_0|>
GLOBAL_SIZE = 4096
SEMANTIC_BASE = 155761  # <|bicodec_semantic_0|>
SEMANTIC_SIZE = 8192
IM_END = 151645  # <|im_end|>: Qwen's EOS, a special token
END_GLOBAL = 165156
START_SEMANTIC = 165151
END_SEMANTIC = 165157
START_GLOBAL = 165150
VOCAB_SIZE = 166000
SYSTEM_FINGERPRINT = "vllm-0.32.0-standin"

NAMED_TOKENS: dict[str, int] = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": IM_END,
    "<|task_tts|>": 165137,
    "<|task_controllable_tts|>": 165143,
    "<|start_content|>": 165146,
    "<|end_content|>": 165152,
    "<|start_style_label|>": 165147,
    "<|end_style_label|>": 165153,
    "<|start_acoustic_token|>": 165149,
    "<|end_acoustic_token|>": 165155,
    "<|start_global_token|>": START_GLOBAL,
    "<|end_global_token|>": END_GLOBAL,
    "<|start_semantic_token|>": START_SEMANTIC,
    "<|end_semantic_token|>": END_SEMANTIC,
    **{f"<|gender_{i}|>": 165032 + i for i in range(3)},
    **{f"<|pitch_label_{i}|>": 164965 + i for i in range(5)},
    **{f"<|speed_label_{i}|>": 164986 + i for i in range(5)},
}
SPECIAL_IDS = frozenset({151643, 151644, IM_END})  # skipped by skip_special_tokens
_ID_TO_NAME = {v: k for k, v in NAMED_TOKENS.items()}
_TOKEN_PATTERN = re.compile(r"<\|[A-Za-z0-9_]+\|>")
_TEXT_PIECE = re.compile(r"\s*\S+|\s+")
_CONTENT = re.compile(r"<\|start_content\|>(.*?)<\|end_content\|>", re.DOTALL)
_SPEAKER_PREFIX = re.compile(r"^[^\s:]+:\s")
_STYLE = re.compile(r"<\|start_style_label\|>(.*?)<\|end_style_label\|>", re.DOTALL)


def token_str(token_id: int) -> str:
    """The string of a vocabulary id, as the Spark-TTS tokenizer spells it."""
    if 0 <= token_id - GLOBAL_BASE < GLOBAL_SIZE:
        return f"<|bicodec_global_{token_id - GLOBAL_BASE}|>"
    if 0 <= token_id - SEMANTIC_BASE < SEMANTIC_SIZE:
        return f"<|bicodec_semantic_{token_id - SEMANTIC_BASE}|>"
    if token_id in _ID_TO_NAME:
        return _ID_TO_NAME[token_id]
    return _plain_text_cache.get(token_id, "")


def _named_id(name: str) -> int | None:
    if name in NAMED_TOKENS:
        return NAMED_TOKENS[name]
    match = re.fullmatch(r"<\|bicodec_(global|semantic)_(\d+)\|>", name)
    if match is None:
        return None
    index = int(match.group(2))
    if match.group(1) == "global":
        return GLOBAL_BASE + index if index < GLOBAL_SIZE else None
    return SEMANTIC_BASE + index if index < SEMANTIC_SIZE else None


_plain_text_cache: dict[int, str] = {}


def tokenize(text: str) -> tuple[list[int], list[str]]:
    """Ids and strings of ``text``: Spark tokens at their real ids, other text by word.

    Plain text gets made-up ids below the added tokens (one per word with its
    leading spaces); enough for prompt lengths, ``/tokenize`` and ``/detokenize``.
    """
    ids: list[int] = []
    strs: list[str] = []

    def plain(piece_text: str) -> None:
        for piece in _TEXT_PIECE.findall(piece_text):
            token_id = 1000 + zlib.crc32(piece.encode()) % 150000
            _plain_text_cache.setdefault(token_id, piece)
            ids.append(token_id)
            strs.append(piece)

    end = 0
    for match in _TOKEN_PATTERN.finditer(text):
        token_id = _named_id(match.group(0))
        if token_id is None:
            continue
        plain(text[end : match.start()])
        ids.append(token_id)
        strs.append(match.group(0))
        end = match.end()
    plain(text[end:])
    return ids, strs


# --------------------------------------------------------------------------------------
# Configuration


@dataclass
class StandinConfig:
    """How the stand-in behaves; every field can be changed at run time (``/control``)."""

    model: str = "spark-tts"
    max_model_len: int = 4096
    api_key: str | None = None  # like --api-key: guards /v1/* only
    # Pace, per stream: first token after prefill_s, then tokens_per_s (<= 0: no pacing).
    prefill_s: float = 0.02
    tokens_per_s: float = 200.0
    tokens_per_chunk: int = 1  # tokens per SSE chunk (vLLM's stream interval)
    # Ceiling on the tokens/s of all streams together (None: none), shared FIFO like a
    # GPU's batch; server-wide: read live at each chunk, never per request.
    total_tokens_per_s: float | None = None
    max_num_seqs: int | None = None  # more concurrent requests than this wait
    # Length of a segment: fixed, or tokens_per_word per word of the content text.
    tokens_per_segment: int | None = None
    tokens_per_word: int = 10
    min_semantic_tokens: int = 5
    # Controllable prompts: attribute tokens before the globals (the reader skips them).
    attribute_tokens: bool = True
    # ---- faults (FAULT_FIELDS) ----
    global_count: int = 32  # globals written when the prompt pins none
    fail_before_stream: int | None = None  # answer with this HTTP status (e.g. 500, 503)
    error_after_tokens: int | None = None  # in-band {"error": ...} then [DONE]
    drop_after_tokens: int | None = None  # close the connection without [DONE]
    no_semantic_tokens: bool = False  # the first token is <|end_semantic_token|>
    text_only: bool = False  # no token_ids / prompt_token_ids keys (pre-0.10.2 vLLM)
    text_spaces: bool = False  # a space between token strings in the text
    split_text_tokens: bool = False  # cut token strings across chunk boundaries
    stall_s: float = 0.0  # hang this long mid-stream ...
    stall_after_tokens: int = 1  # ... after this many tokens
    # Which requests the faults hit: the next N (None: all), those whose prompt holds
    # this substring (None: any), and never those whose prompt holds fault_exclude.
    fault_requests: int | None = None
    fault_match: str | None = None
    fault_exclude: str | None = None


FAULT_FIELDS = frozenset(
    {
        "global_count",
        "fail_before_stream",
        "error_after_tokens",
        "drop_after_tokens",
        "no_semantic_tokens",
        "text_only",
        "text_spaces",
        "split_text_tokens",
        "stall_s",
        "stall_after_tokens",
    }
)
_CONFIG_FIELDS = {f.name: f for f in dataclasses.fields(StandinConfig)}
_POSITIVE_OR_NONE = frozenset({"total_tokens_per_s"})  # floats whose default is None


def _coerce(name: str, value: Any) -> Any:
    """A control value checked and converted to the field's type (ValueError if wrong)."""
    if name not in _CONFIG_FIELDS:
        raise ValueError(f"unknown setting {name!r}")
    if name == "fail_before_stream" and isinstance(value, bool):
        return 500 if value else None
    default = _CONFIG_FIELDS[name].default
    if value is None:
        if default is None:
            return None
        raise ValueError(f"{name} cannot be null")
    if name in _POSITIVE_OR_NONE:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"{name} must be a positive number or null")
        return float(value)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be a boolean")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a number")
        return float(value)
    if name in ("model", "api_key", "fault_match", "fault_exclude"):
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string")
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer")
    return value


def updated_config(config: StandinConfig, changes: dict[str, Any]) -> StandinConfig:
    """A copy of ``config`` with ``changes`` applied (ValueError on a bad key or value)."""
    return dataclasses.replace(config, **{k: _coerce(k, v) for k, v in changes.items()})


# --------------------------------------------------------------------------------------
# What a prompt makes the stand-in write


def content_text(prompt: str) -> str:
    """The text a prompt asks to be spoken, with a ``speaker_id: `` prefix removed."""
    match = _CONTENT.search(prompt)
    text = match.group(1) if match else prompt
    if prompt.startswith("<|task_tts|>"):
        text = _SPEAKER_PREFIX.sub("", text, count=1)
    return text


def pins_globals(prompt: str) -> bool:
    """False when the prompt leaves the global (voice) tokens to the model.

    That is a speaker prompt stopping at ``<|start_global_token|>`` or a
    controllable one stopping at ``<|end_style_label|>``.
    """
    return not prompt.rstrip().endswith(("<|start_global_token|>", "<|end_style_label|>"))


def expected_semantic_count(prompt: str, config: StandinConfig | None = None) -> int:
    """How many semantic tokens the stand-in writes for ``prompt`` (before max_tokens)."""
    config = config or StandinConfig()
    if config.no_semantic_tokens:
        return 0
    if config.tokens_per_segment is not None:
        return config.tokens_per_segment
    words = len(content_text(prompt).split())
    return max(config.min_semantic_tokens, config.tokens_per_word * words)


def expected_semantic_tokens(prompt: str, config: StandinConfig | None = None) -> list[int]:
    """The semantic codebook values (0..8191) the stand-in writes for ``prompt``."""
    seed = zlib.crc32(content_text(prompt).encode())
    count = expected_semantic_count(prompt, config)
    return [(seed + 7919 * i) % SEMANTIC_SIZE for i in range(count)]


def _style_labels(prompt: str) -> str:
    """The style labels of a controllable prompt ("" for any other)."""
    match = _STYLE.search(prompt)
    return match.group(1) if match else ""


def expected_global_tokens(
    prompt: str, config: StandinConfig | None = None, seed: int | None = None
) -> list[int]:
    """The global codebook values (0..4095) written when the prompt pins none, else [].

    A function of the content text, the style labels (controllable prompts) and the
    request's ``seed`` (when it sends one).
    """
    config = config or StandinConfig()
    if pins_globals(prompt) or config.no_semantic_tokens:
        return []
    key = content_text(prompt) + _style_labels(prompt)
    if seed is not None:
        key += f"|seed={seed}"
    start = zlib.crc32(key.encode()) >> 7
    return [(start + 131 * i) % GLOBAL_SIZE for i in range(config.global_count)]


def expected_attribute_tokens(prompt: str, config: StandinConfig | None = None) -> list[int]:
    """Ids written before the globals of a controllable prompt: its labels, then
    ``<|start_global_token|>`` (none with ``attribute_tokens=False``)."""
    config = config or StandinConfig()
    labels = _style_labels(prompt)
    if not labels or not config.attribute_tokens or pins_globals(prompt):
        return []
    return [*tokenize(labels)[0], START_GLOBAL]


def expected_output_ids(
    prompt: str, config: StandinConfig | None = None, seed: int | None = None
) -> list[int]:
    """Every id the "model" would write for ``prompt``, ignoring stops and max_tokens."""
    config = config or StandinConfig()
    if config.no_semantic_tokens:
        return [END_SEMANTIC, IM_END]
    ids: list[int] = []
    globals_ = expected_global_tokens(prompt, config, seed)
    if globals_:
        ids += expected_attribute_tokens(prompt, config)
        ids += [GLOBAL_BASE + g for g in globals_] + [END_GLOBAL, START_SEMANTIC]
    ids += [SEMANTIC_BASE + s for s in expected_semantic_tokens(prompt, config)]
    return [*ids, END_SEMANTIC, IM_END]


@dataclass
class Completion:
    """The ids a request gets, after stop tokens and max_tokens, and why it ends."""

    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    stop_reason: int | None
    stop_token_hidden: bool  # the last id's text is left out of the text


def plan_completion(
    prompt: str,
    config: StandinConfig,
    max_tokens: int,
    stop_token_ids: list[int] | tuple[int, ...] = (),
    ignore_eos: bool = False,
    seed: int | None = None,
) -> Completion:
    """Apply vLLM's stop checks (EOS, stop_token_ids, then length) to the output ids."""
    out: list[int] = []
    for token in expected_output_ids(prompt, config, seed):
        out.append(token)
        if token == IM_END and not ignore_eos:
            return Completion(out, "stop", None, True)
        if token in stop_token_ids:
            return Completion(out, "stop", token, True)
        if len(out) >= max_tokens:
            return Completion(out, "length", None, False)
    return Completion(out, "length", None, False)  # ignore_eos ran off the plan


def _token_text(token_id: int, skip_special_tokens: bool) -> str:
    if skip_special_tokens and token_id in SPECIAL_IDS:
        return ""
    return token_str(token_id)


# --------------------------------------------------------------------------------------
# Counters


@dataclass
class Stats:
    """What the stand-in has seen; read with ``GET /control/stats``."""

    received: int = 0  # POST /v1/completions, all
    rejected: int = 0  # answered with an error status (bad request or fail_before_stream)
    started: int = 0  # streams begun (or non-streaming requests accepted)
    completed: int = 0  # ran to the end ([DONE] sent, or the JSON answer)
    aborted: int = 0  # the client went away before the end
    errored: int = 0  # ended with an in-band error (error_after_tokens)
    dropped: int = 0  # connection closed by the stand-in (drop_after_tokens)
    running: int = 0  # begun and not yet ended (waiting ones included)
    waiting: int = 0  # held back by max_num_seqs
    max_running: int = 0  # the most at once since the last reset
    generated_tokens: int = 0  # ids sent in streams, over all requests
    finished_reasons: dict[str, int] = field(default_factory=dict)
    requests: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=50))
    # How the latest requests ended: {"request_id", "content" (the prompt's text), "end"
    # (completed, aborted, ...), "at"}, "at" on time.monotonic(), the host's clock for
    # every process on Linux, so a client can time how long after its cancel a request
    # was aborted.
    endings: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=5000))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready counters, with ``requests``, ``last_request`` and ``endings``."""
        data = dataclasses.asdict(self)
        data["requests"] = list(self.requests)
        data["endings"] = list(self.endings)
        data["last_request"] = self.requests[-1] if self.requests else None
        return data


class _DropConnection(Exception):
    """Raised inside a response so that uvicorn closes the connection at once."""


class _QuietDrops(logging.Filter):
    """Keeps uvicorn's traceback for a deliberate drop out of the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, _DropConnection)


# --------------------------------------------------------------------------------------
# The app


def _error(
    message: str, status: int, err_type: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """vLLM 0.32's ErrorResponse body: ``{"error": {message, type, param, code}}``."""
    names = {
        400: "BadRequestError",
        401: "UnauthorizedError",
        404: "NotFoundError",
        500: "InternalServerError",
        503: "ServiceUnavailableError",
    }
    err_type = err_type or names.get(status) or HTTPStatus(status).phrase.replace(" ", "")
    return {"error": {"message": message, "type": err_type, "param": param, "code": status}}


def _sse(data: dict[str, Any] | str) -> str:
    if isinstance(data, str):
        return f"data: {data}\n\n"
    return "data: " + json.dumps(data, separators=(",", ":"), ensure_ascii=False) + "\n\n"


@dataclass
class _Outcome:
    end: str | None = None  # "completed" | "errored", set as the last event is queued
    finish_reason: str | None = None
    sent_tokens: int = 0
    request_id: str = ""
    content: str = ""  # the prompt's text (content_text)


class _EventStreamResponse(Response):
    """An SSE response that notices a client leaving even while the generator sleeps.

    Starlette's StreamingResponse only finds out on the next write under ASGI 2.4; a
    watcher on ``receive()`` ends the stream at once, as vLLM aborts at once.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        events: AsyncIterator[str],
        outcome: _Outcome,
        on_end: Callable[[str, _Outcome], None],
    ) -> None:
        self.status_code = 200
        self.background = None
        self.init_headers()  # no body: no content-length, as for a StreamingResponse
        self.events = events
        self.outcome = outcome
        self.on_end = on_end

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def pump() -> None:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for event in self.events:
                await send(
                    {"type": "http.response.body", "body": event.encode(), "more_body": True}
                )
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        end = "aborted"
        pump_task = asyncio.ensure_future(pump())
        watch_task = asyncio.ensure_future(watch())
        try:
            done, _ = await asyncio.wait(
                {pump_task, watch_task}, return_when=asyncio.FIRST_COMPLETED
            )
            if pump_task not in done and self.outcome.end is not None:
                # uvicorn also reports "disconnect" once the response is complete.
                done, _ = await asyncio.wait({pump_task}, timeout=1.0)
            if pump_task in done:
                try:
                    pump_task.result()
                    end = self.outcome.end or "completed"
                except _DropConnection:
                    end = "dropped"
                    raise
                except OSError:
                    end = "aborted"
        finally:
            for task in (pump_task, watch_task):
                task.cancel()
            await asyncio.gather(pump_task, watch_task, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self.events.aclose()  # type: ignore[attr-defined]
            self.on_end(end, self.outcome)


class StandinLLM:
    """The stand-in's state: configuration, counters, and the Starlette app."""

    def __init__(self, config: StandinConfig | None = None) -> None:
        self.initial = dataclasses.replace(config or StandinConfig())
        self.config = dataclasses.replace(self.initial)
        self.stats = Stats()
        self._fault_requests_left = self.config.fault_requests
        # The shared emitter's virtual clock (loop time): when its last reserved slot ends.
        self._emitter_free_at = 0.0
        self.app = Starlette(
            routes=[
                Route("/health", self.health, methods=["GET"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/tokenize", self.tokenize, methods=["POST"]),
                Route("/detokenize", self.detokenize, methods=["POST"]),
                Route("/metrics", self.metrics, methods=["GET"]),
                Route("/control", self.control, methods=["GET", "POST"]),
                Route("/control/stats", self.get_stats, methods=["GET"]),
            ]
        )
        self.app.state.standin = self
        logging.getLogger("uvicorn.error").addFilter(_QuietDrops())

    # ---- control -------------------------------------------------------------------

    def set_config(self, changes: dict[str, Any]) -> StandinConfig:
        """Apply settings (``reset``: back to the creation settings first)."""
        changes = dict(changes)
        reset = changes.pop("reset", False)
        reset_stats = changes.pop("reset_stats", False)
        base = dataclasses.replace(self.initial) if reset else self.config
        self.config = updated_config(base, changes)
        if reset or "fault_requests" in changes:
            self._fault_requests_left = self.config.fault_requests
        if reset_stats:
            running, waiting = self.stats.running, self.stats.waiting
            self.stats = Stats(running=running, waiting=waiting, max_running=running)
        return self.config

    async def control(self, request: Request) -> Response:
        """``POST /control``: change settings (JSON object); ``GET``: read them."""
        if request.method == "POST":
            try:
                body = await request.json()
                if not isinstance(body, dict):
                    raise ValueError("the body must be a JSON object")
                self.set_config(body)
            except ValueError as err:
                return JSONResponse(_error(str(err), 400), status_code=400)
        return JSONResponse(dataclasses.asdict(self.config))

    async def get_stats(self, request: Request) -> Response:
        """``GET /control/stats``: the counters and the last request bodies."""
        return JSONResponse(self.stats.to_dict())

    # ---- vLLM's simple endpoints ---------------------------------------------------

    def _unauthorized(self, request: Request) -> Response | None:
        key = self.config.api_key
        if key and request.headers.get("authorization") != f"Bearer {key}":
            return JSONResponse({"error": "Unauthorized"}, status_code=401)
        return None

    async def health(self, request: Request) -> Response:
        """``GET /health``: 200 with an empty body, as vLLM."""
        return Response(status_code=200)

    async def models(self, request: Request) -> Response:
        """``GET /v1/models``: the one served model."""
        if (denied := self._unauthorized(request)) is not None:
            return denied
        card = {
            "id": self.config.model,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "vllm",
            "root": self.config.model,
            "parent": None,
            "max_model_len": self.config.max_model_len,
            "permission": [],
        }
        return JSONResponse({"object": "list", "data": [card]})

    async def tokenize(self, request: Request) -> Response:
        """``POST /tokenize``: ``{count, max_model_len, tokens, token_strs}``."""
        body = await request.json()
        prompt = body.get("prompt") if isinstance(body, dict) else None
        if not isinstance(prompt, str):
            return JSONResponse(_error("prompt must be a string", 400), status_code=400)
        ids, strs = tokenize(prompt)
        return JSONResponse(
            {
                "count": len(ids),
                "max_model_len": self.config.max_model_len,
                "tokens": ids,
                "token_strs": strs if body.get("return_token_strs") else None,
            }
        )

    async def detokenize(self, request: Request) -> Response:
        """``POST /detokenize``: ``{prompt}`` for a list of ids."""
        body = await request.json()
        tokens = body.get("tokens") if isinstance(body, dict) else None
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            return JSONResponse(_error("tokens must be a list of ints", 400), status_code=400)
        return JSONResponse({"prompt": "".join(token_str(t) for t in tokens)})

    async def metrics(self, request: Request) -> Response:
        """``GET /metrics``: a few of vLLM's Prometheus series."""
        label = f'model_name="{self.config.model}"'
        lines = [
            f"vllm:num_requests_running{{{label}}} {self.stats.running - self.stats.waiting}",
            f"vllm:num_requests_waiting{{{label}}} {self.stats.waiting}",
            f"vllm:generation_tokens_total{{{label}}} {self.stats.generated_tokens}",
        ]
        for reason, count in sorted(self.stats.finished_reasons.items()):
            lines.append(
                f'vllm:request_success_total{{finished_reason="{reason}",{label}}} {count}'
            )
        return PlainTextResponse("\n".join(lines) + "\n")

    # ---- completions ---------------------------------------------------------------

    def _effective_config(self, prompt: str, override: dict[str, Any] | None) -> StandinConfig:
        """The settings for one request: faults only where fault_requests/match allow."""
        config = self.config
        targeted = config.fault_match is None or config.fault_match in prompt
        if config.fault_exclude and config.fault_exclude in prompt:
            targeted = False
        if targeted and self._fault_requests_left is not None:
            targeted = self._fault_requests_left > 0
            if targeted:
                self._fault_requests_left -= 1
        if not targeted:
            config = dataclasses.replace(
                config, **{name: _CONFIG_FIELDS[name].default for name in FAULT_FIELDS}
            )
        if override:
            config = updated_config(config, override)
        return config

    async def completions(self, request: Request) -> Response:
        """``POST /v1/completions``: an SSE stream, or one JSON answer without ``stream``."""
        self.stats.received += 1
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            self.stats.rejected += 1
            return JSONResponse(_error("the body must be a JSON object", 400), status_code=400)
        self.stats.requests.append(body)
        if (denied := self._unauthorized(request)) is not None:
            self.stats.rejected += 1
            return denied
        try:
            return await self._start_completion(request, body)
        except ValueError as err:
            self.stats.rejected += 1
            return JSONResponse(_error(str(err), 400), status_code=400)

    async def _start_completion(self, request: Request, body: dict[str, Any]) -> Response:
        model = body.get("model")
        if model is not None and model != self.config.model:
            self.stats.rejected += 1
            return JSONResponse(
                _error(f"The model `{model}` does not exist.", 404, param="model"),
                status_code=404,
            )
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ValueError("the stand-in takes one prompt string")
        override = body.get("standin")
        if override is not None and not isinstance(override, dict):
            raise ValueError("standin must be an object of settings")
        config = self._effective_config(prompt, override)

        if config.fail_before_stream is not None:
            self.stats.rejected += 1
            status = config.fail_before_stream
            return JSONResponse(
                _error(f"stand-in fault: fail_before_stream ({status})", status),
                status_code=status,
            )

        prompt_ids, _ = tokenize(prompt)
        room = config.max_model_len - len(prompt_ids)
        if room < 1:
            raise ValueError(
                f"This model's maximum context length is {config.max_model_len} tokens; "
                f"the prompt has {len(prompt_ids)}"
            )
        max_tokens = body.get("max_tokens")
        if max_tokens is None:
            max_tokens = room
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError("max_tokens must be a positive integer")
        stop_ids = body.get("stop_token_ids") or []
        if not isinstance(stop_ids, list) or not all(isinstance(t, int) for t in stop_ids):
            raise ValueError("stop_token_ids must be a list of ints")
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError("seed must be an integer")
        completion = plan_completion(
            prompt, config, min(max_tokens, room), stop_ids, bool(body.get("ignore_eos")), seed
        )
        base_id = request.headers.get("x-request-id") or body.get("request_id")
        request_id = f"cmpl-{base_id or uuid.uuid4().hex[:16]}"

        self.stats.started += 1
        self.stats.running += 1
        self.stats.max_running = max(self.stats.max_running, self.stats.running)
        if not body.get("stream"):
            return await self._whole_completion(
                body, config, completion, prompt_ids, request_id, content_text(prompt)
            )
        outcome = _Outcome(request_id=request_id, content=content_text(prompt))
        events = self._events(body, config, completion, prompt_ids, request_id, outcome)
        return _EventStreamResponse(events, outcome, self._on_end)

    def _on_end(self, end: str, outcome: _Outcome) -> None:
        self.stats.endings.append(
            {
                "request_id": outcome.request_id,
                "content": outcome.content,
                "end": end,
                "at": time.monotonic(),
            }
        )
        self.stats.running -= 1
        setattr(self.stats, end, getattr(self.stats, end) + 1)
        if end == "completed":
            reason = outcome.finish_reason
        else:
            reason = "abort" if end == "aborted" else "error"
        if reason:
            self.stats.finished_reasons[reason] = self.stats.finished_reasons.get(reason, 0) + 1

    async def _wait_for_slot(self) -> None:
        """Hold a request back while max_num_seqs are running (vLLM's waiting queue)."""
        limit = self.config.max_num_seqs
        if limit is None or self.stats.running - self.stats.waiting <= limit:
            return
        self.stats.waiting += 1
        try:
            while True:
                limit = self.config.max_num_seqs
                if limit is None or self.stats.running - self.stats.waiting < limit:
                    return
                await asyncio.sleep(0.002)
        finally:
            self.stats.waiting -= 1

    async def _pace(self, config: StandinConfig, start: float, end: int, count: int) -> float:
        """Wait until a chunk of ``count`` tokens ending at token ``end`` may go.

        First the stream's own pace (``start`` + (end - 1) / tokens_per_s), then, under a
        ceiling, a FIFO slot of ``count / total_tokens_per_s`` on the shared emitter's
        clock, so that n busy streams split the ceiling (processor sharing). Returns
        ``start`` moved on by the time queued for the emitter: a throttled stream keeps
        its own pace afterwards instead of bursting to catch up.
        """
        loop = asyncio.get_running_loop()
        due = start + (end - 1) / config.tokens_per_s if config.tokens_per_s > 0 else start
        if (delay := due - loop.time()) > 0:
            await asyncio.sleep(delay)
        total = self.config.total_tokens_per_s  # live: a server-wide ceiling
        if total is None:
            return start
        now = loop.time()
        slot_start = max(self._emitter_free_at, now)
        self._emitter_free_at = slot_start + count / total
        await asyncio.sleep(self._emitter_free_at - now)
        return start + (slot_start - now)

    async def _whole_completion(
        self,
        body: dict[str, Any],
        config: StandinConfig,
        completion: Completion,
        prompt_ids: list[int],
        request_id: str,
        content: str,
    ) -> Response:
        """A non-streaming answer, after the time the tokens would take (faults ignored)."""
        end = "aborted"
        try:
            await self._wait_for_slot()
            ids = completion.token_ids
            # Paced chunk by chunk as a stream would be, so it shares the ceiling alike.
            start = asyncio.get_running_loop().time() + config.prefill_s
            step = max(1, config.tokens_per_chunk)
            for sent in range(0, len(ids), step):
                end = min(len(ids), sent + step)
                start = await self._pace(config, start, end, end - sent)
            shown = ids[:-1] if completion.stop_token_hidden else ids
            skip = body.get("skip_special_tokens", True)
            want_ids = bool(body.get("return_token_ids"))
            choice = {
                "index": 0,
                "text": "".join(_token_text(t, skip) for t in shown),
                "logprobs": None,
                "finish_reason": completion.finish_reason,
                "stop_reason": completion.stop_reason,
                "token_ids": ids if want_ids else None,
                "prompt_logprobs": None,
                "prompt_token_ids": prompt_ids if want_ids else None,
            }
            self.stats.generated_tokens += len(ids)
            end = "completed"
            return JSONResponse(
                {
                    "id": request_id,
                    "object": "text_completion",
                    "created": int(time.time()),
                    "model": config.model,
                    "choices": [choice],
                    "usage": {
                        "prompt_tokens": len(prompt_ids),
                        "total_tokens": len(prompt_ids) + len(ids),
                        "completion_tokens": len(ids),
                    },
                    "system_fingerprint": SYSTEM_FINGERPRINT,
                }
            )
        finally:
            self._on_end(
                end,
                _Outcome(
                    end=end,
                    finish_reason=completion.finish_reason,
                    request_id=request_id,
                    content=content,
                ),
            )

    async def _events(
        self,
        body: dict[str, Any],
        config: StandinConfig,
        completion: Completion,
        prompt_ids: list[int],
        request_id: str,
        outcome: _Outcome,
    ) -> AsyncIterator[str]:
        """The SSE events of one streamed completion, paced and with its faults."""
        loop = asyncio.get_running_loop()
        await self._wait_for_slot()
        created = int(time.time())
        ids = completion.token_ids
        total = len(ids)
        skip = body.get("skip_special_tokens", True)
        want_ids = bool(body.get("return_token_ids"))
        options = body.get("stream_options") or {}
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        separator = " " if config.text_spaces else ""
        texts = [
            "" if (i == total - 1 and completion.stop_token_hidden) else _token_text(t, skip)
            for i, t in enumerate(ids)
        ]
        # Points where a fault fires, after that many tokens have been sent.
        marks = {
            m
            for m in (config.error_after_tokens, config.drop_after_tokens)
            if m is not None and m < total
        }
        stall_at = config.stall_after_tokens if config.stall_s > 0 else None
        if stall_at is not None and stall_at < total:
            marks.add(stall_at)
        step = max(1, config.tokens_per_chunk)

        start = loop.time() + config.prefill_s
        carry = ""  # split_text_tokens: text held over to the next chunk
        sent = 0
        first = True
        while True:
            if sent == stall_at:
                await asyncio.sleep(config.stall_s)
                start += config.stall_s
                stall_at = None
            if sent == config.error_after_tokens and sent < total:
                outcome.end = "errored"
                yield _sse(_error("stand-in fault: error_after_tokens", 500))
                yield _sse("[DONE]")
                return
            if sent == config.drop_after_tokens and sent < total:
                raise _DropConnection(f"stand-in fault: drop_after_tokens={sent}")
            if sent >= total:
                break
            end = min([total, sent + step, *(m for m in marks if m > sent)])
            start = await self._pace(config, start, end, end - sent)
            chunk_ids = ids[sent:end]
            text = separator.join(t for t in texts[sent:end] if t)
            if separator and sent and text:
                text = separator + text
            last = end == total
            if config.split_text_tokens:
                text = carry + text
                cut = len(text) if last else max(0, len(text) - 9)
                text, carry = text[:cut], text[cut:]
            choice: dict[str, Any] = {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": completion.finish_reason if last else None,
                "stop_reason": completion.stop_reason if last else None,
            }
            if not config.text_only:
                choice["prompt_token_ids"] = prompt_ids if (want_ids and first) else None
                choice["token_ids"] = chunk_ids if want_ids else None
            first = False
            chunk = {
                "id": request_id,
                "object": "text_completion",
                "created": created,
                "model": config.model,
                "choices": [choice],
            }
            if last and not include_usage:
                chunk["system_fingerprint"] = SYSTEM_FINGERPRINT
                outcome.end = "completed"
                outcome.finish_reason = completion.finish_reason
            sent = end
            outcome.sent_tokens = sent
            self.stats.generated_tokens += len(chunk_ids)
            yield _sse(chunk)
        if include_usage:
            outcome.end = "completed"
            outcome.finish_reason = completion.finish_reason
            yield _sse(
                {
                    "id": request_id,
                    "object": "text_completion",
                    "created": created,
                    "model": config.model,
                    "choices": [],
                    "usage": {
                        "prompt_tokens": len(prompt_ids),
                        "total_tokens": len(prompt_ids) + total,
                        "completion_tokens": total,
                    },
                    "system_fingerprint": SYSTEM_FINGERPRINT,
                }
            )
        yield _sse("[DONE]")


def create_app(config: StandinConfig | None = None, **settings: Any) -> Starlette:
    """The ASGI app; ``app.state.standin`` is its :class:`StandinLLM`."""
    config = updated_config(config or StandinConfig(), settings)
    return StandinLLM(config).app


# --------------------------------------------------------------------------------------
# Running it


class StandinControl:
    """``/control`` and ``/control/stats`` over HTTP, for a stand-in in a thread or a process."""

    _http_client: httpx.Client | None = None

    @property
    def root_url(self) -> str:  # pragma: no cover - defined by the subclasses
        raise NotImplementedError

    @property
    def base_url(self) -> str:
        """The OpenAI base URL, ending in ``/v1``."""
        return f"{self.root_url}/v1"

    @property
    def _http(self) -> httpx.Client:
        if self._http_client is None:
            self._http_client = httpx.Client(timeout=10.0)
        return self._http_client

    def _close_http(self) -> None:
        client, self._http_client = self._http_client, None
        if client is not None:
            client.close()

    def control(self, **settings: Any) -> dict[str, Any]:
        """Change settings at run time (``reset=True``, ``reset_stats=True`` too)."""
        response = self._http.post(f"{self.root_url}/control", json=settings)
        response.raise_for_status()
        return response.json()

    def reset(self) -> dict[str, Any]:
        """Back to the creation settings, counters at zero."""
        return self.control(reset=True, reset_stats=True)

    def stats(self) -> dict[str, Any]:
        """The counters of :class:`Stats`, plus ``requests`` and ``last_request``."""
        response = self._http.get(f"{self.root_url}/control/stats")
        response.raise_for_status()
        return response.json()

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 5.0
    ) -> dict[str, Any]:
        """Poll the stats until ``predicate(stats)`` holds (TimeoutError after timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            if predicate(stats):
                return stats
            if time.monotonic() > deadline:
                raise TimeoutError(f"stand-in stats never matched: {stats}")
            time.sleep(0.01)

    async def astats(self) -> dict[str, Any]:
        """:meth:`stats` for async tests (does not block the event loop)."""
        async with httpx.AsyncClient(timeout=10.0) as client:
            response = await client.get(f"{self.root_url}/control/stats")
            response.raise_for_status()
            return response.json()

    async def await_for(
        self,
        predicate: Callable[[dict[str, Any]], bool],
        timeout: float = 5.0,  # noqa: ASYNC109 - the same signature as wait_for
    ) -> dict[str, Any]:
        """:meth:`wait_for` for async tests."""
        deadline = time.monotonic() + timeout
        while True:
            stats = await self.astats()
            if predicate(stats):
                return stats
            if time.monotonic() > deadline:
                raise TimeoutError(f"stand-in stats never matched: {stats}")
            await asyncio.sleep(0.01)


class StandinServer(StandinControl):
    """The stand-in under uvicorn in a background thread, on 127.0.0.1 and a free port.

    Quick to start and inspectable in-process (``server.config``); it shares the
    caller's GIL, so load tests and benchmarks use :class:`StandinProcess` instead.

    >>> with StandinServer(tokens_per_s=500) as server:
    ...     server.control(drop_after_tokens=10)
    ...     ...  # point the gateway at server.base_url
    """

    def __init__(self, config: StandinConfig | None = None, **settings: Any) -> None:
        self.standin = StandinLLM(updated_config(config or StandinConfig(), settings))
        self.port = 0
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def root_url(self) -> str:
        """``http://127.0.0.1:PORT``, where /health, /tokenize and /control live."""
        return f"http://{HOST}:{self.port}"

    @property
    def config(self) -> StandinConfig:
        """The current settings (read in-process)."""
        return self.standin.config

    def start(self) -> StandinServer:
        """Bind a free port, start uvicorn in a daemon thread, wait until it serves."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.standin.app,
            log_level="warning",
            lifespan="off",
            timeout_graceful_shutdown=1,
            timeout_keep_alive=30,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="standin-llm", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ServerStartError("the stand-in LLM server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Ask uvicorn to exit (open streams get 1 s) and join its thread."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._close_http()

    def __enter__(self) -> StandinServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class StandinProcess(StandinControl, ServerProcess):
    """The stand-in as its own process (``python -m devtools.standin_llm``).

    It does not share the caller's GIL, and it can be killed and started again on
    the same port (an LLM restart or outage). ``settings`` are :class:`StandinConfig`
    fields; :meth:`control` changes them at run time as for :class:`StandinServer`.
    """

    def __init__(
        self,
        log_path: Path | str,
        *,
        port: int | None = None,
        config: StandinConfig | None = None,
        start_timeout_s: float = 30.0,
        **settings: Any,
    ) -> None:
        self.port = port or free_port()
        self.settings = dataclasses.asdict(updated_config(config or StandinConfig(), settings))
        super().__init__(
            "the stand-in LLM",
            [
                sys.executable,
                *("-m", "devtools.standin_llm"),
                *("--host", HOST, "--port", str(self.port)),
                *("--config-json", json.dumps(self.settings)),
            ],
            log_path=log_path,
            health_url=f"http://{HOST}:{self.port}/health",
            start_timeout_s=start_timeout_s,
            stop_timeout_s=3.0,
            poll_s=0.05,
        )

    @property
    def root_url(self) -> str:
        """``http://127.0.0.1:PORT``, where /health, /tokenize and /control live."""
        return f"http://{HOST}:{self.port}"

    @property
    def model(self) -> str:
        """The served model name."""
        return str(self.settings["model"])

    def stop(self, timeout_s: float | None = None) -> None:
        """Terminate the process (kill after ``timeout_s``) and close the control client."""
        super().stop(timeout_s)
        self._close_http()


@contextlib.contextmanager
def standin_server(**settings: Any) -> Iterator[StandinServer]:
    """``with standin_server(tokens_per_s=1000) as server:`` — a started StandinServer."""
    with StandinServer(**settings) as server:
        yield server


def main(argv: list[str] | None = None) -> None:
    """Command line: serve the stand-in on a port, e.g. for benchmarks."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default=HOST)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model", default=StandinConfig.model)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--tokens-per-s", type=float, default=StandinConfig.tokens_per_s)
    parser.add_argument("--prefill-s", type=float, default=StandinConfig.prefill_s)
    parser.add_argument("--tokens-per-chunk", type=int, default=StandinConfig.tokens_per_chunk)
    parser.add_argument(
        "--total-tokens-per-s",
        type=float,
        default=None,
        help="ceiling on the tokens/s of all streams together (default: none)",
    )
    parser.add_argument("--tokens-per-segment", type=int, default=None)
    parser.add_argument("--tokens-per-word", type=int, default=StandinConfig.tokens_per_word)
    parser.add_argument("--max-num-seqs", type=int, default=None)
    parser.add_argument("--max-model-len", type=int, default=StandinConfig.max_model_len)
    parser.add_argument(
        "--config-json",
        default=None,
        help="a JSON object of StandinConfig fields, applied over the options above",
    )
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    if args.total_tokens_per_s is not None and args.total_tokens_per_s <= 0:
        parser.error("--total-tokens-per-s must be positive")
    config = StandinConfig(
        model=args.model,
        api_key=args.api_key,
        tokens_per_s=args.tokens_per_s,
        prefill_s=args.prefill_s,
        tokens_per_chunk=args.tokens_per_chunk,
        total_tokens_per_s=args.total_tokens_per_s,
        tokens_per_segment=args.tokens_per_segment,
        tokens_per_word=args.tokens_per_word,
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
    )
    if args.config_json:
        try:
            changes = json.loads(args.config_json)
            if not isinstance(changes, dict):
                raise ValueError("--config-json must be a JSON object")
            config = updated_config(config, changes)
        except ValueError as err:
            parser.error(str(err))
    app = StandinLLM(config).app
    print(
        f"stand-in vLLM on http://{args.host}:{args.port}/v1 (model {config.model!r})", flush=True
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, lifespan="off")


if __name__ == "__main__":
    main()
