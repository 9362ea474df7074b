"""Voice library benchmark: uploads per second with concurrent clients, end to end.

    python benchmarks/bench_voice_uploads.py [--clients 8] [--seconds 20]

Starts a real gateway process (uvicorn) with the golden speaker-encoder checkpoint
(its ECAPA network is full size, 512 channels, as released) and a fresh voice
library, then has ``--clients`` clients upload a 6 s clip at 44.1 kHz (WAV, 530 kB)
under new names for ``--seconds``: every upload is decoded, resampled, cloned and
stored, then deleted again by the same client. Prints uploads per second, upload
latency, the gateway's memory before and after, and the clone time the gateway's
own metric saw (tts_voice_clone_seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import tempfile
import time
import wave
from pathlib import Path

import httpx
import numpy as np
from report import table  # benchmarks/, the script's own folder

from devtools.gateway_server import GatewayServer
from devtools.paths import GOLDEN_SPEAKER

CLIP_RATE = 44100


def speech_like_clip(seconds: float = 6.0) -> bytes:
    """A 16-bit WAV of amplitude-modulated harmonics: voiced-looking, never silent."""
    t = np.arange(int(CLIP_RATE * seconds)) / CLIP_RATE
    pitch = 140 + 20 * np.sin(2 * np.pi * 0.5 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / CLIP_RATE
    voiced = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2
    samples = 0.3 * voiced * envelope / np.abs(voiced).max()
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(CLIP_RATE)
        out.writeframes((samples * 32767).astype("<i2").tobytes())
    return buffer.getvalue()


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def metric_sum(url: str, name: str) -> tuple[float, float]:
    """(sum, count) of a histogram in the gateway's /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        for suffix in ("_sum", "_count"):
            if line.startswith(name + suffix + " "):
                values[suffix] = float(line.split()[1])
    return values.get("_sum", 0.0), values.get("_count", 0.0)


async def client(url: str, index: int, clip: bytes, until: float, latencies: list[float]) -> int:
    done = 0
    async with httpx.AsyncClient(timeout=60) as http:
        while time.monotonic() < until:
            name = f"bench_{index}_{done}"
            started = time.monotonic()
            response = await http.post(
                f"{url}/v1/audio/voices",
                files={"audio_sample": ("clip.wav", clip, "audio/wav")},
                data={"name": name},
            )
            latencies.append(time.monotonic() - started)
            response.raise_for_status()
            (await http.delete(f"{url}/v1/audio/voices/{name}")).raise_for_status()
            done += 1
    return done


async def run(url: str, clients: int, seconds: float, clip: bytes) -> tuple[int, list[float]]:
    latencies: list[float] = []
    until = time.monotonic() + seconds
    counts = await asyncio.gather(*(client(url, i, clip, until, latencies) for i in range(clients)))
    return sum(counts), latencies


HEADER = [
    "uploads",
    "uploads/s",
    "latency p50 (s)",
    "p90 (s)",
    "clone mean (ms)",
    "gateway RSS before / after (MiB)",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    clip = speech_like_clip()
    with tempfile.TemporaryDirectory() as folder:
        env = {"BICODEC_DIR": str(GOLDEN_SPEAKER), "VOICE_LIBRARY_DIR": f"{folder}/voices"}
        # No LLM is needed to clone: /health stays 503, the library works.
        with GatewayServer("http://127.0.0.1:9/v1", Path(folder), **env) as gateway:
            assert gateway.process is not None
            pid = gateway.process.pid
            asyncio.run(run(gateway.url, 1, 0.5, clip))  # warm up
            before = rss_mib(pid)
            started = time.monotonic()
            uploads, latencies = asyncio.run(run(gateway.url, args.clients, args.seconds, clip))
            wall = time.monotonic() - started
            after = rss_mib(pid)
            clone_sum, clone_count = metric_sum(gateway.url, "tts_voice_clone_seconds")
    latencies.sort()
    table(
        f"Voice uploads, {args.clients} concurrent clients, {args.seconds:g} s, "
        f"6 s clip at 44.1 kHz ({len(clip) // 1024} KiB WAV)",
        HEADER,
        [
            [
                uploads,
                uploads / wall,
                statistics.median(latencies),
                latencies[int(0.9 * (len(latencies) - 1))],
                1000 * clone_sum / max(clone_count, 1),
                f"{before:.0f} / {after:.0f}",
            ]
        ],
    )


if __name__ == "__main__":
    main()
