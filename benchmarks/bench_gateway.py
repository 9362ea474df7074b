"""End-to-end gateway benchmark: time to first audio, real-time factor, underrun.

    .venv/bin/python benchmarks/bench_gateway.py [--quick] [--only grid,load,compare,text-in]
        [--llm standin|vllm|both] [--bicodec-dir DIR]
        [--decoders small,full] [--rates 100,200,400] [--streams 1,4,16,64]
        [--requests-per-stream N] [--cell-timeout S] [--full-max-streams N]
        [--full-dir DIR] [--device cpu|cuda] [--decoder-dtype float32|bfloat16|float16]
        [--tokens-per-chunk N] [--time-budget S]

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

"Playback stall" is the silence a listener who starts playing at the first byte
would hear mid-utterance, waiting for audio that has not arrived; "listener hears
the end at" is TTFA + audio + stall. The machine is shared: expect noise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch
import websockets
from report import table  # benchmarks/, the script's own folder

from decoder_gateway.api.protocol import SpeechStreamRequest
from decoder_gateway.codec import BiCodecConfig, BiCodecDecoder, load_decoder
from decoder_gateway.llm.client import LLMClient, SamplingParams
from decoder_gateway.llm.prompt import speaker_prompt
from decoder_gateway.serving.segment import token_budget
from decoder_gateway.settings import Settings
from decoder_gateway.text import split_segments
from decoder_gateway.voices.catalog import Voice, VoiceCatalog
from devtools import GOLDEN_BICODEC
from devtools.gateway_server import GatewayServer
from devtools.standin_llm import StandinProcess
from devtools.tiny_spark_lm import write_model
from devtools.vllm_server import VllmServer, vllm_venv, vllm_venv_problem

SAMPLE_RATE = 16000
BYTES_PER_SECOND = 2 * SAMPLE_RATE  # PCM16 mono
GAP_FLOOR_S = 0.001  # shorter playback gaps are timer noise
VOICE = VoiceCatalog.load().default_voice
TEMPERATURE = SpeechStreamRequest.model_fields["temperature"].default  # the request default
STANDIN_MODEL = "spark-tts"
STANDIN_TOKENS_PER_S = 200.0
STANDIN_PREFILL_S = 0.02
STANDIN_TOKENS_PER_WORD = 10

# Client paragraphs (3 sentences; 2 for the tiny vLLM, whose sentences are all
# `--vllm-semantic-length` tokens long whatever the text).
PARAGRAPHS = [
    "The market opens early on Saturday morning. Farmers bring fresh tomatoes, "
    "onions and bananas from the villages. Most of the stalls are sold out before noon.",
    "Please remember to bring your identity card to the clinic. The nurse will check "
    "your details before you see the doctor. The clinic closes at five in the evening.",
    "Heavy rain is expected across the central region tonight. Drivers should take "
    "care on the roads near the lake. The weather will clear by tomorrow afternoon.",
    "Our school football team won the district final yesterday. The players trained "
    "every evening for three months. The whole village came out to welcome them home.",
    "The new water tank was built with help from the parish council. Each family can "
    "now collect clean water close to home. Children no longer walk miles to the well.",
    "Thank you for calling the farmers' help line. Our advisers can answer questions "
    "about seeds, fertiliser and pests. Please stay on the line and we will be with you soon.",
    "The bus to Kampala leaves the station every hour. Tickets can be bought from the "
    "office or on your phone. Children under five travel for free with an adult.",
    "Wash your hands with soap before you prepare food. Keep drinking water covered and "
    "clean. These small habits protect the whole family from disease.",
]
COMPARE_PARAGRAPH = (
    "Good morning, and welcome to the evening news from Kampala. Parliament has "
    "approved a new budget for roads and schools in the northern districts. "
    "The minister says the first projects will begin before the end of the year."
)


# --------------------------------------------------------------------------------------
# Measuring one response


@dataclass
class Delivery:
    """When each piece of audio reached the client, from the moment the request left.

    A request cut at a time limit keeps what arrived (``cut_s``: when it was cut);
    one that failed keeps its ``error``.
    """

    arrivals: list[tuple[float, int]] = field(default_factory=list)  # (s, PCM bytes)
    total_s: float = 0.0
    started: float = 0.0  # time.perf_counter() when the request left
    cut_s: float | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.cut_s is None and self.error is None and bool(self.arrivals)

    @property
    def ttfa_s(self) -> float:
        return self.arrivals[0][0]

    @property
    def audio_s(self) -> float:
        return sum(size for _, size in self.arrivals) / BYTES_PER_SECOND

    @property
    def rtf(self) -> float:
        return self.total_s / self.audio_s

    def gaps(self) -> list[float]:
        """Underruns of a player that starts at the first byte and plays in real time.

        The player consumes BYTES_PER_SECOND from the first byte on; each time its
        buffer runs dry before the stream has ended, the silence until the next byte
        is one gap (gaps under GAP_FLOOR_S, timer noise, are left out). A request cut
        at a time limit ends with the gap it was in, up to the cut.
        """
        if not self.arrivals:
            return []
        gaps, playing_until = [], self.ttfa_s
        for at, size in self.arrivals:
            if at > playing_until:
                gaps.append(at - playing_until)
                playing_until = at
            playing_until += size / BYTES_PER_SECOND
        if self.cut_s is not None and self.cut_s > playing_until:
            gaps.append(self.cut_s - playing_until)
        return [gap for gap in gaps if gap >= GAP_FLOOR_S]

    @property
    def stall_s(self) -> float:
        """Silence heard mid-utterance by a player that starts at the first byte."""
        return sum(self.gaps())


async def gateway_request(
    client: httpx.AsyncClient, url: str, text: str, delivery: Delivery | None = None
) -> Delivery:
    """One ``POST /v1/audio/speech/stream``, read as fast as it comes.

    ``delivery`` (filled in place) keeps what arrived if the request is cancelled.
    """
    delivery = delivery or Delivery()
    started = delivery.started = time.perf_counter()
    async with client.stream(
        "POST", f"{url}/v1/audio/speech/stream", json={"text": text, "voice": VOICE}
    ) as response:
        if response.status_code != 200:
            body = (await response.aread()).decode(errors="replace")
            raise RuntimeError(f"gateway answered {response.status_code}: {body[:300]}")
        async for chunk in response.aiter_raw():
            if chunk:
                delivery.arrivals.append((time.perf_counter() - started, len(chunk)))
    delivery.total_s = time.perf_counter() - started
    if not delivery.arrivals:
        raise RuntimeError("the gateway sent no audio")
    return delivery


@dataclass
class BaselineTimes:
    llm_s: list[float] = field(default_factory=list)
    decode_s: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)


async def baseline_request(
    llm: LLMClient,
    decoder: BiCodecDecoder,
    voice: Voice,
    settings: Settings,
    text: str,
    times: BaselineTimes,
) -> Delivery:
    """The original server's way: per sentence, generate it all, decode it whole, send."""
    assert voice.global_tokens is not None
    delivery = Delivery()
    started = time.perf_counter()
    for sentence in split_segments(text, max_chars=settings.max_segment_chars):
        sampling = SamplingParams(
            temperature=TEMPERATURE,
            top_p=settings.top_p,
            top_k=settings.top_k,
            repetition_penalty=settings.repetition_penalty,
            max_tokens=min(2048, token_budget(sentence, False)),
        )
        semantic: list[int] = []
        t0 = time.perf_counter()
        async for delta in llm.stream_tokens(speaker_prompt(voice, sentence), sampling):
            semantic += delta.semantic
        t1 = time.perf_counter()
        audio = await asyncio.to_thread(decoder.decode, semantic, voice.global_tokens)
        t2 = time.perf_counter()
        times.llm_s.append(t1 - t0)
        times.decode_s.append(t2 - t1)
        times.tokens.append(len(semantic))
        delivery.arrivals.append((t2 - started, 2 * audio.numel()))
    delivery.total_s = time.perf_counter() - started
    return delivery


# --------------------------------------------------------------------------------------
# Processes and their CPU time


def _proc_stats() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, user + system CPU seconds) of every process we can read."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    return out


def tree_cpu_s(root: int | None) -> float:
    """CPU seconds used so far by ``root`` and its living descendants."""
    if root is None:
        return 0.0
    stats = _proc_stats()
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in stats.items():
        children.setdefault(parent, []).append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            total += stats[pid][1]
        todo += children.get(pid, [])
    return total


def gateway_metrics(url: str) -> dict[str, float]:
    """The gateway's unlabelled-summed Prometheus samples; empty if it has no /metrics."""
    try:
        response = httpx.get(f"{url}/metrics", timeout=5)
    except httpx.HTTPError:
        return {}
    if response.status_code != 200:
        return {}
    samples: dict[str, float] = {}
    for line in response.text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            name = name.split("{", 1)[0]
            try:
                samples[name] = samples.get(name, 0.0) + float(value)
            except ValueError:
                continue
    return samples


def decoder_stats(before: dict[str, float], after: dict[str, float], wall: float) -> list[str]:
    """Mean spans per decoder pass, decoder busy fraction, LLM tokens/s per segment."""

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    passes = delta("tts_decoder_batch_spans_count")
    segments = delta("tts_llm_semantic_tokens_per_second_count")
    if not passes:
        return ["-", "-", "-"]
    rate = delta("tts_llm_semantic_tokens_per_second_sum") / segments if segments else 0.0
    return [
        f"{delta('tts_decoder_batch_spans_sum') / passes:.1f}",
        f"{delta('tts_decoder_batch_seconds_sum') / wall:.0%}",
        f"{rate:.0f}" if segments else "-",
    ]


@dataclass
class Llm:
    name: str
    base_url: str
    model: str
    pid: int | None
    description: str
    tokens_per_sentence: Callable[[str], int]


@contextmanager
def standin_llm(log_dir: Path) -> Iterator[Llm]:
    """The stand-in as its own process (in a thread it would share our GIL)."""
    with StandinProcess(
        log_dir / "standin.log",
        model=STANDIN_MODEL,
        tokens_per_s=STANDIN_TOKENS_PER_S,
        prefill_s=STANDIN_PREFILL_S,
        tokens_per_word=STANDIN_TOKENS_PER_WORD,
    ) as standin:
        yield Llm(
            "stand-in",
            standin.base_url,
            STANDIN_MODEL,
            standin.pid,
            f"stand-in vLLM (separate process): {STANDIN_TOKENS_PER_S:g} tokens/s per stream "
            f"after {STANDIN_PREFILL_S * 1000:g} ms prefill, {STANDIN_TOKENS_PER_WORD} "
            "semantic tokens per word, one token per SSE chunk, no batch limit",
            lambda sentence: max(5, STANDIN_TOKENS_PER_WORD * len(sentence.split())),
        )


@contextmanager
def vllm_llm(log_dir: Path, semantic_length: int) -> Iterator[Llm]:
    problem = vllm_venv_problem()
    if problem:
        raise RuntimeError(problem)
    model_dir = write_model(log_dir / "tiny_spark_lm", semantic_length)
    server = VllmServer(model_dir, log_dir / "vllm.log", max_model_len=4096)
    print(f"\n(starting vLLM on the tiny model, {semantic_length} tokens per sentence ...)")
    with server:
        versions = sorted(vllm_venv().glob("lib/python3*/site-packages/vllm*.dist-info"))
        version = versions[0].name.removesuffix(".dist-info") if versions else "vllm"
        yield Llm(
            "vLLM CPU",
            server.base_url,
            server.served_model_name,
            server.pid,  # the launcher execs vLLM
            f"real vLLM ({version}, CPU, float32) serving the tiny Spark-format model: "
            f"a fixed chain of {semantic_length} semantic tokens "
            f"({semantic_length / 50:g} s of audio) per sentence; "
            f"started in {server.startup_seconds:.0f} s",
            lambda sentence: semantic_length,
        )


# --------------------------------------------------------------------------------------
# Statistics and tables


def median(values: list[float]) -> float:
    return statistics.median(values)


def p90(values: list[float]) -> float:
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=10, method="inclusive")[-1]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}"


# --------------------------------------------------------------------------------------
# The two parts


@dataclass
class Plan:
    load: list[tuple[int, int]]  # (concurrent clients, requests per client)
    compare_repeats: int


async def _load_level(url: str, texts: list[str], clients: int, each: int) -> list[Delivery]:
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    timeout = httpx.Timeout(300.0, connect=10.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:

        async def one_client(i: int) -> list[Delivery]:
            return [
                await gateway_request(client, url, texts[(i + r * clients) % len(texts)])
                for r in range(each)
            ]

        per_client = await asyncio.gather(*(one_client(i) for i in range(clients)))
    return [d for ds in per_client for d in ds]


def run_load(llm: Llm, gateway: GatewayServer, plan: Plan, texts: list[str]) -> None:
    assert gateway.process is not None
    rows = []
    for clients, each in plan.load:
        cpu_gw, cpu_llm = tree_cpu_s(gateway.process.pid), tree_cpu_s(llm.pid)
        cpu_me = time.process_time()
        metrics = gateway_metrics(gateway.url)
        started = time.perf_counter()
        deliveries = asyncio.run(_load_level(gateway.url, texts, clients, each))
        wall = time.perf_counter() - started
        cpu_gw = tree_cpu_s(gateway.process.pid) - cpu_gw
        cpu_llm = tree_cpu_s(llm.pid) - cpu_llm
        cpu_me = time.process_time() - cpu_me
        batch, busy, rate = decoder_stats(metrics, gateway_metrics(gateway.url), wall)
        ttfa = [d.ttfa_s for d in deliveries]
        audio = sum(d.audio_s for d in deliveries)
        rows.append(
            [
                clients,
                len(deliveries),
                f"{audio / len(deliveries):.1f}",
                ms(median(ttfa)),
                ms(p90(ttfa)),
                ms(max(ttfa)),
                f"{median([d.rtf for d in deliveries]):.3f}",
                f"{max(d.rtf for d in deliveries):.3f}",
                f"{median([d.stall_s for d in deliveries]):.2f}",
                f"{audio / wall:.1f}",
                f"{cpu_gw / wall:.2f} / {cpu_llm / wall:.2f} / {cpu_me / wall:.2f}",
                batch,
                busy,
                rate,
            ]
        )
    table(
        f"{llm.name}: concurrent clients, each posting paragraphs back to back",
        [
            "clients",
            "requests",
            "audio per request (s)",
            "TTFA median (ms)",
            "TTFA p90 (ms)",
            "TTFA max (ms)",
            "RTF median",
            "RTF max",
            "playback stall median (s)",
            "audio s per wall s",
            "CPU cores: gateway / LLM / client",
            "spans per decoder pass",
            "decoder busy",
            "LLM tokens/s per segment",
        ],
        rows,
    )


async def _compare_round(
    llm_info: Llm, url: str, decoder: BiCodecDecoder, text: str, times: BaselineTimes
) -> tuple[Delivery, Delivery]:
    settings = Settings()
    voice = VoiceCatalog.load().resolve(VOICE)
    llm = LLMClient(llm_info.base_url, "EMPTY", llm_info.model)
    try:
        await llm.check_token_map()
        async with httpx.AsyncClient(timeout=httpx.Timeout(300.0)) as client:
            ours = await gateway_request(client, url, text)
        theirs = await baseline_request(llm, decoder, voice, settings, text, times)
    finally:
        await llm.close()
    return ours, theirs


def run_compare(llm: Llm, gateway: GatewayServer, decoder: BiCodecDecoder, plan: Plan) -> None:
    text = COMPARE_PARAGRAPH
    sentences = split_segments(text, max_chars=Settings().max_segment_chars)
    # Warm-up of both paths (connections, first decode of each length class).
    asyncio.run(_compare_round(llm, gateway.url, decoder, text, BaselineTimes()))
    times = BaselineTimes()
    ours: list[Delivery] = []
    theirs: list[Delivery] = []
    for _ in range(plan.compare_repeats):
        a, b = asyncio.run(_compare_round(llm, gateway.url, decoder, text, times))
        ours.append(a)
        theirs.append(b)
    rows = []
    for name, runs in (
        ("gateway: token streaming, 2 sentences in flight", ours),
        ("original: sentence by sentence, generate all, decode whole", theirs),
    ):
        rows.append(
            [
                name,
                ms(median([d.ttfa_s for d in runs])),
                f"{ms(min(d.ttfa_s for d in runs))}-{ms(max(d.ttfa_s for d in runs))}",
                f"{median([d.total_s for d in runs]):.2f}",
                f"{median([d.audio_s for d in runs]):.2f}",
                f"{median([d.rtf for d in runs]):.3f}",
                f"{median([d.stall_s for d in runs]):.2f}",
                f"{median([d.ttfa_s + d.audio_s + d.stall_s for d in runs]):.2f}",
            ]
        )
    gain = median([d.ttfa_s for d in theirs]) / median([d.ttfa_s for d in ours])
    table(
        f"{llm.name}: one {len(sentences)}-sentence paragraph "
        f"({len(text.split())} words), median of {plan.compare_repeats}, alone on the server",
        [
            "pipeline",
            "TTFA (ms)",
            "TTFA range (ms)",
            "total (s)",
            "audio (s)",
            "RTF",
            "playback stall (s)",
            "listener hears the end at (s)",
        ],
        rows,
    )
    n = len(sentences)
    print(
        f"\nTTFA {gain:.1f}x lower with the gateway. Baseline per sentence (median): "
        f"LLM {ms(median(times.llm_s))} ms for {int(median(times.tokens))} tokens "
        f"({median(times.tokens) / median(times.llm_s):.0f} tokens/s), whole-sentence "
        f"decode {ms(median(times.decode_s))} ms; tokens per sentence "
        f"{times.tokens[-n:]}. The baseline has no HTTP hop (the gateway's figures include one)."
    )


# -- text streamed in (voice agents) ----------------------------------------------------

AGENT_WORDS_PER_S = 30.0


async def _streamed_in(ws_url: str, text: str) -> tuple[float, float, float]:
    """Feed ``text`` word by word at AGENT_WORDS_PER_S over WS /v1/audio/speech/stream.

    Returns (first audio after the fragment that made the first sentence certain,
    first audio after the first fragment, time the last fragment was sent).
    """
    words = text.split(" ")
    first_sentence = split_segments(text)[0]
    # The first sentence is certain once the first character after it arrives.
    confirming = len(first_sentence.split(" "))
    sent_at: list[float] = []
    first_audio = asyncio.get_running_loop().create_future()

    async def feed(ws: Any) -> None:
        for i, word in enumerate(words):
            await ws.send(json.dumps({"type": "input.text", "text": word + " "}))
            sent_at.append(time.monotonic())
            if i + 1 < len(words):
                await asyncio.sleep(1 / AGENT_WORDS_PER_S)
        await ws.send(json.dumps({"type": "input.done"}))

    async with websockets.connect(f"{ws_url}/v1/audio/speech/stream", max_size=None) as ws:
        config = {"voice": VOICE, "response_format": "pcm", "stream_audio": True}
        await ws.send(json.dumps({"type": "session.config", **config}))
        sender = asyncio.create_task(feed(ws))
        while True:
            message = await ws.recv()
            if isinstance(message, bytes):
                if not first_audio.done():
                    first_audio.set_result(time.monotonic())
            elif json.loads(message)["type"] == "session.done":
                break
        await sender
    heard = first_audio.result()
    return heard - sent_at[confirming], heard - sent_at[0], sent_at[-1] - sent_at[0]


async def _whole(url: str, text: str) -> float:
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0)) as client:
        return (await gateway_request(client, url, text)).ttfa_s


def run_text_in(llm: Llm, gateway: GatewayServer, plan: Plan) -> None:
    text = COMPARE_PARAGRAPH
    first_sentence = split_segments(text)[0]
    asyncio.run(_streamed_in(gateway.ws_url, text))  # warm-up
    streamed, whole_first, whole_reply = [], [], []
    for _ in range(plan.compare_repeats):
        streamed.append(asyncio.run(_streamed_in(gateway.ws_url, text)))
        whole_first.append(asyncio.run(_whole(gateway.url, first_sentence)))
        whole_reply.append(asyncio.run(_whole(gateway.url, text)))
    typing_s = median([s[2] for s in streamed])
    # When the first sentence is certain (its last word + the next one), from the first word.
    certain_s = len(first_sentence.split(" ")) / AGENT_WORDS_PER_S
    rows = [
        [
            "streamed in, word by word (WS /v1/audio/speech/stream)",
            ms(median([s[0] for s in streamed])),
            ms(median([s[1] for s in streamed])),
        ],
        [
            "first sentence sent whole once certain (POST /v1/audio/speech/stream)",
            ms(median(whole_first)),
            ms(certain_s + median(whole_first)),
        ],
        [
            "whole reply sent once written (POST /v1/audio/speech/stream)",
            "-",
            ms(typing_s + median(whole_reply)),
        ],
    ]
    header = [
        "text in",
        "first audio after the first sentence is certain (ms)",
        "first audio after the LLM's first word (ms)",
    ]
    table(
        f"{llm.name}: a reply written at {AGENT_WORDS_PER_S:g} words/s "
        f"({len(text.split())} words, {typing_s:.2f} s to write), median of "
        f"{plan.compare_repeats}",
        header,
        rows,
    )


# -- the grid: decoder x LLM rate x concurrent streams, one table -----------------------

GRID_SECTION = "grid"


@dataclass
class GridPlan:
    decoders: list[str]  # "small" and/or "full"
    rates: list[float]  # stand-in tokens/s per stream
    streams: list[int]
    requests_per_stream: int
    cell_timeout_s: float
    full_max_streams: int | None  # the full decoder skips larger concurrency
    device: str
    dtype: str
    tokens_per_chunk: int
    deadline: float | None = None  # time.monotonic() after which no cell starts


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (0-100) of a non-empty list."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def full_size_decoder(folder: Path | None, scratch: Path) -> Path:
    """The released BiCodec architecture with random weights (bench_decoder's builder).

    ``folder``: use it if it holds a checkpoint, else build into it (kept for later
    runs); None: build into ``scratch``.
    """
    from bench_decoder import random_checkpoint  # benchmarks/, the script's own folder

    target = folder or scratch / "BiCodec-full-random"
    if (target / "model.safetensors").is_file() and (target / "config.yaml").is_file():
        return target
    started = time.perf_counter()
    random_checkpoint(target)
    seconds = time.perf_counter() - started
    print(f"(built the full-size random BiCodec in {seconds:.0f} s)", file=sys.stderr)
    return target


def decoder_parameters(folder: Path) -> int:
    """Decode-path parameters of the BiCodec in ``folder`` (built on the meta device)."""
    with torch.device("meta"):
        model = BiCodecDecoder(BiCodecConfig.from_yaml(folder / "config.yaml"))
    return sum(p.numel() for p in model.parameters())


async def _grid_cell(
    url: str, texts: list[str], streams: int, each: int, timeout_s: float
) -> list[Delivery]:
    """``streams`` clients, each posting ``each`` paragraphs back to back; requests
    still running after ``timeout_s`` are cut (their audio so far is kept)."""
    limits = httpx.Limits(max_connections=streams + 4, max_keepalive_connections=streams + 4)
    deliveries: list[Delivery] = []
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(300.0)) as client:

        async def one_stream(i: int) -> None:
            for r in range(each):
                delivery = Delivery()
                deliveries.append(delivery)
                try:
                    await gateway_request(
                        client, url, texts[(i + r * streams) % len(texts)], delivery
                    )
                except (RuntimeError, httpx.HTTPError) as err:
                    delivery.error = str(err) or type(err).__name__

        tasks = [asyncio.create_task(one_stream(i)) for i in range(streams)]
        _, pending = await asyncio.wait(tasks, timeout=timeout_s)
        cut_at = time.perf_counter()
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    for delivery in deliveries:
        if delivery.error is None and not delivery.total_s:
            delivery.cut_s = cut_at - delivery.started
    return deliveries


def wait_idle(gateway: GatewayServer, standin: StandinProcess, timeout_s: float) -> None:
    """Until the gateway has no stream in progress and the stand-in no completion."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        active = gateway_metrics(gateway.url).get("tts_active_streams", 0.0)
        if active <= 0 and standin.stats().get("running", 0) == 0:
            return
        time.sleep(0.2)
    print(f"(warning: the gateway was still busy {timeout_s:g} s after a cell)")


def grid_row(
    decoder: str,
    rate: float,
    streams: int,
    deliveries: list[Delivery],
    wall: float,
    stats: list[str],
    cpu: tuple[float, ...],
) -> list[object]:
    """One table row; cut requests count their TTFA as the time at the cut (a lower
    bound) and their last gap up to the cut; RTF is over finished requests only."""
    done = [d for d in deliveries if d.finished]
    cut = [d for d in deliveries if d.cut_s is not None]
    failed = [d for d in deliveries if d.error is not None]
    ttfa = [d.ttfa_s if d.arrivals else d.cut_s for d in deliveries if d.error is None]
    ttfa = [t for t in ttfa if t is not None]
    heard = [d for d in deliveries if d.arrivals]
    gaps = [d.gaps() for d in heard]
    gap_s = [sum(g) for g in gaps]
    rtf = [d.rtf for d in done]
    audio = sum(d.audio_s for d in deliveries)
    status = f"{len(done)}/{len(deliveries)}"
    if cut:
        status += f" ({len(cut)} cut)"
    if failed:
        status += f" ({len(failed)} failed)"
    batch, busy, got = stats

    def ms_at(q: float) -> str:
        return ms(percentile(ttfa, q)) if ttfa else "-"

    return [
        decoder,
        f"{rate:g} ({got})",
        streams,
        status,
        ms_at(50),
        ms_at(90),
        ms_at(99),
        f"{percentile(rtf, 50):.2f} / {percentile(rtf, 90):.2f}" if rtf else "-",
        f"{sum(1 for g in gaps if g)}/{len(gaps)}",
        f"{sum(len(g) for g in gaps)} / {max((len(g) for g in gaps), default=0)}",
        (
            f"{percentile(gap_s, 50):.2f} / {percentile(gap_s, 90):.2f} / {max(gap_s):.2f}"
            if gap_s
            else "-"
        ),
        f"{sum(gap_s):.2f}",
        f"{audio / wall:.1f}",
        f"{batch} / {busy}",
        " / ".join(f"{c / wall:.2f}" for c in cpu),
    ]


GRID_HEADER = [
    "decoder",
    "LLM tokens/s per stream: set (got)",
    "streams",
    "requests done/sent",
    "TTFA p50 (ms)",
    "TTFA p90 (ms)",
    "TTFA p99 (ms)",
    "RTF p50 / p90",
    "responses with underrun",
    "underruns: all / most in one response",
    "underrun s per response p50 / p90 / max",
    "underrun s, all responses",
    "audio s per wall s",
    "decoder: spans per pass / busy",
    "CPU cores: gateway / LLM / client",
]


def grid_cell(
    plan: GridPlan,
    gateway: GatewayServer,
    standin: StandinProcess,
    name: str,
    rate: float,
    streams: int,
) -> tuple[list[object], bool]:
    """Run one cell; its table row, and whether any request was cut at the limit."""
    assert gateway.process is not None
    pids = (gateway.process.pid, standin.pid)
    cpu_before = (tree_cpu_s(pids[0]), tree_cpu_s(pids[1]), time.process_time())
    metrics = gateway_metrics(gateway.url)
    started = time.perf_counter()
    deliveries = asyncio.run(
        _grid_cell(gateway.url, PARAGRAPHS, streams, plan.requests_per_stream, plan.cell_timeout_s)
    )
    wall = time.perf_counter() - started
    cpu_after = (tree_cpu_s(pids[0]), tree_cpu_s(pids[1]), time.process_time())
    stats = decoder_stats(metrics, gateway_metrics(gateway.url), wall)
    cpu = tuple(after - before for after, before in zip(cpu_after, cpu_before, strict=True))
    print(
        f"({name} decoder, {rate:g} tokens/s, {streams} streams: {wall:.1f} s)",
        file=sys.stderr,
        flush=True,
    )
    row = grid_row(name, rate, streams, deliveries, wall, stats, cpu)
    return row, any(d.cut_s is not None for d in deliveries)


def run_grid(plan: GridPlan, folders: dict[str, Path], logs: Path, env: dict[str, str]) -> None:
    texts = PARAGRAPHS
    seconds = [
        sum(max(5, STANDIN_TOKENS_PER_WORD * len(s.split())) for s in split_segments(t)) / 50
        for t in texts
    ]
    print(
        f"\n## Decoder x LLM rate x concurrent streams\n\n"
        f"Stand-in vLLM (separate process): {STANDIN_PREFILL_S * 1000:g} ms prefill, then the "
        f"set tokens/s per stream, {plan.tokens_per_chunk} token(s) per SSE chunk, "
        f"{STANDIN_TOKENS_PER_WORD} semantic tokens per word, no batch limit; '(got)': the "
        "mean rate per segment the gateway measured. Each stream (client) posts "
        f"{plan.requests_per_stream} paragraph(s) back to back ({min(seconds):.1f}-"
        f"{max(seconds):.1f} s of audio each); a cell stops at {plan.cell_timeout_s:g} s, "
        "requests still running then are cut (TTFA of a cut request without audio: the time "
        "at the cut, a lower bound). Underrun: each response played in real time from its "
        f"first byte ({BYTES_PER_SECOND} bytes/s); a gap is each time the player runs dry "
        f"before the end (>= {GAP_FLOOR_S * 1000:g} ms), counted and summed per response "
        "(a stream posts its paragraphs one after another: each is one response). "
        "RTF = response wall time / audio seconds, finished requests only. Decoders on "
        f"{plan.device}, {plan.dtype}, one gateway process each, warmed up first."
    )
    for name in plan.decoders:
        folder = folders[name]
        print(f"- {name}: {folder} ({decoder_parameters(folder) / 1e6:.1f} M decode parameters)")
    rows: list[list[object]] = []
    skipped: list[str] = []
    biggest = max(plan.streams)
    with StandinProcess(
        logs / "standin-grid.log",
        model=STANDIN_MODEL,
        tokens_per_s=max(plan.rates),
        prefill_s=STANDIN_PREFILL_S,
        tokens_per_word=STANDIN_TOKENS_PER_WORD,
        tokens_per_chunk=plan.tokens_per_chunk,
    ) as standin:
        for name in plan.decoders:
            cap = plan.full_max_streams if name == "full" else None
            levels = [n for n in plan.streams if cap is None or n <= cap]
            if len(levels) < len(plan.streams):
                skipped.append(f"{name}: streams > {cap} (--full-max-streams)")
            if not levels:
                continue
            with GatewayServer(
                standin.base_url,
                logs,
                start_timeout_s=300.0,
                MODEL_NAME=STANDIN_MODEL,
                BICODEC_DIR=str(folders[name]),
                DECODER_DEVICE=plan.device,
                DECODER_DTYPE=plan.dtype,
                MAX_CONCURRENT_STREAMS=str(biggest + 8),
                LOG_LEVEL="warning",
                **env,
            ) as gateway:
                assert gateway.process is not None
                try:
                    warm = [split_segments(t)[0] for t in texts]
                    for streams in sorted({1, min(4, max(levels))}):
                        asyncio.run(_grid_cell(gateway.url, warm, streams, 1, 120.0))
                    wait_idle(gateway, standin, 60.0)
                    for rate in plan.rates:
                        standin.control(tokens_per_s=rate)
                        cut_below = None  # fewest streams at this rate that were cut
                        for streams in levels:
                            note = None
                            if cut_below is not None:
                                note = f"skipped: cut at {cut_below} streams"
                            elif plan.deadline is not None and (
                                time.monotonic() + plan.cell_timeout_s > plan.deadline
                            ):
                                note = "skipped: --time-budget spent"
                            if note:
                                rows.append([name, f"{rate:g}", streams, note, *["-"] * 11])
                                continue
                            row, cut = grid_cell(plan, gateway, standin, name, rate, streams)
                            rows.append(row)
                            wait_idle(gateway, standin, min(60.0, plan.cell_timeout_s))
                            if cut:  # more streams at this rate would be cut too
                                cut_below = streams
                except Exception:
                    print(f"\nGateway log tail:\n{gateway.log_tail()}")
                    raise
    table("Time to first audio, real-time factor and underrun", GRID_HEADER, rows)
    if skipped:
        print("\nSkipped: " + "; ".join(skipped) + ".")


# --------------------------------------------------------------------------------------


def describe_decoder(folder: Path, decoder: BiCodecDecoder) -> str:
    params = sum(p.numel() for p in decoder.parameters())
    which = "golden small test BiCodec" if folder.resolve() == GOLDEN_BICODEC.resolve() else ""
    label = f"{which}, " if which else ""
    return f"{folder} ({label}{params / 1e6:.2f} M decode parameters, float32, CPU)"


def run_llm(
    llm: Llm,
    decoder_dir: Path,
    decoder: BiCodecDecoder,
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
            asyncio.run(_load_level(gateway.url, texts, 1, 1))  # warm-up
            if "load" in sections:
                run_load(llm, gateway, plan, texts)
            if "compare" in sections:
                run_compare(llm, gateway, decoder, plan)
            if "text-in" in sections:
                run_text_in(llm, gateway, plan)
        except Exception:
            print(f"\nGateway log tail:\n{gateway.log_tail()}")
            raise


SECTIONS = [GRID_SECTION, "load", "compare", "text-in"]


def number_list(kind: type) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        try:
            return [kind(part) for part in text.split(",") if part.strip()]
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from err

    return parse


def grid_plan(args: argparse.Namespace, parser: argparse.ArgumentParser) -> GridPlan:
    """The grid's settings: the flags given, else the --quick or the full defaults."""
    quick = args.quick

    def pick(value: Any, quick_default: Any, full_default: Any) -> Any:
        if value is not None:
            return value
        return quick_default if quick else full_default

    decoders = pick(args.decoders, "small,full", "small,full").split(",")
    unknown = set(decoders) - {"small", "full"}
    if unknown or not decoders:
        parser.error(f"--decoders: small and/or full, not {sorted(unknown)}")
    return GridPlan(
        decoders=decoders,
        rates=pick(args.rates, [200.0], [100.0, 200.0, 400.0]),
        streams=pick(args.streams, [1, 4], [1, 4, 16, 64]),
        requests_per_stream=pick(args.requests_per_stream, 2, 2),
        cell_timeout_s=pick(args.cell_timeout, 60.0, 120.0),
        full_max_streams=pick(args.full_max_streams, 1, None) or None,
        device=args.device,
        dtype=args.decoder_dtype,
        tokens_per_chunk=args.tokens_per_chunk,
        deadline=None if args.time_budget is None else time.monotonic() + args.time_budget,
    )


def main() -> None:
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
    args = parser.parse_args()
    sections = [part for part in args.only.split(",") if part]
    unknown = set(sections) - set(SECTIONS)
    if unknown or not sections:
        parser.error(f"--only: a subset of {SECTIONS}, not {sorted(unknown)}")
    plan = grid_plan(args, parser) if GRID_SECTION in sections else None
    gateway_env = {}
    if args.decoder_threads:
        torch.set_num_threads(args.decoder_threads)
        gateway_env["OMP_NUM_THREADS"] = str(args.decoder_threads)

    settings = Settings()
    cores = len(os.sched_getaffinity(0))
    load1, load5, _ = os.getloadavg()
    print("# Gateway benchmark" + (" (quick)" if args.quick else ""))
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

    if args.quick:
        standin_plan = Plan([(1, 2), (4, 1), (16, 1)], compare_repeats=2)
        vllm_plan = Plan([(1, 2), (4, 1)], compare_repeats=2)
    else:
        standin_plan = Plan([(1, 5), (4, 3), (16, 2)], compare_repeats=5)
        vllm_plan = Plan([(1, 3), (4, 2), (16, 1)], compare_repeats=3)
    # The tiny vLLM's sentences are all the same length; two per paragraph keeps it short.
    vllm_texts = [" ".join(split_segments(p)[:2]) for p in PARAGRAPHS]
    classic = [name for name in sections if name != GRID_SECTION]

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
        print(f"\n(benchmark ran {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
