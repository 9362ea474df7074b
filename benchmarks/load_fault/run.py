"""One load and fault run: the LLM and the gateway started, the clients and the fault
schedule run, the upstream watched, memory sampled, and the report built."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import re
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from decoder_gateway.client import ClientError, GatewayClient
from devtools.gateway_server import GatewayServer
from devtools.paths import GOLDEN_SPEAKER

from .clients import (
    SEGMENT_LOOKAHEAD,
    RunSettings,
    Texts,
    active_streams,
    read_metrics_async,
)
from .faults import (
    ALLOWED_ORIGIN,
    CLIENT_FAULTS,
    FAULTY_GATEWAY_FAULTS,
    INBAND_FAULTS,
    Faults,
)
from .llm import LLM, StandinLLM, VllmLLM
from .overload import OverloadPlan, run_overload
from .report import Observations, build_report


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

    def summary(self) -> dict[str, Any]:
        """The report's ``gateway_memory_mib``."""
        return {
            "peak_vmhwm": round(self.peak_hwm_kb / 1024, 1),
            "rss_start": round(self.first_rss_kb / 1024, 1),
            "rss_end": round(self.last_rss_kb / 1024, 1),
            "rss_timeline": self.timeline,
        }


class Run(Faults):
    """The clients, the fault schedule, and what they saw."""

    def __init__(
        self, settings: RunSettings, gateway: GatewayServer, llm: LLM, kinds: tuple[str, ...]
    ) -> None:
        super().__init__(settings, gateway.url, gateway.port, llm)
        self.kinds = kinds  # the client and in-band fault kinds this run can inject
        self.rng = random.Random(settings.seed)
        self.fault_tasks: set[asyncio.Task[None]] = set()
        self.orphans_peak = 0  # upstream streams no live client request accounts for
        self.orphan_seconds = 0.0  # ... summed over time (stream-seconds)
        self.clients_done = False

    def schedule(self) -> list[tuple[float, str]]:
        """(seconds after the start, fault kind), seeded.

        Every client and in-band fault once in the first 70% of the run, in a shuffled
        order, then more at random every ~``fault_interval_s`` until 90% of it; LLM
        restarts and outages spread over the middle of the run.
        """
        duration = self.s.duration_s
        if not self.s.faults:
            return []
        kinds = [k for k in self.kinds if not self.s.only or k in self.s.only]
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
        # A quarter are voice agents streaming text in, one (from 4 clients on) clones
        # voices; of the rest, half WebSocket, half HTTP.
        text_in_count = self.s.clients // 4
        library_count = 1 if self.s.clients >= 4 else 0
        ws_count = (self.s.clients - text_in_count - library_count + 1) // 2
        http_count = self.s.clients - text_in_count - library_count - ws_count
        clients = [self.text_in_client(i) for i in range(text_in_count)]
        clients += [self.voice_library_client(i) for i in range(library_count)]
        clients += [self.ws_client(i) for i in range(ws_count)]
        clients += [self.http_client(i) for i in range(http_count)]
        clients.append(self.barging_client(0))  # one more: a voice agent talked over
        clients.append(self.design_client(0))  # and one designing voices (VOICE_DESIGN)
        watcher = asyncio.create_task(self.watch_upstream())
        try:
            await asyncio.gather(self.run_faults(started), *clients)
            if self.fault_tasks:
                await asyncio.wait(set(self.fault_tasks))
        finally:
            self.clients_done = True
            await watcher


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
    return asyncio.run(read_metrics_async(url))


def wait_slots_free(url: str, patience_s: float = 10.0) -> tuple[int | None, str | None]:
    """The gateway's active streams, polled until 0 for up to ``patience_s``, and the
    last ``/metrics`` text."""
    deadline = time.monotonic() + patience_s
    while True:
        text = read_metrics(url)
        held = None if text is None else active_streams(text)
        if held == 0 or time.monotonic() > deadline:
            return held, text
        time.sleep(0.25)


def warm_up(gateway: GatewayServer) -> None:
    asyncio.run(_warm_up(gateway.url))


async def _warm_up(url: str) -> None:
    async with GatewayClient(url, timeout_s=60) as client:
        try:
            async with client.speech_stream("Good morning friend.") as response:
                async for _ in response.chunks():
                    pass
        except ClientError as err:
            raise RuntimeError(f"warm-up request failed: {err}") from err


def settings_from_args(args: argparse.Namespace) -> RunSettings:
    return RunSettings(
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
        slow_client_timeout_s=args.slow_client_timeout,
        faults=not args.no_faults,
        only=tuple(k for k in args.only.split(",") if k),
    )


def run(args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    """Start the LLM and the gateway, run the load with its faults, return the report."""
    settings = settings_from_args(args)
    llm: LLM
    if args.llm == "standin":
        llm = StandinLLM(log_dir, args.tokens_per_s, args.prefill_s)
    else:
        llm = VllmLLM(log_dir)
    env = {
        # The golden decoder with a speaker encoder: the library client clones voices.
        "BICODEC_DIR": str(GOLDEN_SPEAKER),
        "MODEL_NAME": llm.model,
        "SEGMENT_LOOKAHEAD": str(SEGMENT_LOOKAHEAD),
        "LLM_TIMEOUT_S": str(args.llm_timeout),
        "SLOW_CLIENT_TIMEOUT_S": str(args.slow_client_timeout),
        "CORS_ALLOW_ORIGINS": ALLOWED_ORIGIN,
        # Each fault expects its own error; a refusal for capacity would stand in for
        # it. Admission under overload is measured by bench_gateway.py --only ramp.
        "ADMISSION_CONTROL": "false",
        # The designing client designs voices; voices with tokens (packaged, cloned,
        # designed) are then prompted with the base model's prompt (no speaker id).
        "VOICE_DESIGN": "on",
    }
    # The decoder fault needs devtools.faulty_gateway in the gateway's tree.
    faulty = True
    if args.gateway_root is not None:  # import the package from there, not from cwd
        env.update(PYTHONPATH=str(args.gateway_root.resolve()), PYTHONSAFEPATH="1")
        module = args.gateway_root / "devtools" / "faulty_gateway.py"
        faulty = module.exists()
    kinds = CLIENT_FAULTS if faulty else tuple(set(CLIENT_FAULTS) - set(FAULTY_GATEWAY_FAULTS))
    if llm.supports_control:
        kinds += INBAND_FAULTS
    print(f"starting the LLM ({args.llm}) and the gateway; logs in {log_dir}", flush=True)
    llm.start()
    try:
        with GatewayServer(llm.base_url, log_dir, faulty=faulty, **env) as gateway:
            assert gateway.pid is not None
            warm_up(gateway)
            memory = MemorySampler(gateway.pid)
            memory.start()
            load = Run(settings, gateway, llm, tuple(sorted(kinds, key=_kind_order)))
            print(
                f"running {settings.clients} clients for {settings.duration_s:g} s "
                f"{'with' if settings.faults else 'without'} faults (seed {settings.seed}) ...",
                flush=True,
            )
            began = time.monotonic()
            hard_limit = settings.duration_s + settings.request_timeout_s + settings.never_read_s
            try:
                asyncio.run(asyncio.wait_for(load.main(), hard_limit + 30))
            except TimeoutError:
                load.rec.anomaly("the run passed its hard time limit; clients were cancelled")
            if llm.running_requests() is None:  # a restart left it down: bring it back
                with contextlib.suppress(Exception):
                    llm.start()
            upstream_running = wait_upstream_idle(llm, settings.settle_s)
            alive = gateway.running()
            slots_held, metrics = wait_slots_free(gateway.url) if alive else (None, None)
            wall_s = time.monotonic() - began
            memory.stop()
            seen = Observations(
                settings=asdict(settings),
                llm_description=llm.description,
                llm_summary=llm.summary(),
                upstream_running=upstream_running,
                slots_held=slots_held,
                gateway_alive=alive,
                metrics_text=metrics,
                log_text=gateway.log_text(),
                wall_s=wall_s,
                memory=memory.summary(),
                orphans_peak=load.orphans_peak,
                orphan_seconds=load.orphan_seconds,
                upstream_kept_s=load.upstream_kept_s,
                slow_client_cut_s=load.slow_client_cut_s,
            )
            report = build_report(load.rec, seen)
        report["overload"] = overload_phase(args, llm, log_dir, env)
        failures = report["failures"]
        overload = report["overload"]
        if overload.get("lost"):
            failures.append(f"{overload['lost']} requests lost in the overload phase")
        if overload.get("admitted_with_underrun") and not args.overload_allow_underruns:
            failures.append(
                f"{overload['admitted_with_underrun']} admitted streams underran in the "
                "overload phase"
            )
        report["ok"] = not failures
        return report
    finally:
        llm.stop(graceful=False)


def overload_phase(
    args: argparse.Namespace, llm: LLM, log_dir: Path, env: dict[str, str]
) -> dict[str, Any]:
    """Twice the capacity offered to a gateway with admission on (the stand-in only:
    it has a token ceiling to share; the real vLLM's would have to be measured)."""
    if args.overload_factor <= 0:
        return {"skipped": "--overload-factor 0"}
    if not isinstance(llm, StandinLLM):
        return {"skipped": "the real vLLM has no ceiling to set; see bench_gateway.py ramp"}
    if llm.running_requests() is None:  # a restart left it down: bring it back
        llm.start()
    plan = OverloadPlan(load_factor=args.overload_factor)
    print(
        f"overload phase: {plan.offered} streams offered over {plan.arrival_s:g} s to a "
        f"gateway with admission on, LLM ceiling {plan.ceiling_tokens_per_s:g} tokens/s "
        f"({plan.ideal_streams:g} real-time streams) ...",
        flush=True,
    )
    return run_overload(llm, log_dir, env, plan)


def _kind_order(kind: str) -> int:
    """Fault kinds in the order of their lists (the schedule shuffles them, seeded)."""
    return (CLIENT_FAULTS + INBAND_FAULTS).index(kind)
