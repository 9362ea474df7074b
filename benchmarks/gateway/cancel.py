"""The ``cancel`` section: barge-in under load, on both WebSockets and over HTTP.

Load clients post paragraphs over HTTP back to back while barging clients, each on
one WebSocket session kept open, start a paragraph, let it play for a random while
after its first audio, and cancel it (``input.cancel`` on the text-in socket,
``{"type": "cancel"}`` on the seed socket), as a voice agent does when its user
starts talking; HTTP barging clients close the response instead. Per cancel, on this
machine's clock: its answer, the last audio byte received before the answer, and the
upstream abort, which the stand-in LLM (its own process) records on the same
monotonic clock. Every sentence of a barging paragraph
carries a tag of its own, so the stand-in's record of each aborted request names the
cancel that caused it. A cancel that comes while no sentence is being generated
(between two, or after the last was written) aborts nothing upstream: counted apart.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from report import table  # benchmarks/, the script's own folder

from decoder_gateway.client import GatewayClient, SpeechSocket, TextInSocket
from decoder_gateway.client.sockets import Session
from decoder_gateway.text import split_segments
from devtools import GOLDEN_BICODEC
from devtools.gateway_server import GatewayServer
from devtools.standin_llm import StandinProcess
from gateway.grid import wait_idle
from gateway.measure import gateway_request
from gateway.stats import percentile
from gateway.workload import (
    PARAGRAPHS,
    STANDIN_MODEL,
    STANDIN_PREFILL_S,
    STANDIN_TOKENS_PER_WORD,
    VOICE,
)

CANCEL_SECTION = "cancel"
SOCKETS = ("text-in", "seed", "http")  # http: closing the response is the cancel
BARGE_AFTER_S = (0.1, 1.5)  # how long after its first audio a paragraph is cancelled


@dataclass
class CancelPlan:
    cancels: int  # measured cancels per socket
    barging_clients: int  # concurrent barging sessions per socket
    load_clients: int  # concurrent HTTP clients posting paragraphs meanwhile
    tokens_per_s: float  # the stand-in's pace per stream


def cancel_plan(args: argparse.Namespace) -> CancelPlan:
    return CancelPlan(
        cancels=args.cancels or (20 if args.quick else 100),
        barging_clients=args.cancel_barging_clients,
        load_clients=args.cancel_load_clients,
        tokens_per_s=args.cancel_tokens_per_s,
    )


@dataclass
class Cancel:
    """One cancel, timed from the moment it was sent (seconds)."""

    tag: str
    sent_at: float  # time.monotonic()
    answer_s: float = 0.0
    last_audio_s: float = 0.0  # 0: no audio came after the cancel was sent
    upstream_abort_s: float | None = None  # None: no upstream request was open
    audio_seconds: float = 0.0  # what the answer says was sent


@dataclass
class Barging:
    """What one socket's barging clients measured."""

    cancels: list[Cancel] = field(default_factory=list)
    finished_first: int = 0  # paragraphs that ended before their cancel (not counted)


def tagged(paragraph: str, tag: str) -> str:
    """``paragraph`` with ``tag`` before each sentence, so that each LLM request (one
    per sentence) names its cancel in the stand-in's record."""
    return " ".join(f"{tag} {sentence}" for sentence in split_segments(paragraph))


async def _barge(
    session: Session, socket: str, tag: str, text: str, rng: random.Random, barging: Barging
) -> None:
    """Speak ``text``, cancel it a while after its first audio, time the answer."""
    if isinstance(session, TextInSocket):
        await session.write(text)
        await session.done()
    else:
        await session.send({"input": text, "voice": VOICE, "segment_id": tag})
    barge_at: float | None = None
    cancel: Cancel | None = None
    while True:
        timeout = None if barge_at is None or cancel else max(0.0, barge_at - time.monotonic())
        try:
            frame = await asyncio.wait_for(session.receive(), timeout)
        except TimeoutError:
            frame = None
        now = time.monotonic()
        if isinstance(frame, bytes):
            barge_at = barge_at or now + rng.uniform(*BARGE_AFTER_S)
            if cancel is not None:
                cancel.last_audio_s = now - cancel.sent_at
        elif isinstance(frame, dict):
            kind = frame.get("type")
            if kind in ("audio.cancelled", "cancelled"):
                assert cancel is not None, frame
                cancel.answer_s = now - cancel.sent_at
                cancel.audio_seconds = float(frame["audio_seconds"])
                stopped = frame.get("utterance_index") is not None or (
                    frame.get("status") == "cancelled"
                )
                if stopped:
                    barging.cancels.append(cancel)
                else:
                    barging.finished_first += 1
                return
            if kind == "error":
                raise RuntimeError(f"{socket}: {frame}")
        if cancel is None and barge_at is not None and now >= barge_at:
            cancel = Cancel(tag, time.monotonic())
            if isinstance(session, TextInSocket):
                await session.cancel()
            else:
                assert isinstance(session, SpeechSocket)
                await session.cancel(tag)


async def _barge_http(
    gateway: GatewayClient, tag: str, text: str, rng: random.Random, barging: Barging
) -> None:
    """POST ``text`` and close the response a while after its first audio."""
    barge_at: float | None = None
    async with gateway.speech_stream(text, voice=VOICE) as response:
        async for _ in response.chunks():
            now = time.monotonic()
            barge_at = barge_at or now + rng.uniform(*BARGE_AFTER_S)
            if now >= barge_at:
                break
        else:
            barging.finished_first += 1
            return
        cancel = Cancel(tag, time.monotonic())
    # Leaving the block closed the connection: the HTTP cancel (nothing answers it).
    barging.cancels.append(cancel)


async def _barging_client(
    url: str, socket: str, client: int, quota: list[int], barging: Barging
) -> None:
    rng = random.Random(client)
    async with GatewayClient(url, timeout_s=60.0, connect_timeout_s=10.0) as gateway:
        if socket == "http":
            turn = 0
            while len(barging.cancels) < quota[0]:
                tag = f"h{client}x{turn}"
                text = tagged(PARAGRAPHS[(client + turn) % len(PARAGRAPHS)], tag)
                await _barge_http(gateway, tag, text, rng, barging)
                turn += 1
            return
        opening = gateway.text_in_socket() if socket == "text-in" else gateway.speech_socket()
        async with opening as session:
            if isinstance(session, TextInSocket):
                await session.configure(voice=VOICE, response_format="pcm", stream_audio=True)
            turn = 0
            while len(barging.cancels) < quota[0]:
                tag = f"{socket[0]}{client}x{turn}"
                text = tagged(PARAGRAPHS[(client + turn) % len(PARAGRAPHS)], tag)
                await _barge(session, socket, tag, text, rng, barging)
                turn += 1


async def _load(url: str, clients: int, stop: asyncio.Event) -> int:
    """HTTP clients posting paragraphs back to back until ``stop``; requests done."""
    done = 0

    async def one(i: int) -> None:
        nonlocal done
        async with GatewayClient(url, timeout_s=300.0, connect_timeout_s=10.0) as client:
            turn = 0
            while not stop.is_set():
                await gateway_request(client, PARAGRAPHS[(i + turn) % len(PARAGRAPHS)])
                done += 1
                turn += 1

    await asyncio.gather(*(one(i) for i in range(clients)))
    return done


async def _measure(url: str, socket: str, plan: CancelPlan) -> tuple[Barging, int]:
    barging, stop = Barging(), asyncio.Event()
    load = asyncio.create_task(_load(url, plan.load_clients, stop))
    try:
        await asyncio.sleep(1.0)  # the load is running
        quota = [plan.cancels]
        await asyncio.gather(
            *(_barging_client(url, socket, i, quota, barging) for i in range(plan.barging_clients))
        )
    finally:
        stop.set()
        loaded = await load
    return barging, loaded


def _match_aborts(barging: Barging, endings: list[dict]) -> None:
    """Each cancel's upstream abort: the first aborted request of its tag."""
    aborted: dict[str, float] = {}
    for ending in endings:
        if ending["end"] != "aborted":
            continue
        tag = ending["content"].split(" ", 1)[0]
        aborted[tag] = min(ending["at"], aborted.get(tag, ending["at"]))
    for cancel in barging.cancels:
        if cancel.tag in aborted:
            cancel.upstream_abort_s = aborted[cancel.tag] - cancel.sent_at


def _ms(values: list[float], q: float) -> str:
    return f"{percentile(values, q) * 1000:.0f}" if values else "-"


def run_cancel(plan: CancelPlan, logs: Path, gateway_env: dict[str, str]) -> None:
    print(
        f"\n## Barge-in: {plan.cancels} cancels per socket (and HTTP) under load\n\n"
        f"Stand-in vLLM (its own process): {plan.tokens_per_s:g} tokens/s per stream "
        "(a busy GPU's pace: a sentence is still being written when it is cut off), "
        f"{STANDIN_TOKENS_PER_WORD} tokens per word; the gateway on the small decoder. "
        f"{plan.load_clients} HTTP clients post paragraphs back to back throughout; "
        f"{plan.barging_clients} barging sessions per socket each start a paragraph "
        f"(every sentence tagged), cancel it {BARGE_AFTER_S[0]:g}-{BARGE_AFTER_S[1]:g} s "
        "after its first audio (uniformly at random), and go on with the next on the "
        "same session; HTTP barging clients close the response instead (the HTTP "
        "cancel, which nothing answers). Admission control off, so every stream runs. "
        "Times from the cancel being sent (the response closed), on this machine's "
        "clock; the upstream abort is when the stand-in saw the request's connection "
        "close."
    )
    rows = []
    with (
        StandinProcess(
            logs / "standin-cancel.log",
            model=STANDIN_MODEL,
            tokens_per_s=plan.tokens_per_s,
            prefill_s=STANDIN_PREFILL_S,
            tokens_per_word=STANDIN_TOKENS_PER_WORD,
        ) as standin,
        GatewayServer(
            standin.base_url,
            logs,
            MODEL_NAME=STANDIN_MODEL,
            BICODEC_DIR=str(GOLDEN_BICODEC),
            LOG_LEVEL="warning",
            # Every stream admitted: the point is cancels among busy streams, not
            # refusals (which the ramp section measures).
            ADMISSION_CONTROL="false",
            **gateway_env,
        ) as gateway,
    ):
        asyncio.run(_warm_up(gateway.url))
        for socket in SOCKETS:
            standin.control(reset_stats=True)
            started = time.perf_counter()
            barging, loaded = asyncio.run(_measure(gateway.url, socket, plan))
            wall = time.perf_counter() - started
            wait_idle(gateway, standin, 30.0)
            del barging.cancels[plan.cancels :]  # concurrent clients may pass the quota
            _match_aborts(barging, standin.stats()["endings"])
            cancels = barging.cancels
            answer = [c.answer_s for c in cancels]
            last = [c.last_audio_s for c in cancels]
            aborts = [c.upstream_abort_s for c in cancels if c.upstream_abort_s is not None]
            answered = socket != "http"  # an HTTP cancel has no answer to time
            rows.append(
                [
                    socket,
                    len(cancels),
                    _ms(answer, 50) if answered else "-",
                    _ms(answer, 99) if answered else "-",
                    _ms(last, 50) if answered else "-",
                    _ms(last, 99) if answered else "-",
                    sum(1 for c in cancels if c.last_audio_s > 0) if answered else "-",
                    _ms(aborts, 50),
                    _ms(aborts, 99),
                    len(aborts),
                    f"{max((answer if answered else []) + aborts, default=0.0):.3f}",
                    barging.finished_first,
                    f"{loaded} in {wall:.0f} s",
                ]
            )
    table(
        "Cancel to its answer, to the last audio byte, and to the upstream abort (ms)",
        [
            "socket",
            "cancels",
            "answer p50",
            "answer p99",
            "last audio byte p50",
            "last audio byte p99",
            "cancels with audio after them",
            "upstream abort p50",
            "upstream abort p99",
            "cancels that aborted a request",
            "slowest answer or abort (s)",
            "paragraphs that ended first",
            "load: HTTP requests",
        ],
        rows,
    )


async def _warm_up(url: str) -> None:
    async with GatewayClient(url, timeout_s=60.0) as client:
        await gateway_request(client, PARAGRAPHS[0])
