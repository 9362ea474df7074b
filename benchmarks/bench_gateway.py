"""End-to-end gateway benchmark: time to first audio, real-time factor, underrun.

    .venv/bin/python benchmarks/bench_gateway.py [--quick]
        [--only grid,load,compare,text-in,ramp,ramp-vllm]
        [--llm standin|vllm|both] [--bicodec-dir DIR]
        [--decoders small,full] [--rates 100,200,400] [--streams 1,4,16,64]
        [--requests-per-stream N] [--cell-timeout S] [--full-max-streams N]
        [--full-dir DIR] [--device cpu|cuda] [--decoder-dtype float32|bfloat16|float16]
        [--tokens-per-chunk N] [--time-budget S]
        [--ramp-total-tokens-per-s R] [--ramp-tokens-per-s R] [--ramp-streams 3,6,12,24]
        [--ramp-level-timeout S] [--ramp-vllm-streams 2,4,8] [--ramp-vllm-max-num-seqs N]
        [--cancels N] [--cancel-barging-clients N] [--cancel-load-clients N]
        [--cancel-tokens-per-s R]

Everything runs as separate processes on this machine, as in a deployment: the LLM
(the vLLM wire-format stand-in at a GPU-like token rate, and/or the real vLLM CPU
server on a tiny deterministic Spark-format model), the gateway (``python -m
decoder_gateway``), and this script as the HTTP client. Prints markdown tables:

* ``grid``, one table: decoder (the small golden test BiCodec, and the
  released full-size architecture with random weights, built as bench_decoder.py
  builds it) x stand-in token rate per stream x concurrent streams. Per cell: time
  to first audio p50/p90/p99, real-time factor, and audio underrun: each response
  played in real time from its first byte (32000 bytes/s), the number of gaps and
  their total length per stream (vLLM-Omni's TTS benchmark measure), over all
  streams. Each cell runs a fixed number of requests per stream and stops at
  ``--cell-timeout``; requests still running are cut (and counted as such), and a
  rate whose cell was cut skips its larger concurrency. Full run: 2 decoders x
  100/200/400 tokens/s x 1/4/16/64 streams, 2 requests per stream (on 2 CPU cores
  about half an hour, most of it cells that hit the limit: the full-size decoder
  cannot keep up with many streams on a CPU); ``--quick``: 200 tokens/s, 1 and 4
  streams, the full decoder at 1 stream only (about 2 minutes).
* ``load``: N concurrent clients, each posting 2-3 sentence paragraphs to
  ``POST /v1/audio/speech/stream`` back to back; time to first audio (TTFA:
  request sent -> first PCM byte), real-time factor (response wall time / audio
  duration), aggregate audio seconds per wall second, CPU use per process and,
  from the gateway's ``/metrics`` where it has one, spans per decoder pass, the
  share of the wall time the decoder was busy, and vLLM's token rate per segment.
* ``compare``: the gateway against the original single-file server's way on a 3-sentence
  paragraph: sentence after sentence, each completion generated in full, then
  decoded whole, then delivered. The baseline runs here, as a client of the same
  LLM server, with the gateway's prompt, sampling and decoder weights.
* ``text-in``: text streamed in (a voice agent's LLM writing at 30 words/s) against the same
  text sent whole: first audio after the first sentence is certain, and after the
  LLM's first word.
* ``ramp``: offered streams ramped past the LLM's capacity, admission control on and
  off in one run. The stand-in shares a ceiling of total tokens/s among its streams
  (as a GPU's batch shares its decode step; 300 = 6 real-time streams at 50
  tokens/s); each offered load is a burst of streams (3, 6, 12, 24; ``--quick``: 3,
  12) of one paragraph each. Per mode and load: streams admitted and refused
  (429/503), admitted streams with an underrun (> 20 ms) and the worst one, first
  audio p50/p90; then a one-line verdict per mode (on 2 cores about 2.5 minutes;
  ``--quick`` about 1).
* ``ramp-vllm``: the ramp against the real vLLM CPU server (tiny model), capped at
  ``--ramp-vllm-max-num-seqs`` sequences, started once with first-come scheduling and
  once with ``--scheduling-policy priority`` and the gateway's ``LLM_PRIORITY``;
  admission on and off under each (bursts of 2, 4, 8 streams; about 5 minutes).
* ``cancel``: barge-in under load. HTTP clients post paragraphs back to back while
  barging sessions on each WebSocket start a paragraph and cancel it a random while
  after its first audio (HTTP barging clients close the response): per socket, the
  time from the cancel to its answer, to the last audio byte, and to the upstream
  (stand-in) abort, p50 and p99 over ``--cancels`` cancels (100; ``--quick`` 20; on
  2 cores about 2 minutes).

"Playback stall" is the silence a listener who starts playing at the first byte
would hear mid-utterance, waiting for audio that has not arrived; "listener hears
the end at" is TTFA + audio + stall. The machine is shared: expect noise.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.grid import GRID_SECTION, grid_plan  # benchmarks/gateway/
from gateway.run import SECTIONS, run

from devtools import GOLDEN_BICODEC


def number_list(kind: type) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        try:
            return [kind(part) for part in text.split(",") if part.strip()]
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from err

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer requests and a smaller grid (~2 min on 2 cores with the stand-in only)",
    )
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated subset of {SECTIONS} (default: all)",
    )
    parser.add_argument(
        "--llm",
        choices=["standin", "vllm", "both"],
        default="both",
        help="LLM of the load/compare/text-in sections (the grid always uses the stand-in)",
    )
    parser.add_argument(
        "--bicodec-dir",
        type=Path,
        default=GOLDEN_BICODEC,
        help="decoder folder of the load/compare/text-in sections (gateway and baseline)",
    )
    parser.add_argument(
        "--vllm-semantic-length",
        type=int,
        default=150,
        help="semantic tokens per sentence of the tiny vLLM model (50 = 1 s)",
    )
    parser.add_argument(
        "--decoder-threads",
        type=int,
        default=None,
        help="torch threads for the decoder (OMP_NUM_THREADS of the gateway); default: torch's",
    )
    parser.add_argument("--log-dir", type=Path, default=None, help="keep the server logs here")
    grid = parser.add_argument_group(
        "grid", "decoder x LLM rate x concurrent streams (defaults: full run / --quick)"
    )
    grid.add_argument("--decoders", default=None, help="small,full (both)")
    grid.add_argument(
        "--rates",
        type=number_list(float),
        default=None,
        help="stand-in tokens/s per stream (100,200,400 / 200)",
    )
    grid.add_argument(
        "--streams",
        type=number_list(int),
        default=None,
        help="concurrent streams (1,4,16,64 / 1,4)",
    )
    grid.add_argument(
        "--requests-per-stream", type=int, default=None, help="paragraphs per stream (2)"
    )
    grid.add_argument(
        "--cell-timeout",
        type=float,
        default=None,
        help="seconds per cell; requests still running are cut (120 / 60)",
    )
    grid.add_argument(
        "--full-max-streams",
        type=int,
        default=None,
        help="the full decoder runs only up to this many streams (0: no cap; none / 1)",
    )
    grid.add_argument(
        "--full-dir",
        type=Path,
        default=None,
        help="full-size random BiCodec folder: used if present, else built there and kept "
        "(default: built in a temporary folder)",
    )
    grid.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds for the whole grid, from the start: cells that could end later are "
        "skipped (the table is always printed)",
    )
    grid.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="decoder device")
    grid.add_argument(
        "--decoder-dtype", choices=["float32", "bfloat16", "float16"], default="float32"
    )
    grid.add_argument(
        "--tokens-per-chunk",
        type=int,
        default=1,
        help="stand-in tokens per SSE chunk (vLLM's stream interval; 1 as vLLM's default)",
    )
    ramp = parser.add_argument_group(
        "ramp", "offered streams past the LLM's shared token ceiling, admission on and off"
    )
    ramp.add_argument(
        "--ramp-total-tokens-per-s",
        type=float,
        default=300.0,
        help="stand-in ceiling over all streams (300: 6 real-time streams, which the "
        "small decoder keeps up with on 2 CPU cores)",
    )
    ramp.add_argument(
        "--ramp-tokens-per-s", type=float, default=180.0, help="stand-in pace of one stream"
    )
    ramp.add_argument(
        "--ramp-streams",
        type=number_list(int),
        default=None,
        help="offered loads, streams per burst (3,6,12,24 / 3,12)",
    )
    ramp.add_argument(
        "--ramp-vllm-streams",
        type=lambda text: [int(n) for n in text.split(",")],
        default=None,
        help="ramp-vllm: offered loads (default 2,4,8; --quick 2,6)",
    )
    ramp.add_argument(
        "--ramp-vllm-max-num-seqs",
        type=int,
        default=3,
        help="ramp-vllm: vLLM's MAX_NUM_SEQS, so that priority has a queue to reorder",
    )
    ramp.add_argument(
        "--ramp-level-timeout",
        type=float,
        default=90.0,
        help="seconds per offered load; streams still running are cut",
    )
    cancel = parser.add_argument_group("cancel", "barge-in: cancels under load")
    cancel.add_argument(
        "--cancels", type=int, default=None, help="measured cancels per socket (100 / 20)"
    )
    cancel.add_argument(
        "--cancel-barging-clients",
        type=int,
        default=4,
        help="concurrent barging sessions per socket",
    )
    cancel.add_argument(
        "--cancel-load-clients",
        type=int,
        default=4,
        help="concurrent HTTP clients posting paragraphs meanwhile",
    )
    cancel.add_argument(
        "--cancel-tokens-per-s",
        type=float,
        default=75.0,
        help="stand-in tokens/s per stream (75: 1.5 x real time, a busy GPU)",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    sections = [part for part in args.only.split(",") if part]
    unknown = set(sections) - set(SECTIONS)
    if unknown or not sections:
        parser.error(f"--only: a subset of {SECTIONS}, not {sorted(unknown)}")
    if "ramp" in sections and min(args.ramp_total_tokens_per_s, args.ramp_tokens_per_s) <= 0:
        parser.error("--ramp-total-tokens-per-s and --ramp-tokens-per-s must be positive")
    plan = grid_plan(args, parser) if GRID_SECTION in sections else None
    run(args, sections, plan)


if __name__ == "__main__":
    main()
