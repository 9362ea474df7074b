"""BiCodec decoder benchmark on the released configuration with random weights.

    python benchmarks/bench_decoder.py [--device cuda] [--dtype bfloat16] [--quick] [--compile]
                                       [--only speed,graphs,precision,...]

Prints tables: decode speed by utterance length; CUDA graphs off and on for
batches of streaming chunks (CUDA only); reduced precision, channels-last and
torch.compile (--compile) against float32, with their SNR, on the golden-size and
the real-size checkpoints; batching 1 to 64 spans one by one, in one padded pass
and in passes of the device's token budget, and which budget is fastest;
streaming cost against one full decode (each chunk's window decoded from scratch,
as before, and with the stream's settled state reused); the first chunk chosen by
count or by time at simulated LLM token rates; the SNR of streamed against full
decodes per chunking setting; load time and peak memory (decode-only load against
reading the whole checkpoint).
Real trained weights are not available here: the generator's gains are raised
(as in the golden data) so the output carries token-dependent signal, not mostly
a bias pattern; the SNR figures describe these weights, not trained ones.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from report import table  # benchmarks/, the script's own folder
from safetensors.torch import save_file

from decoder_gateway.codec import (
    BiCodecConfig,
    BiCodecDecoder,
    Decoder,
    Span,
    StreamingConfig,
    StreamingSession,
    WindowGraphs,
    checkpoint_layout,
    decode_pass,
    load_decoder,
)
from decoder_gateway.codec.model.layers import WEIGHT_NORMED
from decoder_gateway.codec.model.loading import checkpoint_key, cpu_computes_in
from devtools import GOLDEN_BICODEC, REPO

REAL = REPO / "tests" / "data" / "bicodec"
TOKENS_PER_SECOND = 50


def random_checkpoint(folder: Path) -> Path:
    """A released-format BiCodec folder: every one of the 842 keys, random values."""
    torch.manual_seed(0)
    model = BiCodecDecoder(BiCodecConfig.from_yaml(REAL / "real_config.yaml"))
    for name, module in model.named_modules():
        if isinstance(module, WEIGHT_NORMED) and name.startswith("decoder."):
            module.weight.data *= 1.2  # as the golden data: keeps token signal through 31 convs
    state = {}
    normed = {n for n, m in model.named_modules() if isinstance(m, WEIGHT_NORMED)}
    for key, value in model.state_dict().items():
        module, _, leaf = key.rpartition(".")
        stored = checkpoint_key(key)  # the released name
        if module in normed and leaf == "weight":
            norm = torch.linalg.vector_norm(value.flatten(1), dim=1).reshape(
                -1, *[1] * (value.dim() - 1)
            )
            stored_module = stored.rpartition(".")[0]
            state[f"{stored_module}.weight_g"] = norm
            state[f"{stored_module}.weight_v"] = value.clone()
        else:
            state[stored] = value.contiguous()
    manifest = json.loads((REAL / "manifest_real.json").read_text())
    assert set(checkpoint_layout(model)) <= {e["key"] for e in manifest["keys"]}
    for entry in manifest["keys"]:
        if entry["key"] not in state:
            state[entry["key"]] = torch.randn(entry["shape"]) * 0.02
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text((REAL / "real_config.yaml").read_text())
    save_file(state, folder / "model.safetensors")
    return folder


def timed(fn, repeats: int, warm_up: bool = True) -> float:
    return timed_cpu(fn, repeats, warm_up)[0]


def timed_cpu(fn, repeats: int, warm_up: bool = True) -> tuple[float, float]:
    """Median wall and process CPU seconds of ``fn`` (CPU time: steadier on a busy host)."""
    if warm_up:
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    walls, cpus = [], []
    for _ in range(repeats):
        started, cpu = time.perf_counter(), time.process_time()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        walls.append(time.perf_counter() - started)
        cpus.append(time.process_time() - cpu)
    return sorted(walls)[len(walls) // 2], sorted(cpus)[len(cpus) // 2]


def snr_db(reference: torch.Tensor, estimate: torch.Tensor) -> float:
    error = (estimate - reference).pow(2).sum().clamp_min(1e-30)
    return float(10 * torch.log10(reference.pow(2).sum() / error))


def decode_planned(
    decoder: Decoder, session: StreamingSession, plain: bool = False
) -> list[torch.Tensor]:
    """Plan, decode and complete what the session allows, as the gateway's worker does.

    ``plain``: decode each chunk's window from scratch (without the stream's state),
    as before the state existed; the audio is the same.
    """
    chunks = session.plan()
    spans = [replace(c.span, stream=None) if plain else c.span for c in chunks]
    audio = decoder.decode_spans(spans) if spans else []
    return [session.complete(chunk, samples) for chunk, samples in zip(chunks, audio, strict=True)]


def stream_all(model, semantic, global_tokens, config, plain=False) -> tuple[torch.Tensor, int]:
    """Stream token by token; returns the audio and the tokens seen before first audio."""
    session = model.open_stream(global_tokens, config)
    chunks, first = [], None
    for position, token in enumerate(semantic.tolist(), start=1):
        session.push([token])
        ready = decode_planned(model, session, plain)
        if ready and first is None:
            first = position
        chunks += ready
    session.finish()
    chunks += decode_planned(model, session, plain)
    return torch.cat(chunks), first or len(semantic)


LOAD_PROBE = """
import sys, time
import torch

def high_water_mb():  # VmHWM resets at exec, unlike ru_maxrss, which Linux carries over
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

base = high_water_mb()
started = time.perf_counter()
from decoder_gateway.codec import load_decoder
if sys.argv[2] == "decode-only":
    model = load_decoder(sys.argv[1])
else:  # the least any full-model load does: every tensor in memory, plus the decoder
    from safetensors.torch import load_file
    # load_file maps the file lazily; a model's load_state_dict copies every tensor.
    state = {k: v.clone() for k, v in load_file(sys.argv[1] + "/model.safetensors").items()}
    model = load_decoder(sys.argv[1])
seconds = time.perf_counter() - started
print(seconds, base, high_water_mb())
"""


def load_probe(folder: Path, mode: str) -> tuple[float, float, float]:
    out = subprocess.run(
        [sys.executable, "-c", LOAD_PROBE, str(folder), mode],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    ).stdout.split()
    return float(out[0]), float(out[1]), float(out[2])


class Bench:
    """The model under test, a voice, and a seeded token source."""

    def __init__(
        self, model: Decoder, folder: Path, device: str, repeats: int, compile: bool
    ) -> None:
        self.model, self.folder, self.device, self.repeats = model, folder, device, repeats
        self.compile = compile
        self.voice = torch.randint(0, 4096, (32,))
        self._gen = torch.Generator().manual_seed(1)

    def tokens(self, n: int) -> torch.Tensor:
        return torch.randint(0, 8192, (n,), generator=self._gen)


def bench_speed(b: Bench) -> None:
    rows = []
    for seconds in (0.5, 5, 20):
        semantic = b.tokens(int(seconds * TOKENS_PER_SECOND))
        t = timed(lambda s=semantic: b.model.decode(s, b.voice), b.repeats)
        rows.append([f"{seconds} s ({len(semantic)} tokens)", t, t / seconds])
    table("Full decode", ["audio", "time (s)", "time per audio second (RTF)"], rows)


def bench_streaming(b: Bench) -> None:
    semantic = b.tokens(10 * TOKENS_PER_SECOND)
    full_wall, full_cpu = timed_cpu(lambda: b.model.decode(semantic, b.voice), b.repeats)
    rows = []
    for name, config in (("default", None), ("exact", StreamingConfig(first_lookahead_tokens=67))):
        for scheme, plain in (
            ("each chunk's window from scratch (before)", True),
            ("stream state reused (after)", False),
        ):
            wall, cpu = timed_cpu(
                lambda c=config, p=plain: stream_all(b.model, semantic, b.voice, c, p), b.repeats
            )
            rows.append(
                [
                    name,
                    scheme,
                    full_wall,
                    wall,
                    f"{wall / full_wall:.2f}x",
                    f"{cpu / full_cpu:.2f}x",
                ]
            )
    table(
        "Stream cost / full decode (10 s utterance, tokens pushed one by one; "
        "median of the repeats, CPU time of all threads alongside)",
        [
            "settings",
            "streaming decode",
            "full decode (s)",
            "streamed (s)",
            "stream / full (wall)",
            "stream / full (CPU time)",
        ],
        rows,
    )


def chunk_spans(b: Bench, count: int) -> list[Span]:
    """Streaming-chunk spans: 4-20 tokens inside longer sequences, different voices."""
    spans = []
    for i in range(count):
        semantic = b.tokens(200)
        start, size = 60 + (13 * i) % 50, 4 + (5 * i) % 17
        spans.append(Span(semantic, torch.randint(0, 4096, (32,)), start, start + size))
    return spans


def sentence_spans(b: Bench, count: int) -> list[Span]:
    """Whole sequences of 0.8-1.2 s, different voices."""
    spans = []
    for i in range(count):
        semantic = b.tokens(40 + (7 * i) % 21)
        spans.append(Span(semantic, torch.randint(0, 4096, (32,)), 0, len(semantic)))
    return spans


def bench_batch(b: Bench) -> None:
    model, default = b.model.model, b.model.batch_tokens
    workloads = [
        ("chunks", chunk_spans, (1, 4, 16, 64)),
        ("~1 s sentences", sentence_spans, (1, 4, 16) if b.device == "cpu" else (1, 4, 16, 64)),
    ]
    rows = []
    for name, make, sizes in workloads:
        for size in sizes:
            spans = make(b, size)
            single = timed(lambda sp=spans: [decode_pass(model, [s]) for s in sp], b.repeats)
            padded = timed(lambda sp=spans: decode_pass(model, sp), b.repeats)
            budget = timed(lambda sp=spans: b.model.decode_spans(sp), b.repeats)
            rows.append(
                [
                    name,
                    size,
                    single,
                    padded,
                    budget,
                    f"{single / padded:.2f}x",
                    f"{single / budget:.2f}x",
                ]
            )
    table(
        f"Batching: spans one by one, in one padded pass (before), and in passes of at most "
        f"{default} tokens of generator window (the {b.device} default, DECODER_BATCH_TOKENS)",
        [
            "spans",
            "batch",
            "one by one (s)",
            "one pass (s)",
            "budgeted (s)",
            "speed-up, one pass",
            "speed-up, budgeted",
        ],
        rows,
    )
    # Which budget is fastest here: a mixed load, as the gateway's worker meets it.
    on_cpu = b.device == "cpu"
    chunks, sentences = (16, 4) if on_cpu else (128, 32)
    spans = chunk_spans(b, chunks) + sentence_spans(b, sentences)
    budgets = (16, 32, 64, 128, 256, 1024) if on_cpu else (64, 256, 1024, 4096, 16384)
    single = timed(lambda: [decode_pass(model, [s]) for s in spans], b.repeats)
    rows = []
    for budget in (*budgets, None):
        if budget is None:
            t = timed(lambda: decode_pass(model, spans), b.repeats)
        else:
            budgeted = Decoder(model, batch_tokens=budget)
            t = timed(lambda d=budgeted: d.decode_spans(spans), b.repeats)
        rows.append(["one pass" if budget is None else budget, t, f"{single / t:.2f}x"])
    best = min(rows, key=lambda row: row[1])
    table(
        f"Batch budget ({chunks} chunks + {sentences} sentences; one by one {single:.3f} s): "
        f"fastest {best[0]}, default on {b.device} {default}",
        ["tokens per pass", "time (s)", "speed-up over one by one"],
        rows,
    )


STREAMING_SETTINGS = [
    ("exact (look-ahead 67 from the start)", StreamingConfig(first_lookahead_tokens=67)),
    ("default: first 10 + 4, crossfade 320", StreamingConfig()),
    ("first 10 + 4, no crossfade", StreamingConfig(crossfade_samples=0)),
    ("first 10 + 4, crossfade 640", StreamingConfig(crossfade_samples=640)),
    ("first 10 + 0, crossfade 320", StreamingConfig(first_lookahead_tokens=0)),
    ("first 10 + 8, crossfade 320", StreamingConfig(first_lookahead_tokens=8)),
    ("first 10 + 16, crossfade 320", StreamingConfig(first_lookahead_tokens=16)),
    ("speed-up 4 (fast LLM)", StreamingConfig(assumed_speedup=4.0)),
    ("speed-up 1 (real-time LLM)", StreamingConfig(assumed_speedup=1.0)),
]


def bench_quality(b: Bench) -> None:
    semantic = b.tokens(6 * TOKENS_PER_SECOND)
    full = b.model.decode(semantic, b.voice)
    print(
        f"\nTest signal (random weights): rms {full.pow(2).mean().sqrt():.3f}, "
        f"|x| > 0.99 on {(full.abs() > 0.99).float().mean():.1%} of samples"
    )
    rows = []
    for name, config in STREAMING_SETTINGS:
        streamed, first = stream_all(b.model, semantic, b.voice, config)
        from_scratch, _ = stream_all(b.model, semantic, b.voice, config, plain=True)
        assert streamed.shape == full.shape == from_scratch.shape
        exact_from = next(
            (
                i
                for i in range(len(full) // 320)
                if (streamed[i * 320 :] - full[i * 320 :]).abs().max() <= 1e-4
            ),
            None,
        )
        rows.append(
            [
                name,
                first,
                f"{first * 20} ms",
                snr_db(full, streamed),
                f"{(streamed - full).abs().max():.2e}",
                "-" if exact_from is None else f"{exact_from * 20 / 1000:.2f} s",
                f"{(streamed - from_scratch).abs().max():.1e}",
            ]
        )
    table(
        "Streamed against full decode (6 s utterance)",
        [
            "setting",
            "tokens before first audio",
            "of speech",
            "SNR (dB)",
            "max abs err",
            "exact from",
            "state vs window decode (max abs)",
        ],
        rows,
    )


def first_chunk_at_rate(
    b: Bench, semantic: torch.Tensor, config: StreamingConfig, rate: float
) -> tuple[int, float, float, torch.Tensor]:
    """Stream with tokens arriving every 1/rate s (a simulated clock), decoding as they
    allow. Returns the first window (tokens), when its last token came (s after the
    first), the first chunk's decode time (s, measured) and the audio."""
    session = b.model.open_stream(b.voice, config)
    out: list[torch.Tensor] = []
    window, came, decode_s = 0, 0.0, 0.0
    for position, token in enumerate(semantic.tolist(), start=1):
        session.push([token], at=(position - 1) / rate)
        started = time.perf_counter()
        ready = decode_planned(b.model, session)
        if ready and not window:
            decode_s = time.perf_counter() - started
            window, came = position, (position - 1) / rate
        out += ready
    session.finish()
    out += decode_planned(b.model, session)
    return window, came, decode_s, torch.cat(out)


def bench_first_audio(b: Bench) -> None:
    semantic = b.tokens(6 * TOKENS_PER_SECOND)
    full = b.model.decode(semantic, b.voice)
    budget_ms = 100
    modes = [
        ("count: first 10 + 4", StreamingConfig()),
        (f"time: budget {budget_ms} ms", StreamingConfig(first_audio_budget_s=budget_ms / 1000)),
    ]
    first_chunk_tokens = StreamingConfig().first_chunk_tokens
    rows = []
    for rate in (50, 200, 400):
        for name, config in modes:
            first_chunk_at_rate(b, semantic, config, rate)  # warm-up for the decode time
            window, came, decode_s, audio = first_chunk_at_rate(b, semantic, config, rate)
            head = first_chunk_tokens * 320
            rows.append(
                [
                    rate,
                    name,
                    f"{first_chunk_tokens} + {window - first_chunk_tokens}",
                    f"{came * 1000:.0f}",
                    f"{decode_s * 1000:.0f}",
                    f"{(came + decode_s) * 1000:.0f}",
                    snr_db(full[:head], audio[:head]),
                    snr_db(full, audio),
                ]
            )
    table(
        "First chunk by count or by time (6 s utterance, one token every 1/rate s; first "
        "audio = when the window's last token came, after the first token, + its decode)",
        [
            "tokens/s",
            "first chunk",
            "window: chunk + look-ahead",
            "last token came (ms)",
            "decode (ms)",
            "first audio (ms)",
            "SNR first 0.2 s (dB)",
            "SNR whole stream (dB)",
        ],
        rows,
    )


@contextlib.contextmanager
def channels_last_convs():
    """Every 1-D conv run as a 2-D conv on (B, C, 1, T) in channels-last memory format
    (torch's channels-last formats are 4-D and 5-D only): a benchmark-only switch."""
    conv1d = F.conv1d

    def as_2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        def first(v):
            return v if isinstance(v, int) else v[0]

        y = F.conv2d(
            x.unsqueeze(2).contiguous(memory_format=torch.channels_last),
            weight.unsqueeze(2).contiguous(memory_format=torch.channels_last),
            bias,
            (1, first(stride)),
            (0, first(padding)),
            (1, first(dilation)),
            groups,
        )
        return y.squeeze(2)

    F.conv1d = as_2d
    try:
        yield
    finally:
        F.conv1d = conv1d


def compiled(decoder: Decoder) -> Decoder:
    """The same decoder with its two window passes compiled (shapes vary: dynamic)."""
    model = decoder.model
    other = copy.copy(model)  # shares the weights; torch.compile wraps the methods
    other.features = torch.compile(model.features, dynamic=True)
    other.waveform = torch.compile(model.waveform, dynamic=True)
    return Decoder(other, batch_tokens=decoder.batch_tokens)


def precision_modes(b: Bench, folder: Path) -> list[tuple[str, Callable[[], object]]]:
    """(name, context factory or model) of every reduced-precision mode for the device."""
    modes: list[tuple[str, object]] = [
        (f"autocast {b.device} bfloat16", lambda: torch.autocast(b.device, torch.bfloat16)),
        ("bfloat16 model (DECODER_DTYPE)", load_decoder(folder, b.device, torch.bfloat16)),
    ]
    if b.device == "cuda" or cpu_computes_in(torch.float16):
        modes.append(
            ("float16 model (DECODER_DTYPE)", load_decoder(folder, b.device, torch.float16))
        )
    if b.device == "cpu":
        modes.append(("float32, channels-last convs", channels_last_convs))
    if b.compile:
        fp32 = load_decoder(folder, b.device)
        modes.append(("float32, torch.compile", compiled(fp32)))
        modes.append(("bfloat16 model, torch.compile", compiled(modes[1][1])))
    return modes


def decode_whole(decoder: Decoder, span: Span) -> torch.Tensor:
    return decoder.decode_spans([span])[0]


def bench_precision(b: Bench) -> None:
    """Each mode against float32 on the golden-size and the real-size checkpoints."""
    rows = []
    for name, folder in (("golden", GOLDEN_BICODEC), ("real-size", b.folder)):
        reference = load_decoder(folder, b.device)
        semantic = torch.randint(0, reference.model.config.codebook_size, (100,), generator=b._gen)
        whole = Span(semantic, b.voice, 0, len(semantic))
        run = functools.partial(decode_whole, span=whole)

        full = run(reference)
        base = timed(functools.partial(run, reference), b.repeats)
        rows.append([name, "float32", base, "1.00x", "-", "-", "-"])
        for mode, how in precision_modes(b, folder):
            model, context = (
                (how, contextlib.nullcontext) if isinstance(how, Decoder) else (reference, how)
            )
            started = time.perf_counter()
            with context():
                audio = run(model)  # also the warm-up (and compilation)
                first = time.perf_counter() - started
                t = timed(functools.partial(run, model), b.repeats, warm_up=False)
            rows.append(
                [
                    name,
                    mode,
                    t,
                    f"{base / t:.2f}x",
                    snr_db(full, audio),
                    f"{(audio - full).abs().max():.1e}",
                    f"{first:.1f}",
                ]
            )
    table(
        f"Reduced precision and compilation against float32 ({b.device}, a 2 s decode)",
        [
            "checkpoint",
            "mode",
            "time (s)",
            "speed-up",
            "SNR vs float32 (dB)",
            "max abs err",
            "first call (s)",
        ],
        rows,
    )


def bench_graphs(b: Bench) -> None:
    """Chunk decodes with CUDA graphs off (eager window decode) and on (replayed)."""
    if b.device != "cuda":
        print("\n(CUDA graphs: CUDA only, skipped on the CPU)")
        return
    decoder = b.model

    def with_graphs(graphs: WindowGraphs) -> Decoder:
        return Decoder(decoder.model, batch_tokens=decoder.batch_tokens, graphs=graphs)

    rows = []
    for size in (1, 4, 16, 64):
        spans = chunk_spans(b, size)
        eager = timed(lambda sp=spans: decoder.decode_spans(sp), b.repeats)
        graphs = WindowGraphs(decoder.model)
        graphed = with_graphs(graphs)
        started = time.perf_counter()
        graphed.decode_spans(spans)  # captures the buckets this batch needs
        torch.cuda.synchronize()
        capture = time.perf_counter() - started
        replayed = timed(lambda sp=spans, g=graphed: g.decode_spans(sp), b.repeats)
        rows.append(
            [
                size,
                f"{eager * 1000:.1f}",
                f"{replayed * 1000:.1f}",
                f"{eager / replayed:.2f}x",
                f"{capture * 1000:.0f}",
                graphs.failure or "ok",
            ]
        )
    table(
        "CUDA graphs: a batch of streaming chunks (4-20 tokens each), graphs off and on",
        ["chunks", "off (ms)", "on (ms)", "speed-up", "first call, capture (ms)", "capture"],
        rows,
    )
    # What the gateway does per step: N streams, each 5 tokens further, decoded as
    # one batch, by the stream state (graphs off) or by graphed windows (graphs on).
    rows = []
    for streams in (1, 4, 16, 64):
        per_step = {}
        for name, through in (
            ("state", decoder),
            ("graphs", with_graphs(WindowGraphs(decoder.model))),
        ):
            stream_steps(b, through, streams, steps=4)  # warm-up, and the captures
            per_step[name] = stream_steps(b, through, streams, steps=10) / 10
        rows.append(
            [
                streams,
                f"{per_step['state'] * 1000:.1f}",
                f"{per_step['graphs'] * 1000:.1f}",
                f"{per_step['state'] / per_step['graphs']:.2f}x",
            ]
        )
    table(
        "CUDA graphs in streaming: streams advancing 5 tokens a step, one batch per step",
        ["streams", "stream state, graphs off (ms/step)", "graphs on (ms/step)", "speed-up"],
        rows,
    )


def stream_steps(b: Bench, decoder: Decoder, streams: int, steps: int) -> float:
    """Seconds to decode ``steps`` steps of ``streams`` streams (5 tokens each a step),
    every step's chunks in one batch, as the gateway's worker does."""
    sessions = [decoder.open_stream(torch.randint(0, 4096, (32,))) for _ in range(streams)]
    total = 0.0
    for _ in range(steps):
        for session in sessions:
            session.push(b.tokens(5).tolist())
        planned = [(session, chunk) for session in sessions for chunk in session.plan()]
        if b.device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        audio = decoder.decode_spans([chunk.span for _, chunk in planned]) if planned else []
        total += time.perf_counter() - started
        for (session, chunk), samples in zip(planned, audio, strict=True):
            session.complete(chunk, samples)
    return total


def bench_load(b: Bench) -> None:
    rows = []
    for mode in ("decode-only", "whole checkpoint + decoder"):
        seconds, base, peak = load_probe(b.folder, mode)
        rows.append([mode, seconds, f"{peak - base:.0f} MB", f"{peak:.0f} MB"])
    table(
        "Load (CPU, fresh process, after `import torch`; 842-key random checkpoint, 626 MB)",
        ["load", "time (s)", "peak RSS added by the load", "peak RSS"],
        rows,
    )


# In the order of what a GPU check must not miss if its time runs out.
SECTIONS = {
    "speed": bench_speed,
    "graphs": bench_graphs,
    "precision": bench_precision,
    "batch": bench_batch,
    "streaming": bench_streaming,
    "first_audio": bench_first_audio,
    "quality": bench_quality,
    "load": bench_load,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default="float32",
        help="the model's dtype (DECODER_DTYPE); `precision` compares against float32 anyway",
    )
    parser.add_argument(
        "--compile", action="store_true", help="precision: also torch.compile (minutes on a CPU)"
    )
    parser.add_argument(
        "--only", default=",".join(SECTIONS), help=f"comma-separated subset of {list(SECTIONS)}"
    )
    args = parser.parse_args()
    chosen = args.only.split(",")
    unknown = set(chosen) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}")
    print(
        f"# BiCodec decoder benchmark: device {args.device}, {args.dtype}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = random_checkpoint(Path(tmp) / "BiCodec")
        model = load_decoder(folder, device=args.device, dtype=getattr(torch, args.dtype))
        bench = Bench(model, folder, args.device, 1 if args.quick else 3, args.compile)
        for name in chosen:
            SECTIONS[name](bench)


if __name__ == "__main__":
    main()
