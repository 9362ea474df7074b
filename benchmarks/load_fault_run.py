"""Load and fault run: the gateway under concurrent clients while things go wrong.

    .venv/bin/python benchmarks/load_fault_run.py [--duration 60] [--clients 8]
        [--llm standin|vllm] [--llm-restarts N] [--llm-outages N] [--seed S]
        [--slow-client-timeout 3] [--json PATH] [--log-dir DIR]

Everything runs on loopback (127.0.0.1) and stops by itself. By default it starts
its own LLM, the vLLM wire-format stand-in (``devtools.standin_llm``)
as a subprocess on a fixed port at a GPU-like rate (200 tokens/s per stream), and
its own gateway process pointed at it: ``python -m
devtools.faulty_gateway``, the gateway whose decoder fails for the
test voice ``decoder_fault``, with the golden-small BiCodec decoder,
``SLOW_CLIENT_TIMEOUT_S`` of ``--slow-client-timeout`` (3 s) and
``CORS_ALLOW_ORIGINS`` one test origin. ``--llm vllm`` uses the real vLLM CPU
server on the tiny Spark-format model instead (about 60 s to start; LLM restarts
and outages are then off unless asked for, as each one costs another start).

For ``--duration`` seconds, ``--clients`` clients (a quarter voice agents writing
their text in fragments over the streaming-text WebSocket, one cloning voices
(upload, speak in the voice, delete); of the rest, half on the WebSocket, half
HTTP), and two more, a barging voice agent (each utterance, on the streaming-text and
the seed WebSocket in turn, cancelled a few audio frames in) and a voice designer
(two candidates designed for random style labels, one saved as a voice, spoken in
over HTTP, deleted: the gateway runs with ``VOICE_DESIGN=on``, so voices with tokens
get the base model's prompt), loop over requests with short random texts and voices
(seeded), while fault clients and LLM faults are injected on a seeded schedule
(``benchmarks/load_fault/``):

* a client that disconnects mid-stream (HTTP, WS: a close frame, or a dropped TCP
  connection), one that leaves before its first audio (while the stand-in stalls
  that one request), one that never reads (a huge request whose audio it never
  reads, for a long time, then gone), and a stalled reader (a tiny receive window,
  connection kept open), which the gateway must end as ``slow_client`` within
  SLOW_CLIENT_TIMEOUT_S + 15 s (the audio that fills the socket buffers first takes time);
* malformed and oversized messages (invalid JSON and binary WS frames, ~6 kB of
  nested brackets while a speech is in progress, an unknown voice, 2 MB and 192 kB
  WS text frames, HTTP bodies that are not JSON, over the text limit or over
  MAX_REQUEST_BODY_BYTES (413, with a Content-Length and chunked), Spark prompt
  markup or a lone surrogate in the text); a WS connection that got an error frame
  must stay usable, so a valid request follows on it; a WS handshake from a foreign
  Origin (403); 12 WS messages sent at once (more than the gateway queues), each of
  which must get its own ``end`` or ``error``;
* a decoder that fails (an injected CUDA out-of-memory for one voice): 500
  ``decoder_error`` over HTTP, an SSE ``error`` event, a WS error frame;
* the LLM restarted (stopped, back on the same port ~2 s later), unreachable for a
  while (killed, back after ~5 s), and in-band stream faults of the stand-in
  (``POST /control`` with ``fault_requests: 1`` and ``error_after_tokens``,
  ``drop_after_tokens``, or a stall 5 s longer than the gateway's ``LLM_TIMEOUT_S``,
  which the run sets to ``--llm-timeout``, 10 s).

Every request a client starts ends in one of five classes: completed with audio
(the whole stream, of the length the LLM was asked to write), an explicit error the
client can tell (an HTTP error status with a JSON error, an HTTP body cut off
mid-stream, a WS error frame or an SSE error event, a WS close or a refused
connection), abandoned on purpose by a fault client, cancelled by the barging
client (its answer came and says exactly how much audio was sent), or LOST: none of
these (a hang past the per-request timeout, a stream that ended cleanly but short,
an ``end`` whose sample count is not what was sent, a cancel's answer that does not
match the audio received, a design answered 200 whose candidates are not 32 global
tokens in 0..4095 each with a WAV preview of the asked-for length). During the run,
upstream streams beyond
what the live client requests account for (orphans: kept after their client went)
are tracked from the LLM's running count. After the clients stop, the LLM must have
no request left running and the gateway no stream slot held (``/metrics``), and the
gateway's memory (VmHWM, VmRSS) is read. The exit status is 1 when a request was
lost, an upstream request was left running, a slot stayed held, or the gateway
died; 0 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import tempfile
from pathlib import Path

from load_fault.faults import CLIENT_FAULTS, INBAND_FAULTS
from load_fault.report import print_report
from load_fault.run import run

from decoder_gateway.settings import MIN_SLOW_CLIENT_TIMEOUT_S


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--clients", type=int, default=8, help="normal clients, half WS")
    parser.add_argument("--llm", choices=["standin", "vllm"], default="standin")
    parser.add_argument("--tokens-per-s", type=float, default=200.0, help="stand-in rate")
    parser.add_argument("--prefill-s", type=float, default=0.02, help="stand-in prefill")
    parser.add_argument(
        "--llm-restarts", type=int, default=None, help="LLM restarts (stand-in 1, vLLM 0)"
    )
    parser.add_argument(
        "--llm-outages", type=int, default=None, help="LLM down windows (stand-in 1, vLLM 0)"
    )
    parser.add_argument("--restart-down-s", type=float, default=2.0)
    parser.add_argument("--outage-down-s", type=float, default=5.0)
    parser.add_argument("--fault-interval", type=float, default=2.0, help="mean s between faults")
    parser.add_argument("--never-read-s", type=float, default=30.0, help="never-read hold time")
    parser.add_argument("--request-timeout", type=float, default=60.0)
    parser.add_argument("--settle-s", type=float, default=3.0, help="wait after the clients")
    parser.add_argument(
        "--llm-timeout",
        type=float,
        default=10.0,
        help="the gateway's LLM_TIMEOUT_S; stalled streams (llm_stall) hang 5 s longer",
    )
    parser.add_argument(
        "--slow-client-timeout",
        type=float,
        default=3.0,
        help="the gateway's SLOW_CLIENT_TIMEOUT_S (below --llm-timeout); a stalled reader "
        "must be cut within it + 15 s",
    )
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--no-faults", action="store_true", help="load only, for a baseline")
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated client / in-band fault kinds to inject (default: all of "
        + ", ".join(CLIENT_FAULTS + INBAND_FAULTS)
        + ")",
    )
    parser.add_argument(
        "--overload-factor",
        type=float,
        default=2.0,
        help="overload phase: offered streams over the ideal number (0: no phase)",
    )
    parser.add_argument(
        "--overload-allow-underruns",
        action="store_true",
        help="report the overload phase's underruns without failing the run on them",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    parser.add_argument("--log-dir", type=Path, default=None, help="keep server logs here")
    parser.add_argument(
        "--gateway-root",
        type=Path,
        default=None,
        help="run the gateway package from this checkout instead of this one",
    )
    args = parser.parse_args(argv)
    if args.clients < 1 or args.duration <= 0:
        parser.error("--clients must be >= 1 and --duration > 0")
    if not MIN_SLOW_CLIENT_TIMEOUT_S <= args.slow_client_timeout < args.llm_timeout:
        parser.error(
            f"--slow-client-timeout must be at least {MIN_SLOW_CLIENT_TIMEOUT_S:g} s "
            "(the gateway's minimum) and below --llm-timeout"
        )
    unknown = set(filter(None, args.only.split(","))) - set(CLIENT_FAULTS + INBAND_FAULTS)
    if unknown:
        parser.error(f"unknown fault kinds: {', '.join(sorted(unknown))}")
    default_llm_faults = 1 if args.llm == "standin" and not args.no_faults else 0
    if args.llm_restarts is None:
        args.llm_restarts = default_llm_faults
    if args.llm_outages is None:
        args.llm_outages = default_llm_faults
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with contextlib.ExitStack() as stack:
        if args.log_dir is not None:
            log_dir = args.log_dir
            log_dir.mkdir(parents=True, exist_ok=True)
        else:
            log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lfr-")))
        previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            report = run(args, log_dir)
        finally:
            signal.signal(signal.SIGTERM, previous)
    print_report(report)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
