"""The ``grid`` section: decoder x LLM rate x concurrent streams, one table.

Each cell runs a fixed number of requests per stream and stops at its time limit;
requests still running are cut and counted as such, so a slow cell costs a bounded time.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from report import table  # benchmarks/, the script's own folder

from decoder_gateway.client import ClientError, GatewayClient
from decoder_gateway.text import split_segments
from devtools.gateway_server import GatewayServer
from devtools.standin_llm import StandinProcess
from gateway.decoder import decoder_parameters
from gateway.measure import (
    BYTES_PER_SECOND,
    GAP_FLOOR_S,
    Delivery,
    decoder_stats,
    gateway_metrics,
    gateway_request,
    tree_cpu_s,
)
from gateway.stats import ms, percentile
from gateway.workload import (
    PARAGRAPHS,
    STANDIN_MODEL,
    STANDIN_PREFILL_S,
    STANDIN_TOKENS_PER_WORD,
)

GRID_SECTION = "grid"


@dataclass
class GridPlan:
    decoders: list[str]  # "small" and/or "full"
    rates: list[float]  # stand-in tokens/s per stream
    streams: list[int]
    requests_per_stream: int
    cell_timeout_s: float
    full_max_streams: int | None  # the full decoder skips larger concurrency
    device: str
    dtype: str
    tokens_per_chunk: int
    deadline: float | None = None  # time.monotonic() after which no cell starts


def grid_plan(args: argparse.Namespace, parser: argparse.ArgumentParser) -> GridPlan:
    """The grid's settings: the flags given, else the --quick or the full defaults."""
    quick = args.quick

    def pick(value: Any, quick_default: Any, full_default: Any) -> Any:
        if value is not None:
            return value
        return quick_default if quick else full_default

    decoders = pick(args.decoders, "small,full", "small,full").split(",")
    unknown = set(decoders) - {"small", "full"}
    if unknown or not decoders:
        parser.error(f"--decoders: small and/or full, not {sorted(unknown)}")
    return GridPlan(
        decoders=decoders,
        rates=pick(args.rates, [200.0], [100.0, 200.0, 400.0]),
        streams=pick(args.streams, [1, 4], [1, 4, 16, 64]),
        requests_per_stream=pick(args.requests_per_stream, 2, 2),
        cell_timeout_s=pick(args.cell_timeout, 60.0, 120.0),
        full_max_streams=pick(args.full_max_streams, 1, None) or None,
        device=args.device,
        dtype=args.decoder_dtype,
        tokens_per_chunk=args.tokens_per_chunk,
        deadline=None if args.time_budget is None else time.monotonic() + args.time_budget,
    )


async def _grid_cell(
    url: str, texts: list[str], streams: int, each: int, timeout_s: float
) -> list[Delivery]:
    """``streams`` clients, each posting ``each`` paragraphs back to back; requests
    still running after ``timeout_s`` are cut (their audio so far is kept)."""
    deliveries: list[Delivery] = []
    async with GatewayClient(url, timeout_s=300.0, max_connections=streams + 4) as client:

        async def one_stream(i: int) -> None:
            for r in range(each):
                delivery = Delivery()
                deliveries.append(delivery)
                try:
                    await gateway_request(client, texts[(i + r * streams) % len(texts)], delivery)
                except (RuntimeError, ClientError) as err:
                    delivery.error = str(err) or type(err).__name__

        tasks = [asyncio.create_task(one_stream(i)) for i in range(streams)]
        _, pending = await asyncio.wait(tasks, timeout=timeout_s)
        cut_at = time.perf_counter()
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    for delivery in deliveries:
        if delivery.error is None and not delivery.total_s:
            delivery.cut_s = cut_at - delivery.started
    return deliveries


def wait_idle(gateway: GatewayServer, standin: StandinProcess, timeout_s: float) -> None:
    """Until the gateway has no stream in progress and the stand-in no completion."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        active = gateway_metrics(gateway.url).get("tts_active_streams", 0.0)
        if active <= 0 and standin.stats().get("running", 0) == 0:
            return
        time.sleep(0.2)
    print(f"(warning: the gateway was still busy {timeout_s:g} s after a cell)")


def grid_row(
    decoder: str,
    rate: float,
    streams: int,
    deliveries: list[Delivery],
    wall: float,
    stats: list[str],
    cpu: tuple[float, ...],
) -> list[object]:
    """One table row; cut requests count their TTFA as the time at the cut (a lower
    bound) and their last gap up to the cut; RTF is over finished requests only."""
    done = [d for d in deliveries if d.finished]
    cut = [d for d in deliveries if d.cut_s is not None]
    failed = [d for d in deliveries if d.error is not None]
    ttfa = [d.ttfa_s if d.arrivals else d.cut_s for d in deliveries if d.error is None]
    ttfa = [t for t in ttfa if t is not None]
    heard = [d for d in deliveries if d.arrivals]
    gaps = [d.gaps() for d in heard]
    gap_s = [sum(g) for g in gaps]
    rtf = [d.rtf for d in done]
    audio = sum(d.audio_s for d in deliveries)
    status = f"{len(done)}/{len(deliveries)}"
    if cut:
        status += f" ({len(cut)} cut)"
    if failed:
        status += f" ({len(failed)} failed)"
    batch, busy, got = stats

    def ms_at(q: float) -> str:
        return ms(percentile(ttfa, q)) if ttfa else "-"

    return [
        decoder,
        f"{rate:g} ({got})",
        streams,
        status,
        ms_at(50),
        ms_at(90),
        ms_at(99),
        f"{percentile(rtf, 50):.2f} / {percentile(rtf, 90):.2f}" if rtf else "-",
        f"{sum(1 for g in gaps if g)}/{len(gaps)}",
        f"{sum(len(g) for g in gaps)} / {max((len(g) for g in gaps), default=0)}",
        (
            f"{percentile(gap_s, 50):.2f} / {percentile(gap_s, 90):.2f} / {max(gap_s):.2f}"
            if gap_s
            else "-"
        ),
        f"{sum(gap_s):.2f}",
        f"{audio / wall:.1f}",
        f"{batch} / {busy}",
        " / ".join(f"{c / wall:.2f}" for c in cpu),
    ]


GRID_HEADER = [
    "decoder",
    "LLM tokens/s per stream: set (got)",
    "streams",
    "requests done/sent",
    "TTFA p50 (ms)",
    "TTFA p90 (ms)",
    "TTFA p99 (ms)",
    "RTF p50 / p90",
    "responses with underrun",
    "underruns: all / most in one response",
    "underrun s per response p50 / p90 / max",
    "underrun s, all responses",
    "audio s per wall s",
    "decoder: spans per pass / busy",
    "CPU cores: gateway / LLM / client",
]


def grid_cell(
    plan: GridPlan,
    gateway: GatewayServer,
    standin: StandinProcess,
    name: str,
    rate: float,
    streams: int,
) -> tuple[list[object], bool]:
    """Run one cell; its table row, and whether any request was cut at the limit."""
    assert gateway.process is not None
    pids = (gateway.process.pid, standin.pid)
    cpu_before = (tree_cpu_s(pids[0]), tree_cpu_s(pids[1]), time.process_time())
    metrics = gateway_metrics(gateway.url)
    started = time.perf_counter()
    deliveries = asyncio.run(
        _grid_cell(gateway.url, PARAGRAPHS, streams, plan.requests_per_stream, plan.cell_timeout_s)
    )
    wall = time.perf_counter() - started
    cpu_after = (tree_cpu_s(pids[0]), tree_cpu_s(pids[1]), time.process_time())
    stats = decoder_stats(metrics, gateway_metrics(gateway.url), wall)
    cpu = tuple(after - before for after, before in zip(cpu_after, cpu_before, strict=True))
    print(
        f"({name} decoder, {rate:g} tokens/s, {streams} streams: {wall:.1f} s)",
        file=sys.stderr,
        flush=True,
    )
    row = grid_row(name, rate, streams, deliveries, wall, stats, cpu)
    return row, any(d.cut_s is not None for d in deliveries)


def run_grid(plan: GridPlan, folders: dict[str, Path], logs: Path, env: dict[str, str]) -> None:
    texts = PARAGRAPHS
    seconds = [
        sum(max(5, STANDIN_TOKENS_PER_WORD * len(s.split())) for s in split_segments(t)) / 50
        for t in texts
    ]
    print(
        f"\n## Decoder x LLM rate x concurrent streams\n\n"
        f"Stand-in vLLM (separate process): {STANDIN_PREFILL_S * 1000:g} ms prefill, then the "
        f"set tokens/s per stream, {plan.tokens_per_chunk} token(s) per SSE chunk, "
        f"{STANDIN_TOKENS_PER_WORD} semantic tokens per word, no batch limit; '(got)': the "
        "mean rate per segment the gateway measured. Each stream (client) posts "
        f"{plan.requests_per_stream} paragraph(s) back to back ({min(seconds):.1f}-"
        f"{max(seconds):.1f} s of audio each); a cell stops at {plan.cell_timeout_s:g} s, "
        "requests still running then are cut (TTFA of a cut request without audio: the time "
        "at the cut, a lower bound). Underrun: each response played in real time from its "
        f"first byte ({BYTES_PER_SECOND} bytes/s); a gap is each time the player runs dry "
        f"before the end (>= {GAP_FLOOR_S * 1000:g} ms), counted and summed per response "
        "(a stream posts its paragraphs one after another: each is one response). "
        "RTF = response wall time / audio seconds, finished requests only. Decoders on "
        f"{plan.device}, {plan.dtype}, one gateway process each, warmed up first."
    )
    for name in plan.decoders:
        folder = folders[name]
        print(f"- {name}: {folder} ({decoder_parameters(folder) / 1e6:.1f} M decode parameters)")
    rows: list[list[object]] = []
    skipped: list[str] = []
    biggest = max(plan.streams)
    with StandinProcess(
        logs / "standin-grid.log",
        model=STANDIN_MODEL,
        tokens_per_s=max(plan.rates),
        prefill_s=STANDIN_PREFILL_S,
        tokens_per_word=STANDIN_TOKENS_PER_WORD,
        tokens_per_chunk=plan.tokens_per_chunk,
    ) as standin:
        for name in plan.decoders:
            cap = plan.full_max_streams if name == "full" else None
            levels = [n for n in plan.streams if cap is None or n <= cap]
            if len(levels) < len(plan.streams):
                skipped.append(f"{name}: streams > {cap} (--full-max-streams)")
            if not levels:
                continue
            with GatewayServer(
                standin.base_url,
                logs,
                start_timeout_s=300.0,
                MODEL_NAME=STANDIN_MODEL,
                BICODEC_DIR=str(folders[name]),
                DECODER_DEVICE=plan.device,
                DECODER_DTYPE=plan.dtype,
                MAX_CONCURRENT_STREAMS=str(biggest + 8),
                LOG_LEVEL="warning",
                **env,
            ) as gateway:
                assert gateway.process is not None
                try:
                    warm = [split_segments(t)[0] for t in texts]
                    for streams in sorted({1, min(4, max(levels))}):
                        asyncio.run(_grid_cell(gateway.url, warm, streams, 1, 120.0))
                    wait_idle(gateway, standin, 60.0)
                    for rate in plan.rates:
                        standin.control(tokens_per_s=rate)
                        cut_below = None  # fewest streams at this rate that were cut
                        for streams in levels:
                            note = None
                            if cut_below is not None:
                                note = f"skipped: cut at {cut_below} streams"
                            elif plan.deadline is not None and (
                                time.monotonic() + plan.cell_timeout_s > plan.deadline
                            ):
                                note = "skipped: --time-budget spent"
                            if note:
                                rows.append([name, f"{rate:g}", streams, note, *["-"] * 11])
                                continue
                            row, cut = grid_cell(plan, gateway, standin, name, rate, streams)
                            rows.append(row)
                            wait_idle(gateway, standin, min(60.0, plan.cell_timeout_s))
                            if cut:  # more streams at this rate would be cut too
                                cut_below = streams
                except Exception:
                    print(f"\nGateway log tail:\n{gateway.log_tail()}")
                    raise
    table("Time to first audio, real-time factor and underrun", GRID_HEADER, rows)
    if skipped:
        print("\nSkipped: " + "; ".join(skipped) + ".")
