"""Measuring: when each piece of audio arrived, the original server's way as a baseline,
CPU time per process tree, and the gateway's own metrics.

Every request of the gateway sections goes through :func:`gateway_request`, so every
table measures the same thing: request sent -> each PCM chunk read.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from decoder_gateway.client import ClientError, GatewayClient
from decoder_gateway.llm.client import LLMClient, SamplingParams
from decoder_gateway.llm.prompt import speaker_prompt
from decoder_gateway.serving.segment import token_budget
from decoder_gateway.settings import Settings
from decoder_gateway.text import split_segments
from decoder_gateway.voices.catalog import Voice
from gateway.decoder import Decoder
from gateway.workload import TEMPERATURE, VOICE

SAMPLE_RATE = 16000
BYTES_PER_SECOND = 2 * SAMPLE_RATE  # PCM16 mono
GAP_FLOOR_S = 0.001  # shorter playback gaps are timer noise


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
    client: GatewayClient, text: str, delivery: Delivery | None = None
) -> Delivery:
    """One ``POST /v1/audio/speech/stream``, read as fast as it comes.

    ``delivery`` (filled in place) keeps what arrived if the request is cancelled. An
    error answer raises :class:`~decoder_gateway.client.ServerError`.
    """
    delivery = delivery or Delivery()
    started = delivery.started = time.perf_counter()
    async with client.speech_stream(text, voice=VOICE) as response:
        async for chunk in response.chunks():
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
    decoder: Decoder,
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
        text = asyncio.run(_metrics_text(url))
    except ClientError:
        return {}
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            name = name.split("{", 1)[0]
            try:
                samples[name] = samples.get(name, 0.0) + float(value)
            except ValueError:
                continue
    return samples


async def _metrics_text(url: str) -> str:
    async with GatewayClient(url, timeout_s=5.0) as client:
        return await client.metrics()


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
