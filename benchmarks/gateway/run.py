"""One benchmark run from its parsed flags: the header, the grid, the sections behind
each LLM, then the ramp, all in one temporary folder for the servers' logs."""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import tempfile
import time
from pathlib import Path

import httpx
import torch

from decoder_gateway.settings import Settings
from decoder_gateway.text import split_segments
from devtools import GOLDEN_BICODEC
from devtools.gateway_server import GatewayServer
from gateway.cancel import CANCEL_SECTION, cancel_plan, run_cancel
from gateway.compare import run_compare
from gateway.decoder import Decoder, describe_decoder, full_size_decoder, load_decoder
from gateway.grid import GRID_SECTION, GridPlan, run_grid
from gateway.llms import Llm, standin_llm, vllm_llm
from gateway.load import load_level, run_load
from gateway.ramp import RAMP_SECTION, ramp_plan, run_ramp
from gateway.ramp_vllm import RAMP_VLLM_SECTION, run_ramp_vllm, vllm_ramp_plan
from gateway.text_in import run_text_in
from gateway.workload import PARAGRAPHS, TEMPERATURE, VOICE, Plan

SECTIONS = [
    GRID_SECTION,
    "load",
    "compare",
    "text-in",
    RAMP_SECTION,
    RAMP_VLLM_SECTION,
    CANCEL_SECTION,
]


def run_llm(
    llm: Llm,
    decoder_dir: Path,
    decoder: Decoder,
    plan: Plan,
    texts: list[str],
    logs: Path,
    env: dict[str, str],
    sections: list[str],
) -> None:
    print(f"\n## {llm.name}\n\n{llm.description}.")
    words = [len(t.split()) for t in texts]
    seconds = [sum(llm.tokens_per_sentence(s) for s in split_segments(t)) / 50 for t in texts]
    print(
        f"Client paragraphs: {len(texts)} different ones, {min(words)}-{max(words)} words, "
        f"{min(seconds):.1f}-{max(seconds):.1f} s of audio each."
    )
    with GatewayServer(
        llm.base_url,
        logs,
        MODEL_NAME=llm.model,
        BICODEC_DIR=str(decoder_dir),
        LOG_LEVEL="warning",
        **env,
    ) as gateway:
        try:
            asyncio.run(load_level(gateway.url, texts, 1, 1))  # warm-up
            if "load" in sections:
                run_load(llm, gateway, plan, texts)
            if "compare" in sections:
                run_compare(llm, gateway, decoder, plan)
            if "text-in" in sections:
                run_text_in(llm, gateway, plan)
        except Exception:
            print(f"\nGateway log tail:\n{gateway.log_tail()}")
            raise


def print_header(quick: bool) -> None:
    """The machine, the versions and the gateway's defaults, before any table."""
    settings = Settings()
    cores = len(os.sched_getaffinity(0))
    load1, load5, _ = os.getloadavg()
    print("# Gateway benchmark" + (" (quick)" if quick else ""))
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    print(
        f"\nMachine: {platform.machine()}, {cores} usable cores ({os.cpu_count()} online), "
        f"load average {load1:.2f} / {load5:.2f} at start{gpu}; Python "
        f"{platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} "
        f"decoder threads), httpx {httpx.__version__}."
    )
    print(
        f"Gateway: its own process (uvicorn), defaults: segment_lookahead "
        f"{settings.segment_lookahead}, first chunk {settings.stream_first_chunk_tokens} + "
        f"{settings.stream_first_lookahead_tokens} look-ahead tokens, assumed speed-up "
        f"{settings.stream_assumed_speedup:g}, decoder batch <= {settings.decoder_max_batch} "
        f"spans. Requests: voice {VOICE}, temperature {TEMPERATURE}. Clients: httpx.AsyncClient "
        "in this process, reading as fast as audio comes (TTFA = request sent -> first PCM byte; "
        "RTF = response wall time / audio seconds). All processes share the same cores."
    )


def run(args: argparse.Namespace, sections: list[str], plan: GridPlan | None) -> None:
    """Every section of ``sections``; ``plan``: the grid's, when it is one of them."""
    gateway_env = {}
    if args.decoder_threads:
        torch.set_num_threads(args.decoder_threads)
        gateway_env["OMP_NUM_THREADS"] = str(args.decoder_threads)
        gateway_env["DECODER_THREADS"] = str(args.decoder_threads)
    print_header(args.quick)

    if args.quick:
        standin_plan = Plan([(1, 2), (4, 1), (16, 1)], compare_repeats=2)
        vllm_plan = Plan([(1, 2), (4, 1)], compare_repeats=2)
    else:
        standin_plan = Plan([(1, 5), (4, 3), (16, 2)], compare_repeats=5)
        vllm_plan = Plan([(1, 3), (4, 2), (16, 1)], compare_repeats=3)
    # The tiny vLLM's sentences are all the same length; two per paragraph keeps it short.
    vllm_texts = [" ".join(split_segments(p)[:2]) for p in PARAGRAPHS]
    own_servers = (GRID_SECTION, RAMP_SECTION, RAMP_VLLM_SECTION, CANCEL_SECTION)
    classic = [name for name in sections if name not in own_servers]

    with tempfile.TemporaryDirectory(prefix="bench_gateway_") as tmp:
        logs = args.log_dir or Path(tmp)
        logs.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        if plan is not None:
            folders = {"small": GOLDEN_BICODEC}
            if "full" in plan.decoders:
                folders["full"] = full_size_decoder(args.full_dir, Path(tmp))
            run_grid(plan, folders, logs, gateway_env)
        if classic:
            decoder = load_decoder(args.bicodec_dir)
            print(
                f"\nDecoder (gateway and baseline) of the sections below: "
                f"{describe_decoder(args.bicodec_dir, decoder)}."
            )
            if args.llm in ("standin", "both"):
                with standin_llm(logs) as llm:
                    run_llm(
                        llm,
                        args.bicodec_dir,
                        decoder,
                        standin_plan,
                        PARAGRAPHS,
                        logs,
                        gateway_env,
                        classic,
                    )
            if args.llm in ("vllm", "both"):
                with vllm_llm(logs, args.vllm_semantic_length) as llm:
                    run_llm(
                        llm,
                        args.bicodec_dir,
                        decoder,
                        vllm_plan,
                        vllm_texts,
                        logs,
                        gateway_env,
                        classic,
                    )
        if RAMP_SECTION in sections:
            run_ramp(ramp_plan(args), logs, gateway_env)
        if RAMP_VLLM_SECTION in sections:
            run_ramp_vllm(vllm_ramp_plan(args), logs, gateway_env)
        if CANCEL_SECTION in sections:
            run_cancel(cancel_plan(args), logs, gateway_env)
        print(f"\n(benchmark ran {time.perf_counter() - started:.0f} s)")
