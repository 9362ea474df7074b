"""The short load and fault run (``benchmarks/load_fault_run.py``) end to end.

Four clients for 20 s against a real gateway process and the stand-in LLM, with
every fault kind injected at least once, one LLM restart and one LLM outage: no
request may be lost, no upstream request left running, and every bad message must
get an explicit error.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "load_fault_run.py"
# The faults added with the slow-client deadline, the decoder fault and the request limits.
NEW_FAULTS = (
    "http_stalled_reader",
    "ws_stalled_reader",
    "decoder_failure",
    "markup_in_text",
    "oversized_body",
    "surrogate_text",
    "ws_nested_json",
    "ws_foreign_origin",
)


def load_faults(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """``benchmarks/load_fault/faults.py``, imported as the script imports it."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    return importlib.import_module("load_fault.faults")


def test_short_load_fault_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = load_faults(monkeypatch)
    report_path = tmp_path / "report.json"
    command = [
        sys.executable,
        str(SCRIPT),
        *("--duration", "20", "--clients", "4", "--seed", "7"),
        *("--llm-restarts", "1", "--llm-outages", "1", "--never-read-s", "8"),
        *("--request-timeout", "20", "--json", str(report_path)),
        *("--log-dir", str(tmp_path / "logs")),
        # Underruns are timing, which a shared CI machine cannot promise: the phase
        # reports them, bench_gateway.py's ramp judges them.
        "--overload-allow-underruns",
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=200)
    output = done.stdout + done.stderr
    assert report_path.exists(), output
    report = json.loads(report_path.read_text())

    outcomes = report["outcomes"]
    assert outcomes["lost"] == 0, (report["lost_requests"], output)
    assert report["upstream_running_after"] == 0, output
    assert report["slots_held_after"] == 0, output
    assert report["gateway_alive"], output
    assert report["gateway_log"]["unhandled_exceptions"] == 0, output
    assert done.returncode == 0, output

    expected = {*script.CLIENT_FAULTS, *script.INBAND_FAULTS, *script.LLM_FAULTS}
    assert expected >= set(NEW_FAULTS)
    injected = report["faults_injected"]
    assert {kind for kind, n in injected.items() if n >= 1} >= expected, injected

    assert sum(outcomes.values()) == report["requests_started"]
    assert outcomes["completed"] > 0
    assert outcomes["explicit_error"] > 0
    assert outcomes["abandoned"] > 0
    assert report["by_client"]["normal"]["completed"] > 0
    # Every kind of normal client got audio: HTTP, WebSocket, streaming text in, speech
    # in voices cloned for it (uploaded, spoken, deleted), and in voices designed for it
    # (designed, saved, spoken, deleted).
    for transport in ("http", "ws", "textin", "voices", "design"):
        assert report["normal_by_transport"][transport]["completed"] > 0, transport
    # A design answered 200 held valid voices with previews (else it is LOST).
    design = report["design_client"]
    assert design["designs"] > 0 and design["candidates"] == 2 * design["designs"], design
    assert design["saved"] > 0 and design["spoken"] > 0, design
    # The barging client cut utterances off on both sockets, each cancel answered with
    # exactly the audio it had received (anything else is LOST, or an anomaly).
    assert report["normal_by_transport"]["barge"]["cancelled"] > 0, report["normal_by_transport"]
    assert report["audio_seconds_completed"] > 0
    # Every malformed or oversized message got an explicit error, and WS connections
    # that got an error frame still served the next request.
    assert report["anomalies"] == [], report["anomalies"]
    for kind in ("ws_invalid_json", "ws_binary_frame", "ws_unknown_voice", "http_invalid_json"):
        outcomes_of_kind = report["fault_client_outcomes"][kind]
        assert set(outcomes_of_kind) <= set(report["explicit_errors_by_reason"]), outcomes_of_kind
    assert report["gateway_memory_mib"]["peak_vmhwm"] > 0
    assert "| LOST | 0 |" in done.stdout

    # The overload phase: twice the capacity offered to a gateway with admission on.
    # Some streams were admitted, the rest refused explicitly, none lost.
    overload = report["overload"]
    assert overload["offered"] == 2 * overload["ideal_streams"], overload
    assert 0 < overload["admitted"] < overload["offered"], overload
    assert (
        overload["refused"] + overload["admitted"] + overload["explicit_errors"]
        >= (overload["offered"])
    ), overload
    assert overload["lost"] == 0, overload
    assert "admitted with underrun" in done.stdout
