"""The overload phase: streams offered at twice what the LLM keeps in real time.

After the load with its faults, a gateway with admission by measured capacity on
(``ADMISSION_CONTROL=true``, the default) faces a stand-in whose tokens/s are shared
by all its streams (a GPU's batch) and a burst of twice the streams that ceiling
keeps in real time. Each stream is measured at the client, as the ramp of
``bench_gateway.py`` does: admitted streams must play without an underrun, the
others must be refused explicitly (429 with Retry-After), and none may be lost (no
answer, a hang past the time limit).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.ramp import REAL_TIME_TOKENS_PER_S, Offered, RampPlan, offer_burst

from devtools.gateway_server import GatewayServer

from .llm import StandinLLM


@dataclass(frozen=True)
class OverloadPlan:
    ceiling_tokens_per_s: float = 300.0  # the stand-in's total over all its streams
    load_factor: float = 2.0  # offered streams over the ideal number
    arrival_s: float = 0.5  # the burst's arrivals are spread over this long
    timeout_s: float = 60.0  # a stream still running then is lost

    @property
    def ideal_streams(self) -> float:
        return self.ceiling_tokens_per_s / REAL_TIME_TOKENS_PER_S

    @property
    def offered(self) -> int:
        return round(self.load_factor * self.ideal_streams)


def run_overload(
    llm: StandinLLM, log_dir: Path, env: dict[str, str], plan: OverloadPlan
) -> dict[str, Any]:
    """The phase's report: what was offered, admitted, refused, underran and lost."""
    if not llm.control(total_tokens_per_s=plan.ceiling_tokens_per_s):
        return {"skipped": "the stand-in did not take a token ceiling"}
    try:
        with GatewayServer(
            llm.base_url, log_dir, **{**env, "ADMISSION_CONTROL": "true"}
        ) as gateway:
            ramp = RampPlan(
                total_tokens_per_s=plan.ceiling_tokens_per_s,
                tokens_per_s=llm.tokens_per_s,
                streams=[plan.offered],
                arrival_s=plan.arrival_s,
                level_timeout_s=plan.timeout_s,
            )
            # One stream first: the capacity model's first measurement.
            asyncio.run(offer_burst(gateway.url, ramp, 1))
            results = asyncio.run(offer_burst(gateway.url, ramp, plan.offered))
    finally:
        llm.control(total_tokens_per_s=None)
    return summarize(plan, results)


def summarize(plan: OverloadPlan, results: list[Offered]) -> dict[str, Any]:
    admitted = [r for r in results if r.admitted]
    underran = [r for r in admitted if r.stalls]
    # Lost: no audio answer, no refusal and no error the client could tell, or cut at
    # the time limit while it still ran.
    lost = [
        r
        for r in results
        if r.delivery.cut_s is not None
        or not (r.refused or r.delivery.error or r.delivery.finished)
    ]
    return {
        "ceiling_tokens_per_s": plan.ceiling_tokens_per_s,
        "ideal_streams": plan.ideal_streams,
        "offered": len(results),
        "admitted": len(admitted),
        "refused": sum(1 for r in results if r.refused is not None),
        "explicit_errors": sum(1 for r in results if r.delivery.error is not None),
        "admitted_with_underrun": len(underran),
        "worst_underrun_s": round(max((sum(r.stalls) for r in admitted), default=0.0), 3),
        "lost": len(lost),
    }
