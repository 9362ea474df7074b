"""The ``ramp`` section: offered streams ramped past what the LLM keeps in real time.

A GPU shares one decode step among its batch, so past its capacity every stream slows
and all of them stall together. The stand-in runs with a shared token ceiling
(``total_tokens_per_s``) to behave so; the gateway runs once with admission control
on and once off, and each offered load is a burst of streams measured at the client,
the only place a stall is heard: did the stream start, how soon, and how long did a
listener who starts at the first byte wait for audio mid-utterance.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
from report import table  # benchmarks/, the script's own folder

from decoder_gateway.client import ClientError, GatewayClient, ServerError, StreamBroken
from decoder_gateway.text import split_segments
from devtools import GOLDEN_BICODEC
from devtools.gateway_server import GatewayServer
from devtools.standin_llm import StandinProcess
from gateway.grid import wait_idle
from gateway.measure import BYTES_PER_SECOND, Delivery, gateway_request
from gateway.stats import percentile
from gateway.workload import (
    PARAGRAPHS,
    STANDIN_MODEL,
    STANDIN_PREFILL_S,
    STANDIN_TOKENS_PER_WORD,
)

RAMP_SECTION = "ramp"
REAL_TIME_TOKENS_PER_S = 50.0  # BiCodec semantic tokens per second of audio
STALL_FLOOR_S = 0.02  # a shorter silence is not heard as a stall
REFUSALS = (429, 503)
MODES = (("admission on", "true"), ("admission off", "false"))
# A paragraph and the next one's first sentence: 6.5-8 s of audio, long enough for a
# stream that falls behind to be heard stalling, short enough to keep a level brief.
TEXTS = [
    f"{text} {split_segments(PARAGRAPHS[(i + 1) % len(PARAGRAPHS)])[0]}"
    for i, text in enumerate(PARAGRAPHS)
]


@dataclass
class RampPlan:
    total_tokens_per_s: float  # the stand-in's ceiling over all streams
    tokens_per_s: float  # the stand-in's pace of one stream
    streams: list[int]  # offered loads, each a burst of this many streams
    arrival_s: float  # a burst's arrivals are spread evenly over this long
    level_timeout_s: float  # streams still running then are cut

    @property
    def ideal_streams(self) -> float:
        """Streams the ceiling keeps in real time: the most admission should let in."""
        return self.total_tokens_per_s / REAL_TIME_TOKENS_PER_S


def ramp_plan(args: argparse.Namespace) -> RampPlan:
    """The ramp's settings from the flags; ``--quick`` has fewer offered loads."""
    default = [3, 12] if args.quick else [3, 6, 12, 24]
    return RampPlan(
        total_tokens_per_s=args.ramp_total_tokens_per_s,
        tokens_per_s=args.ramp_tokens_per_s,
        streams=args.ramp_streams or default,
        arrival_s=0.5,
        level_timeout_s=args.ramp_level_timeout,
    )


@dataclass
class Offered:
    """One offered stream: what the client saw, and how the gateway answered."""

    delivery: Delivery
    refused: int | None = None  # the refusal status (429/503)
    retry_after: float | None = None  # what the refusal asked to wait (Retry-After)
    admitted: bool = False  # the audio answer began (status 200)

    @property
    def stalls(self) -> list[float]:
        """Silences a listener hears mid-utterance (starting at the first byte)."""
        return [gap for gap in self.delivery.gaps() if gap > STALL_FLOOR_S]


async def _offer(client: GatewayClient, text: str, delay_s: float, offered: Offered) -> None:
    """One stream, sent ``delay_s`` after the burst began; ``offered`` is filled in place,
    so a stream cut at the time limit keeps what it saw."""
    await asyncio.sleep(delay_s)
    try:
        await gateway_request(client, text, offered.delivery)
        offered.admitted = True
    except ServerError as err:
        if err.status in REFUSALS:
            offered.refused, offered.retry_after = err.status, err.retry_after
        else:
            offered.delivery.error = str(err)
    except (ClientError, RuntimeError) as err:
        offered.admitted = isinstance(err, StreamBroken) or bool(offered.delivery.arrivals)
        offered.delivery.error = str(err) or type(err).__name__


async def offer_burst(url: str, plan: RampPlan, streams: int) -> list[Offered]:
    """``streams`` requests arriving over ``plan.arrival_s``; cut at the time limit."""
    results = [Offered(Delivery()) for _ in range(streams)]
    async with GatewayClient(
        url, timeout_s=300.0, connect_timeout_s=10.0, max_connections=streams + 4
    ) as client:
        tasks = [
            asyncio.create_task(
                _offer(client, TEXTS[i % len(TEXTS)], i * plan.arrival_s / streams, r)
            )
            for i, r in enumerate(results)
        ]
        _, pending = await asyncio.wait(tasks, timeout=plan.level_timeout_s)
        cut_at = time.perf_counter()
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    for offered in results:
        delivery = offered.delivery
        unfinished = not (delivery.total_s or delivery.error or offered.refused)
        if unfinished and delivery.started:
            delivery.cut_s = cut_at - delivery.started
            offered.admitted = bool(delivery.arrivals)
    return results


def ramp_row(mode: str, streams: int, results: list[Offered]) -> list[object]:
    admitted = [r for r in results if r.admitted]
    refused = [r for r in results if r.refused is not None]
    failed = [r for r in results if r.delivery.error is not None or r.delivery.cut_s is not None]
    heard = [r for r in admitted if r.delivery.arrivals]
    stalls = [sum(r.stalls) for r in heard]
    ttfa = [r.delivery.ttfa_s for r in heard]
    codes = sorted({r.refused for r in refused if r.refused is not None})
    waits = sorted({f"{r.retry_after:g} s" for r in refused if r.retry_after is not None})
    if waits:
        codes = [*codes, f"Retry-After {', '.join(waits)}"]  # type: ignore[list-item]
    return [
        mode,
        streams,
        len(admitted),
        f"{len(refused)}" + (f" ({'/'.join(map(str, codes))})" if codes else ""),
        len(failed),
        f"{sum(1 for s in stalls if s)}/{len(heard)}",
        f"{max(stalls):.2f}" if stalls else "-",
        f"{sum(len(r.stalls) for r in heard)}",
        f"{percentile(ttfa, 50):.2f}" if ttfa else "-",
        f"{percentile(ttfa, 90):.2f}" if ttfa else "-",
    ]


RAMP_HEADER = [
    "mode",
    "offered",
    "admitted",
    "refused",
    "failed or cut",
    "admitted streams with underrun",
    "worst stream's underrun (s)",
    "stalls, all streams",
    "first audio p50 (s)",
    "first audio p90 (s)",
]


def verdict(mode: str, plan: RampPlan, levels: list[list[Offered]]) -> str:
    """One line: did admitted streams stall, and how much of the capacity was used."""
    admitted = [r for level in levels for r in level if r.admitted]
    underran = sum(1 for r in admitted if r.stalls)
    top = levels[-1]
    room = min(len(top), plan.ideal_streams)
    share = sum(1 for r in top if r.admitted) / room if room else 0.0
    return (
        f"- {mode}: {underran} of {len(admitted)} admitted streams underran; admitted "
        f"{share:.0%} of the ideal {room:g} at the highest load ({len(top)} offered)."
    )


def capacity_line(mode: str, url: str) -> str:
    """What the gateway measured of the LLM and the decoder (its /health)."""
    capacity = httpx.get(f"{url}/health", timeout=10).json().get("capacity", {})
    return (
        f"- {mode}: the gateway measured the LLM at {capacity.get('llm_tokens_per_s')} "
        f"tokens/s and the decoder at {capacity.get('decoder_tokens_per_s')} tokens per "
        f"busy second: {capacity.get('streams')} real-time streams with headroom."
    )


def run_levels(
    gateway: GatewayServer,
    plan: RampPlan,
    label: str,
    rows: list[list[object]],
    settle: Callable[[float], None],
) -> list[list[Offered]]:
    """A warm-up stream, then each offered load of ``plan`` in turn (a row each in
    ``rows``); ``settle(timeout_s)`` waits for the servers to be idle between them."""
    try:
        asyncio.run(offer_burst(gateway.url, plan, 1))  # warm-up
        settle(30.0)
        levels = []
        for streams in plan.streams:
            started = time.perf_counter()
            results = asyncio.run(offer_burst(gateway.url, plan, streams))
            print(
                f"({label}, {streams} streams: {time.perf_counter() - started:.1f} s)",
                file=sys.stderr,
                flush=True,
            )
            levels.append(results)
            rows.append(ramp_row(label, streams, results))
            settle(60.0)
        return levels
    except Exception:
        print(f"\nGateway log tail:\n{gateway.log_tail()}")
        raise


def run_ramp(plan: RampPlan, logs: Path, env: dict[str, str]) -> None:
    seconds = [
        sum(max(5, STANDIN_TOKENS_PER_WORD * len(s.split())) for s in split_segments(t))
        / REAL_TIME_TOKENS_PER_S
        for t in TEXTS
    ]
    print(
        f"\n## Admission past capacity: offered streams ramped past the LLM's ceiling\n\n"
        f"Stand-in vLLM (separate process) with a shared ceiling of "
        f"{plan.total_tokens_per_s:g} tokens/s over all its streams (n streams get "
        f"min({plan.tokens_per_s:g}, {plan.total_tokens_per_s:g} / n) tokens/s each, as a "
        f"GPU's batch shares its decode step), {STANDIN_PREFILL_S * 1000:g} ms prefill: "
        f"ideal = {plan.ideal_streams:g} real-time streams at "
        f"{REAL_TIME_TOKENS_PER_S:g} tokens/s each. Each offered load is one burst of "
        f"streams arriving over {plan.arrival_s:g} s, each a paragraph "
        f"({min(seconds):.1f}-{max(seconds):.1f} s of audio) over POST "
        "/v1/audio/speech/stream; the gateway (small golden decoder, "
        f"DECODER_THREADS={env.get('DECODER_THREADS', 'unset: half the cores')}, "
        "MAX_CONCURRENT_STREAMS=64) runs once "
        "per mode (ADMISSION_CONTROL=true/false). "
        "Measured at the client: refused = 429/503 answers; underrun = silences over "
        f"{STALL_FLOOR_S * 1000:g} ms heard by a listener who starts at the first byte "
        f"({BYTES_PER_SECOND} bytes/s); a level stops at {plan.level_timeout_s:g} s "
        "(streams still running are cut)."
    )
    rows: list[list[object]] = []
    verdicts: list[str] = []
    with StandinProcess(
        logs / "standin-ramp.log",
        model=STANDIN_MODEL,
        tokens_per_s=plan.tokens_per_s,
        prefill_s=STANDIN_PREFILL_S,
        tokens_per_word=STANDIN_TOKENS_PER_WORD,
        total_tokens_per_s=plan.total_tokens_per_s,
    ) as standin:
        for mode, flag in MODES:
            with GatewayServer(
                standin.base_url,
                logs,
                MODEL_NAME=STANDIN_MODEL,
                BICODEC_DIR=str(GOLDEN_BICODEC),
                ADMISSION_CONTROL=flag,
                MAX_CONCURRENT_STREAMS="64",
                LOG_LEVEL="warning",
                **env,
            ) as gateway:
                levels = run_levels(
                    gateway, plan, mode, rows, settle=lambda s: wait_idle(gateway, standin, s)
                )
                verdicts.append(verdict(mode, plan, levels))
                verdicts.append(capacity_line(mode, gateway.url))
    table(
        f"Offered streams vs. admitted, refused and underrun "
        f"(ideal: {plan.ideal_streams:g} real-time streams)",
        RAMP_HEADER,
        rows,
    )
    print()
    print("\n".join(verdicts))
