"""The run's JSON report, and its printed tables (``benchmarks/report.py``'s printer)."""

from __future__ import annotations

import re
import statistics
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from report import table  # benchmarks/report.py: the scripts' shared table printer

from .clients import (
    ABANDONED,
    CANCELLED,
    COMPLETED,
    ERROR,
    LOST,
    OUTCOMES,
    SAMPLE_RATE,
    Recorder,
)


@dataclass
class Observations:
    """What the run saw besides the requests, for :func:`build_report`."""

    settings: dict[str, Any]
    llm_description: str
    llm_summary: dict[str, Any]
    upstream_running: int | None  # the LLM's running requests after the clients stopped
    slots_held: int | None  # the gateway's active-streams gauge after the clients stopped
    gateway_alive: bool
    metrics_text: str | None
    log_text: str
    wall_s: float
    memory: dict[str, Any]  # peak_vmhwm, rss_start, rss_end (MiB), rss_timeline
    orphans_peak: int
    orphan_seconds: float
    upstream_kept_s: dict[str, list[float]]
    slow_client_cut_s: dict[str, list[float]]


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
        # uvicorn's line for an exception no route handled: always a gateway bug (the
        # injected decoder failures are handled, and logged as such).
        "unhandled_exceptions": log_text.count("Exception in ASGI application"),
        "error_lines": sum(errors.values()),
        "top_errors": [f"{n} x {text.strip()}" for text, n in errors.most_common(6)],
        "top_exceptions": [f"{n} x {text}" for text, n in exceptions.most_common(6)],
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def build_report(rec: Recorder, seen: Observations) -> dict[str, Any]:
    requests = rec.requests
    for request in requests:
        if not request.outcome:
            request.end(LOST, "never classified")
    outcomes = Counter(r.outcome for r in requests)
    reasons = Counter(r.reason for r in requests if r.outcome == ERROR)
    completed = [r for r in requests if r.outcome == COMPLETED]
    for r in requests:
        if r.expect_error and r.outcome == COMPLETED:
            rec.anomaly(f"{r.client} ({r.kind}): a bad request was answered with audio")
    first_audio = [r.first_audio_s for r in completed if r.first_audio_s is not None]
    audio_s = sum(r.received for r in requests) / 2 / SAMPLE_RATE
    lost = [r for r in requests if r.outcome == LOST]
    by_kind: dict[str, Counter[str]] = {"normal": Counter(), "fault clients": Counter()}
    normal_by_transport: dict[str, Counter[str]] = {}
    for r in requests:
        by_kind["normal" if r.kind == "normal" else "fault clients"][r.outcome] += 1
        if r.kind == "normal":
            normal_by_transport.setdefault(r.transport, Counter())[r.outcome] += 1
    fault_outcomes: dict[str, Counter[str]] = {}
    for r in requests:
        if r.kind != "normal":
            fault_outcomes.setdefault(r.kind, Counter())[r.reason or r.outcome] += 1
    failures = []
    if lost:
        failures.append(f"{len(lost)} requests lost")
    if seen.upstream_running is None:
        failures.append("upstream running count unknown")
    elif seen.upstream_running:
        failures.append(f"{seen.upstream_running} upstream requests left running")
    if seen.slots_held is None:
        failures.append("slots held unknown (no active-streams gauge in /metrics)")
    elif seen.slots_held:
        failures.append(f"{seen.slots_held} gateway stream slots still held")
    if not seen.gateway_alive:
        failures.append("the gateway process died")
    unhandled = gateway_log_problems(seen.log_text)["unhandled_exceptions"]
    if unhandled:
        failures.append(f"{unhandled} exceptions no route handled (gateway log)")
    return {
        "settings": seen.settings,
        "llm": seen.llm_description,
        "wall_s": round(seen.wall_s, 1),
        "requests_started": len(requests),
        "outcomes": {k: outcomes.get(k, 0) for k in OUTCOMES},
        "by_client": {k: {o: v.get(o, 0) for o in OUTCOMES} for k, v in by_kind.items()},
        "normal_by_transport": {
            k: {o: v.get(o, 0) for o in OUTCOMES} for k, v in sorted(normal_by_transport.items())
        },
        "fault_client_outcomes": {
            k: dict(v.most_common()) for k, v in sorted(fault_outcomes.items())
        },
        "requests_by_transport": dict(Counter(r.transport for r in requests)),
        # The designing client: designs answered with valid voices, their candidates,
        # voices saved, and speech in them completed.
        "design_client": {
            step: rec.design_steps.get(step, 0)
            for step in ("designs", "candidates", "saved", "spoken")
        },
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
        "faults_injected": dict(sorted(rec.faults.items())),
        "upstream_running_after": seen.upstream_running,
        "slots_held_after": seen.slots_held,
        "upstream_orphans_peak": seen.orphans_peak,
        "upstream_orphan_seconds": round(seen.orphan_seconds, 1),
        "upstream_kept_after_leaving_before_audio_s": seen.upstream_kept_s,
        "slow_client_cut_after_s": seen.slow_client_cut_s,
        "llm_stats": seen.llm_summary,
        "gateway_alive": seen.gateway_alive,
        "gateway_memory_mib": seen.memory,
        "gateway_metrics": (
            metrics_summary(seen.metrics_text) if seen.metrics_text is not None else None
        ),
        "gateway_log": gateway_log_problems(seen.log_text),
        "anomalies": sorted(Counter(rec.anomalies).items(), key=lambda kv: -kv[1])[:30],
        "failures": failures,
        "ok": not failures,
    }


def _max_per_transport(values: dict[str, list[float]]) -> str:
    return ", ".join(f"{k} {max(v)}" for k, v in values.items()) or "-"


def print_report(report: dict[str, Any]) -> None:
    out = report["outcomes"]
    memory = report["gateway_memory_mib"]
    fa = report["first_audio_s"]
    print(f"\n## Load and fault run ({report['llm']})")
    table(
        "Summary",
        ["", "value"],
        [
            ["requests started", report["requests_started"]],
            ["completed with audio", out[COMPLETED]],
            ["ended with an explicit error", out[ERROR]],
            ["abandoned by fault clients", out[ABANDONED]],
            ["cancelled by the barging client (answered, audio accounted)", out[CANCELLED]],
            ["LOST", out[LOST]],
            ["gateway stream slots held after the run", report["slots_held_after"]],
            ["upstream requests running after the run", report["upstream_running_after"]],
            [
                "upstream orphans during the run (peak / stream-seconds)",
                f"{report['upstream_orphans_peak']} / {report['upstream_orphan_seconds']}",
            ],
            [
                "upstream kept after a client left before audio (max s)",
                _max_per_transport(report["upstream_kept_after_leaving_before_audio_s"]),
            ],
            [
                "stalled reader cut by the gateway after (max s)",
                _max_per_transport(report["slow_client_cut_after_s"]),
            ],
            ["gateway peak RSS (VmHWM)", f"{memory['peak_vmhwm']} MiB"],
            ["gateway RSS start / end", f"{memory['rss_start']} / {memory['rss_end']} MiB"],
            [
                "audio delivered (all / completed)",
                f"{report['audio_seconds_delivered']} s / {report['audio_seconds_completed']} s",
            ],
            ["first audio p50 / p90 (completed)", f"{fa['p50']} s / {fa['p90']} s"],
            [
                "designing client: designs (candidates) / voices saved / spoken in",
                "{designs} ({candidates}) / {saved} / {spoken}".format(**report["design_client"]),
            ],
            ["gateway alive at the end", report["gateway_alive"]],
            ["wall time", f"{report['wall_s']} s"],
        ],
    )
    table(
        "Requests by client",
        ["clients", *OUTCOMES],
        [[k, *v.values()] for k, v in report["by_client"].items()]
        + [[f"normal, {k}", *v.values()] for k, v in report["normal_by_transport"].items()],
    )
    injected = report["faults_injected"]
    table("Faults injected", ["fault", "times"], [list(kv) for kv in injected.items()])
    table(
        "Fault client requests",
        ["fault client request", "outcomes"],
        [
            [k, ", ".join(f"{n} {why}" for why, n in v.items())]
            for k, v in report["fault_client_outcomes"].items()
        ],
    )
    table(
        "Explicit errors",
        ["explicit error", "count"],
        [list(kv) for kv in report["explicit_errors_by_reason"].items()],
    )
    table("LLM", ["LLM", "value"], [list(kv) for kv in report["llm_stats"].items()])
    overload = report.get("overload") or {}
    table(
        "Overload phase (admission on, twice the capacity offered)",
        ["", "value"],
        [[k.replace("_", " "), v] for k, v in overload.items()],
    )
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
