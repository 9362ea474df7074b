"""Spark-TTS LLM decode speed on vLLM's CPU build, at full size (random weights).

    python benchmarks/bench_vllm_cpu.py [--streams 1,2] [--tokens 200] [--eager]
    python benchmarks/bench_vllm_cpu.py --only design [--model tiny] [--tokens 120]

Builds a Qwen2 model of Spark-TTS-0.5B's shape (hidden 896, 24 layers, 14 heads,
2 KV heads, intermediate 4864, vocabulary 166000, tied embeddings: 507 M
parameters) with random weights and the Spark tokenizer of the tests in a
temporary folder, serves it with the vLLM CPU build (``.venv-vllm``, or
``VLLM_VENV``) through ``launch_vllm.sh`` as the tests do, and streams
``/v1/completions`` with ``ignore_eos`` and a fixed ``max_tokens`` from 1, 2, ...
concurrent clients. Prints tokens/s per stream and in all, the time to the first
token, the machine's memory bandwidth, and what that bandwidth allows: CPU decode
reads every weight once per step (shared by the streams of a batch), so a step
cannot be faster than weight bytes / bandwidth.

Real time for Spark-TTS is 50 semantic tokens/s per stream.

``--only design``: what vLLM's structured outputs cost a voice design. The gateway's
design generations (the controllable prompt, temperature 0.8) are sent without a
constraint, with the gateway's design grammar over token ids
(``DESIGN_STRUCTURED_OUTPUTS``, :mod:`decoder_gateway.llm.grammar`), and with a
regex over the same shape's text, from 1 and 3 (a design's default candidates)
concurrent clients. Each generation writes exactly ``--tokens`` tokens (``min_tokens``
= ``max_tokens``), so the modes decode alike; the table gives the time to the first
token, tokens/s per stream, and how many generations wrote a valid design (exactly
32 global tokens by id, then speech), as the gateway reads it. The first constrained
request also pays for the backend's start (its tokenizer index of the 166000-token
vocabulary) and the grammar's compilation: that is timed apart. ``--model tiny``
serves the tests' tiny model instead (a one-layer model: the constraint's cost per
token is then the largest share it can be).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch
from report import table  # benchmarks/, the script's own folder
from safetensors.torch import save_file

from decoder_gateway.llm.grammar import DesignMarkers, design_grammar
from decoder_gateway.llm.prompt import TokenMap, VoiceStyle, controllable_prompt
from devtools import tiny_spark_lm as spark
from devtools.vllm_server import VllmServer

REAL_TIME_TOKENS_PER_S = 50

# Spark-TTS-0.5B's LLM (Qwen2.5-0.5B with the BiCodec tokens), /work/shared/spark/PROTOCOL.md.
HIDDEN = 896
LAYERS = 24
HEADS = 14
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS  # 64
INTERMEDIATE = 4864
VOCAB = spark.VOCAB_SIZE  # 166000


def launcher_env(args: argparse.Namespace, dtype_name: str) -> dict[str, str]:
    """launch_vllm.sh's settings for the CPU server these flags ask for."""
    env = {
        "DTYPE": dtype_name,
        "VLLM_CPU_KVCACHE_SPACE": args.kv_space_gib,
        "VLLM_CPU_OMP_THREADS_BIND": args.omp_bind,
    }
    if args.eager:
        env["EXTRA_VLLM_ARGS"] = "--enforce-eager"
    return env


def cpu_flags() -> set[str]:
    """The CPU's feature flags (x86 `flags`, Arm `Features`) from /proc/cpuinfo."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def bf16_supported() -> bool:
    """Native bfloat16 arithmetic: AVX512-BF16 or AMX (x86), BF16 (Arm)."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})


def parameter_count() -> dict[str, int]:
    """Parameters by part; the output layer is the (tied) embedding."""
    attention = HIDDEN * HIDDEN * 2 + HIDDEN * KV_HEADS * HEAD_DIM * 2
    attention += HIDDEN + 2 * KV_HEADS * HEAD_DIM  # q, k, v biases
    mlp = 3 * HIDDEN * INTERMEDIATE
    layer = attention + mlp + 2 * HIDDEN  # two RMSNorms
    return {"layers": LAYERS * layer, "embedding": VOCAB * HIDDEN, "norm": HIDDEN}


def bytes_read_per_step(dtype_bytes: int) -> int:
    """Weights a decode step reads: every layer, and the output layer over the vocabulary."""
    counts = parameter_count()
    return dtype_bytes * (counts["layers"] + counts["embedding"] + counts["norm"])


def model_config(dtype: str) -> dict[str, object]:
    config = spark.model_config()
    config.update(
        {
            "hidden_size": HIDDEN,
            "intermediate_size": INTERMEDIATE,
            "num_hidden_layers": LAYERS,
            "num_attention_heads": HEADS,
            "num_key_value_heads": KV_HEADS,
            "max_window_layers": 21,
            "max_position_embeddings": 32768,
            "tie_word_embeddings": True,
            "torch_dtype": dtype,
            "dtype": dtype,
        }
    )
    config.pop("head_dim", None)  # hidden / heads, as in the real config
    return config


def write_full_size_model(folder: Path, dtype: torch.dtype) -> Path:
    """A Spark-TTS-0.5B-shaped checkpoint with random weights, and the tests' tokenizer."""
    torch.manual_seed(0)
    name = "bfloat16" if dtype == torch.bfloat16 else "float32"

    def normal(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape) * 0.02).to(dtype)

    tensors = {
        "model.embed_tokens.weight": normal(VOCAB, HIDDEN),
        "model.norm.weight": torch.ones(HIDDEN, dtype=dtype),
    }
    kv = KV_HEADS * HEAD_DIM
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        tensors |= {
            p + "input_layernorm.weight": torch.ones(HIDDEN, dtype=dtype),
            p + "post_attention_layernorm.weight": torch.ones(HIDDEN, dtype=dtype),
            p + "self_attn.q_proj.weight": normal(HIDDEN, HIDDEN),
            p + "self_attn.q_proj.bias": torch.zeros(HIDDEN, dtype=dtype),
            p + "self_attn.k_proj.weight": normal(kv, HIDDEN),
            p + "self_attn.k_proj.bias": torch.zeros(kv, dtype=dtype),
            p + "self_attn.v_proj.weight": normal(kv, HIDDEN),
            p + "self_attn.v_proj.bias": torch.zeros(kv, dtype=dtype),
            p + "self_attn.o_proj.weight": normal(HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": normal(INTERMEDIATE, HIDDEN),
            p + "mlp.up_proj.weight": normal(INTERMEDIATE, HIDDEN),
            p + "mlp.down_proj.weight": normal(HIDDEN, INTERMEDIATE),
        }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(model_config(name), indent=1))
    generation = {"bos_token_id": spark.ENDOFTEXT_ID, "eos_token_id": spark.IM_END_ID}
    (folder / "generation_config.json").write_text(json.dumps(generation))
    save_file(tensors, str(folder / "model.safetensors"), {"format": "pt"})
    spark.write_tokenizer(folder)
    return folder


def spark_prompt() -> list[int]:
    """Token ids of a speaker prompt: a ~60-character sentence and 32 global tokens."""
    text = [ord(c) for c in "248: Oli otya? Nsanyuse okukulaba leero, webale okujja."]
    return [
        spark.TASK_TTS_ID,
        spark.START_CONTENT_ID,
        *text,
        spark.END_CONTENT_ID,
        spark.START_GLOBAL_ID,
        *spark.expected_global_ids(),
        spark.END_GLOBAL_ID,
        spark.START_SEMANTIC_ID,
    ]


async def one_stream(client: httpx.AsyncClient, model: str, tokens: int) -> dict[str, float]:
    """Stream one completion; the times of its first and last token, and the count."""
    body = {
        "model": model,
        "prompt": spark_prompt(),
        "max_tokens": tokens,
        "ignore_eos": True,
        "temperature": 0.8,
        "top_k": 50,
        "top_p": 0.95,
        "stream": True,
        "return_token_ids": True,
    }
    start = time.perf_counter()
    first = last = None
    count = 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"])
            for choice in chunk.get("choices", []):
                ids = choice.get("token_ids") or []
                if ids:
                    now = time.perf_counter()
                    first = now if first is None else first
                    last = now
                    count += len(ids)
    if first is None or last is None or count < 2:
        raise RuntimeError(f"the stream gave {count} tokens")
    return {
        "ttft": first - start,
        "decode_rate": (count - 1) / (last - first),
        "overall_rate": count / (last - start),
        "tokens": count,
        "end": last,
    }


async def measure(base_url: str, model: str, streams: int, tokens: int) -> dict[str, float]:
    async with httpx.AsyncClient(base_url=base_url, timeout=600.0) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one_stream(client, model, tokens) for _ in range(streams)))
    wall = max(r["end"] for r in results) - start
    return {
        "streams": streams,
        "ttft": sum(r["ttft"] for r in results) / streams,
        "decode_rate": sum(r["decode_rate"] for r in results) / streams,
        "min_rate": min(r["decode_rate"] for r in results),
        "overall_rate": sum(r["overall_rate"] for r in results) / streams,
        "aggregate": sum(r["tokens"] for r in results) / wall,
    }


# --- --only design: the cost of structured outputs ---------------------------------------

DESIGN_TEXT = "Oli otya? Nsanyuse okukulaba leero."
DESIGN_STYLE = VoiceStyle("female", "high", "moderate")
DESIGN_MODES = ("off", "grammar", "regex")
# The same shape as the grammar, over the text: what a regex can say. The tokenizer may
# spell each marker in byte-level tokens as well as in its one added token.
DESIGN_REGEX = (
    r"(<\|start_acoustic_token\|>(<\|[a-z_]+_\d+\|>){0,8}<\|end_acoustic_token\|>)?"
    r"<\|start_global_token\|>(<\|bicodec_global_\d+\|>){32}<\|end_global_token\|>"
    r"<\|start_semantic_token\|>(<\|bicodec_semantic_\d+\|>)+"
)


def design_constraint(mode: str) -> dict[str, str] | None:
    """The ``structured_outputs`` of a design generation in ``mode``."""
    if mode == "grammar":
        markers = DesignMarkers(
            start_global=spark.START_GLOBAL_ID,
            end_global=spark.END_GLOBAL_ID,
            start_semantic=spark.START_SEMANTIC_ID,
            start_acoustic=spark.START_ACOUSTIC_ID,
            end_acoustic=spark.END_ACOUSTIC_ID,
        )
        return {"grammar": design_grammar(TokenMap(), markers)}
    if mode == "regex":
        return {"regex": DESIGN_REGEX}
    return None


async def design_stream(
    client: httpx.AsyncClient, model: str, mode: str, tokens: int, seed: int
) -> dict[str, float]:
    """One design generation as the gateway sends it, of exactly ``tokens`` tokens."""
    body: dict[str, object] = {
        "model": model,
        "prompt": controllable_prompt(DESIGN_TEXT, DESIGN_STYLE),
        "max_tokens": tokens,
        "min_tokens": tokens,
        "temperature": 0.8,
        "top_k": 50,
        "top_p": 0.95,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "stop_token_ids": [spark.END_SEMANTIC_ID, spark.IM_END_ID],
        "skip_special_tokens": False,
        "spaces_between_special_tokens": False,
        "seed": seed,
        "stream": True,
        "return_token_ids": True,
    }
    if (constraint := design_constraint(mode)) is not None:
        body["structured_outputs"] = constraint
    start = time.perf_counter()
    first = last = None
    ids: list[int] = []
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{mode}: HTTP {response.status_code}: {await response.aread()!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"])
            for choice in chunk.get("choices", []):
                if delta := choice.get("token_ids") or []:
                    now = time.perf_counter()
                    first = now if first is None else first
                    last = now
                    ids += delta
    if first is None or last is None or len(ids) < 2:
        raise RuntimeError(f"{mode}: the stream gave {len(ids)} tokens")
    globals_ = [i for i in ids if 0 <= i - spark.GLOBAL_BASE < spark.NUM_GLOBAL_VALUES]
    semantic = [i for i in ids if 0 <= i - spark.SEMANTIC_BASE < spark.NUM_SEMANTIC_VALUES]
    return {
        "ttft": first - start,
        "decode_rate": (len(ids) - 1) / (last - first),
        "tokens": len(ids),
        "valid": float(len(globals_) == 32 and bool(semantic)),
        "end": last,
    }


async def design_round(
    client: httpx.AsyncClient, model: str, mode: str, streams: int, tokens: int, seed: int
) -> list[dict[str, float]]:
    """``streams`` concurrent design generations in ``mode``."""
    return await asyncio.gather(
        *(design_stream(client, model, mode, tokens, seed + i) for i in range(streams))
    )


def design_row(mode: str, streams: int, results: list[dict[str, float]]) -> dict[str, Any]:
    ttfts = sorted(r["ttft"] for r in results)
    return {
        "mode": mode,
        "streams": streams,
        "generations": len(results),
        "ttft_p50": ttfts[len(ttfts) // 2],
        "ttft_max": ttfts[-1],
        "decode_rate": sum(r["decode_rate"] for r in results) / len(results),
        "valid": int(sum(r["valid"] for r in results)),
    }


async def measure_design(
    base_url: str, model: str, streams: list[int], rounds: int, tokens: int
) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """The first constrained generation of each mode (cold), then ``rounds`` rounds at
    each concurrency, the modes taking turns within a round (a machine whose speed
    drifts then drifts for all of them alike)."""
    async with httpx.AsyncClient(base_url=base_url, timeout=600.0) as client:
        # Warm-up without a constraint: the first request pays for compilation.
        await design_round(client, model, "off", 1, 16, 0)
        # The first constrained requests: the backend starts, the grammar compiles.
        cold = {
            mode: design_row(mode, 1, await design_round(client, model, mode, 1, tokens, 0))
            for mode in DESIGN_MODES[1:]
        }
        rows = []
        for n in streams:
            results: dict[str, list[dict[str, float]]] = {mode: [] for mode in DESIGN_MODES}
            for round_ in range(rounds):
                for mode in DESIGN_MODES:
                    seed = 1000 * (round_ + 1)
                    results[mode] += await design_round(client, model, mode, n, tokens, seed)
            rows += [design_row(mode, n, results[mode]) for mode in DESIGN_MODES]
    return cold, rows


def run_design(args: argparse.Namespace, streams: list[int]) -> None:
    """``--only design``: design generations with and without structured outputs."""
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="spark-design-") as tmp:
        if args.model == "tiny":
            folder = spark.write_model(Path(tmp) / "model")
            dtype_name, served = "float32", "spark-tiny"
        else:
            dtype_name = args.dtype
            if dtype_name == "auto":
                dtype_name = "bfloat16" if bf16_supported() else "float32"
            dtype = torch.bfloat16 if dtype_name == "bfloat16" else torch.float32
            folder = args.model_dir or Path(tmp) / "model"
            if not (folder / "model.safetensors").exists():
                write_full_size_model(folder, dtype)
            served = "spark-full"
        print(f"{platform.processor() or platform.machine()}, {cores} cores, {args.model} model")
        extra = launcher_env(args, dtype_name)
        server = VllmServer(
            folder,
            Path(tmp) / "vllm.log",
            served_model_name=served,
            max_model_len=1024,
            extra_env=extra,
            start_timeout_s=args.start_timeout,
        )
        try:
            server.start()
        except Exception as error:
            print(f"vLLM did not start: {error}\n{server.log_tail(60)}", file=sys.stderr)
            raise SystemExit(1) from error
        try:
            cold, rows = asyncio.run(
                measure_design(server.url, served, streams, args.rounds, args.tokens)
            )
        finally:
            server.stop()

    off = {r["streams"]: r for r in rows if r["mode"] == "off"}
    table(
        f"Voice design on vLLM's CPU build ({args.model} model, {dtype_name}): "
        f"{args.tokens} tokens per generation, {args.rounds} rounds per row",
        ["structured outputs", "streams", "generations", "first token s (p50)",
         "first token s (max)", "tokens/s per stream", "vs off", "valid designs"],
        [
            [r["mode"], r["streams"], r["generations"], r["ttft_p50"], r["ttft_max"],
             r["decode_rate"], f"{r['decode_rate'] / off[r['streams']]['decode_rate']:.0%}",
             f"{r['valid']}/{r['generations']}"]
            for r in rows
        ],
    )  # fmt: skip
    table(
        "First constrained request of each kind (the grammar's: the backend's start too; "
        "then its compilation)",
        ["structured outputs", "first token s", "tokens/s", "valid design"],
        [
            [mode, r["ttft_p50"], r["decode_rate"], f"{r['valid']}/{r['generations']}"]
            for mode, r in cold.items()
        ],
    )


def memory_bandwidth_gbs(threads: int) -> float:
    """Read+write bandwidth of a large tensor copy with `threads` threads, GB/s."""
    torch.set_num_threads(threads)
    a = torch.ones(128 * 1024 * 1024, dtype=torch.float32)  # 512 MiB
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t)
    return 2 * a.numel() * a.element_size() / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--streams", help="concurrent streams per run (default 1,2; --only design: 1,3)"
    )
    parser.add_argument(
        "--tokens", type=int, help="tokens per stream (default 200; --only design: 120)"
    )
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto")
    parser.add_argument("--eager", action="store_true", help="--enforce-eager (no compile)")
    parser.add_argument("--kv-space-gib", default="1", help="VLLM_CPU_KVCACHE_SPACE")
    parser.add_argument(
        "--omp-bind", default="auto", help="VLLM_CPU_OMP_THREADS_BIND (auto: all cores but one)"
    )
    parser.add_argument("--model-dir", type=Path, help="reuse (or keep) the model here")
    parser.add_argument("--start-timeout", type=float, default=600.0)
    parser.add_argument(
        "--only", choices=["decode", "design"], default="decode", help="which measurement"
    )
    parser.add_argument(
        "--model", choices=["full", "tiny"], default="full", help="--only design: the model"
    )
    parser.add_argument("--rounds", type=int, default=3, help="--only design: rounds per row")
    args = parser.parse_args()
    if args.only == "design":
        # One stream, and a design's three candidates; a short preview's tokens.
        args.tokens = args.tokens or 120
        run_design(args, [int(s) for s in (args.streams or "1,3").split(",")])
        return
    args.tokens = args.tokens or 200
    streams = [int(s) for s in (args.streams or "1,2").split(",")]

    dtype_name = args.dtype
    if dtype_name == "auto":
        dtype_name = "bfloat16" if bf16_supported() else "float32"
    dtype = torch.bfloat16 if dtype_name == "bfloat16" else torch.float32
    cores = len(os.sched_getaffinity(0))
    print(f"{platform.processor() or platform.machine()}, {cores} cores, dtype {dtype_name}")

    with tempfile.TemporaryDirectory(prefix="spark-full-") as tmp:
        folder = args.model_dir or Path(tmp) / "model"
        t = time.perf_counter()
        if not (folder / "model.safetensors").exists():
            write_full_size_model(folder, dtype)
        build_s = time.perf_counter() - t
        log = Path(tmp) / "vllm.log"
        extra = launcher_env(args, dtype_name)
        server = VllmServer(
            folder,
            log,
            served_model_name="spark-full",
            max_model_len=1024,
            extra_env=extra,
            start_timeout_s=args.start_timeout,
        )
        t = time.perf_counter()
        try:
            server.start()
        except Exception as error:  # report why the full-size model could not be served
            print(f"vLLM did not start: {error}\n{server.log_tail(60)}", file=sys.stderr)
            raise SystemExit(1) from error
        start_s = time.perf_counter() - t
        try:
            # Warm-up: the first request pays for lazy initialisation and compilation.
            asyncio.run(measure(server.url, "spark-full", 1, 16))
            rows = [asyncio.run(measure(server.url, "spark-full", n, args.tokens)) for n in streams]
        finally:
            server.stop()
        bound = re.findall(r"local_rank=0, core ids=(\[[^\]]*\])", server.log_text())

    counts = parameter_count()
    per_step = bytes_read_per_step(dtype.itemsize)
    bandwidth = memory_bandwidth_gbs(cores)
    bandwidth_1 = memory_bandwidth_gbs(1)
    ceiling = bandwidth * 1e9 / per_step
    mode = "eager" if args.eager else "compiled (vLLM default)"
    omp = bound[-1] if bound else "?"
    table(
        f"vLLM {dtype_name}, {mode}, {args.tokens} tokens per stream, "
        f"VLLM_CPU_OMP_THREADS_BIND={args.omp_bind}: vLLM computes on cores {omp} of {cores}",
        ["streams", "tokens/s per stream", "slowest stream", "incl. first token",
         "tokens/s in all", "first token s", "real time (50/s)"],
        [
            [int(r["streams"]), r["decode_rate"], r["min_rate"], r["overall_rate"],
             r["aggregate"], r["ttft"], f"{r['decode_rate'] / REAL_TIME_TOKENS_PER_S:.2f}x"]
            for r in rows
        ],
    )  # fmt: skip
    table(
        "What bounds it",
        ["quantity", "value"],
        [
            ["parameters (layers + tied embedding)",
             f"{(counts['layers'] + counts['embedding']) / 1e6:.0f} M"],
            ["weights read per decode step", f"{per_step / 1e9:.2f} GB"],
            [f"memory bandwidth (tensor copy, {cores} threads)", f"{bandwidth:.1f} GB/s"],
            ["memory bandwidth (tensor copy, 1 thread)", f"{bandwidth_1:.1f} GB/s"],
            [f"bandwidth ceiling, {cores} threads: decode steps per second", f"{ceiling:.1f}"],
            ["bandwidth ceiling, 1 thread: decode steps per second",
             f"{bandwidth_1 * 1e9 / per_step:.1f}"],
            ["measured 1-stream rate / ceiling",
             f"{rows[0]['decode_rate'] / ceiling:.0%}" if rows else "-"],
            ["model written in", f"{build_s:.0f} s"],
            ["server ready after", f"{start_s:.0f} s"],
        ],
    )  # fmt: skip


if __name__ == "__main__":
    main()
