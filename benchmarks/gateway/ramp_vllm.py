"""The ``ramp-vllm`` section: the ramp against the real vLLM CPU server, whose batch
shares its throughput as a GPU's does, and vLLM's priority scheduling measured.

vLLM serves the tiny Spark-format model (a fixed chain of semantic tokens per
sentence). It runs twice: with its default first-come scheduling, then with
``--scheduling-policy priority`` and the gateway's ``LLM_PRIORITY`` (each segment's
priority is its listener's buffer), each time capped at ``MAX_NUM_SEQS`` sequences so
that vLLM has a queue for priority to reorder. The gateway runs with admission on and
off under each; every offered load is one burst of streams, measured at the client as
in the stand-in ramp.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from report import table  # benchmarks/, the script's own folder

from devtools import GOLDEN_BICODEC
from devtools.gateway_server import GatewayServer
from devtools.tiny_spark_lm import write_model
from devtools.vllm_server import VllmServer, vllm_venv_problem
from gateway.ramp import (
    MODES,
    RAMP_HEADER,
    Offered,
    RampPlan,
    capacity_line,
    run_levels,
)

RAMP_VLLM_SECTION = "ramp-vllm"
POLICIES = (("fcfs", "false"), ("priority", "true"))  # vLLM's policy, LLM_PRIORITY


@dataclass
class VllmRampPlan:
    streams: list[int]  # offered loads, each a burst of this many streams
    max_num_seqs: int  # vLLM's cap on sequences at once
    semantic_length: int  # tokens the tiny model writes per sentence
    level_timeout_s: float


def vllm_ramp_plan(args: argparse.Namespace) -> VllmRampPlan:
    return VllmRampPlan(
        streams=args.ramp_vllm_streams or ([2, 6] if args.quick else [2, 4, 8]),
        max_num_seqs=args.ramp_vllm_max_num_seqs,
        semantic_length=args.vllm_semantic_length,
        level_timeout_s=args.ramp_level_timeout,
    )


@contextmanager
def _vllm(model_dir: Path, logs: Path, policy: str, max_num_seqs: int) -> Iterator[VllmServer]:
    extra = {"MAX_NUM_SEQS": str(max_num_seqs)}
    if policy != "fcfs":
        extra["EXTRA_VLLM_ARGS"] = f"--scheduling-policy {policy}"
    server = VllmServer(model_dir, logs / f"vllm-{policy}.log", max_model_len=4096, extra_env=extra)
    print(f"(starting vLLM, {policy} scheduling ...)", file=sys.stderr, flush=True)
    with server:
        yield server


def run_ramp_vllm(plan: VllmRampPlan, logs: Path, env: dict[str, str]) -> None:
    problem = vllm_venv_problem()
    if problem:
        print(f"\n(ramp-vllm skipped: {problem})")
        return
    print(
        f"\n## Admission and vLLM priority against the real vLLM CPU server\n\n"
        f"vLLM CPU serving the tiny Spark-format model ({plan.semantic_length} semantic "
        f"tokens, {plan.semantic_length / 50:g} s of audio, per sentence), MAX_NUM_SEQS="
        f"{plan.max_num_seqs}, started once with first-come scheduling and once with "
        "`--scheduling-policy priority` and the gateway's LLM_PRIORITY=true (a segment's "
        "priority: its listener's buffer, in 100 ms steps). The gateway (small golden "
        "decoder) runs with admission on and off under each; each offered load is one "
        "burst of streams over POST /v1/audio/speech/stream, measured at the client as "
        "in the stand-in ramp. vLLM, the gateway and the clients share the machine's CPU."
    )
    model_dir = write_model(logs / "tiny_spark_lm_ramp", plan.semantic_length)
    rows: list[list[object]] = []
    verdicts: list[str] = []
    measured: list[str] = []
    ramp = RampPlan(0.0, 0.0, plan.streams, arrival_s=0.5, level_timeout_s=plan.level_timeout_s)
    for policy, priority in POLICIES:
        with _vllm(model_dir, logs, policy, plan.max_num_seqs) as vllm:
            for mode, flag in MODES:
                label = f"{mode}, {policy}"
                with GatewayServer(
                    vllm.base_url,
                    logs,
                    MODEL_NAME=vllm.served_model_name,
                    BICODEC_DIR=str(GOLDEN_BICODEC),
                    ADMISSION_CONTROL=flag,
                    LLM_PRIORITY=priority,
                    MAX_CONCURRENT_STREAMS="64",
                    LOG_LEVEL="warning",
                    **env,
                ) as gateway:
                    # vLLM's stats are not read here: a short pause lets the last
                    # streams' upstream requests end.
                    levels = run_levels(
                        gateway, ramp, label, rows, settle=lambda _: time.sleep(2.0)
                    )
                    measured.append(capacity_line(label, gateway.url))
                    verdicts.append(_verdict(label, levels))
    table("Offered streams vs. admitted, refused and underrun (real vLLM CPU)", RAMP_HEADER, rows)
    print()
    print("\n".join(measured + verdicts))


def _verdict(label: str, levels: list[list[Offered]]) -> str:
    """The stand-in's verdict without an ideal (vLLM's ceiling is what it measures)."""
    admitted = [r for level in levels for r in level if r.admitted]
    underran = sum(1 for r in admitted if r.stalls)
    return f"- {label}: {underran} of {len(admitted)} admitted streams underran."
