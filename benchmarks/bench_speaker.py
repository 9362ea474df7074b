"""BiCodec speaker encoder benchmark: a 6 s reference clip at 44.1 kHz -> 32 global tokens.

    python benchmarks/bench_speaker.py [--device cuda] [--repeats 5]

Prints one table: for the golden-size checkpoint (tests/data/bicodec/golden_speaker)
and for the released architecture (real_config.yaml, random weights), the memory
the encoder adds to the process (RSS after load minus before), and the time to
prepare the clip (resample 44.1 -> 16 kHz, volume, 6 s) and to run the network
(medians; "best" is the fastest run, the steadier figure on a shared machine).
The ECAPA network is full size in both (it is always 512 channels); only the
perceiver's width differs, so their times are close. Each model is measured in a
fresh process, so that one's freed memory does not hide the other's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
from report import table  # benchmarks/, the script's own folder

from decoder_gateway.codec import SpeakerEncoder, SpeakerEncoderConfig, load_speaker_encoder
from devtools import REPO

DATA = REPO / "tests" / "data" / "bicodec"
CLIP_RATE = 44100
CLIP_SECONDS = 6.0


def rss_mb() -> float:
    """Resident set size now (not the high-water mark): what a load keeps."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def speech_like_clip(seconds: float, rate: int) -> np.ndarray:
    """A voiced-sounding test signal: a gliding 110-220 Hz pitch with 30 harmonics,
    syllable-rate amplitude envelope and a little noise; peak 0.8."""
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * rate)) / rate
    pitch = 150 + 40 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    harmonics = sum(np.sin(k * phase) / k for k in range(1, 31))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t) ** 2
    clip = harmonics * envelope + 0.02 * rng.standard_normal(t.size)
    return 0.8 * clip / np.abs(clip).max()


def random_released(device: str) -> SpeakerEncoder:
    torch.manual_seed(0)
    model = SpeakerEncoder(SpeakerEncoderConfig.from_yaml(DATA / "real_config.yaml"))
    return model.to(device).eval().requires_grad_(False)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


MODELS = {
    "golden": (
        "golden_speaker (D=16, loaded)",
        lambda device: load_speaker_encoder(DATA / "golden_speaker", device=device),
    ),
    "released": ("released arch (D=128, random init)", random_released),
}


def measure(model: str, device: str, repeats: int) -> list[object]:
    """One table row, for one model, in this process."""
    name, build = MODELS[model]
    clip = speech_like_clip(CLIP_SECONDS, CLIP_RATE)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.init()  # the CUDA context is not the encoder's memory
    before, before_gpu = rss_mb(), torch.cuda.memory_allocated() if cuda else 0
    started = time.perf_counter()
    encoder = build(device)
    sync(device)
    load_s = time.perf_counter() - started
    added = rss_mb() - before
    added_gpu = (torch.cuda.memory_allocated() - before_gpu) / 2**20 if cuda else None
    parameters = sum(p.numel() for p in encoder.parameters()) / 1e6

    encoder.global_tokens(clip, CLIP_RATE)  # warm-up: allocator, kernels, FFT plans
    prepare_ms, network_ms, total_ms = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ref = encoder.prepare(clip, CLIP_RATE)
        sync(device)
        t1 = time.perf_counter()
        tokens = encoder.encode(ref)[0].tolist()
        sync(device)
        t2 = time.perf_counter()
        prepare_ms.append(1e3 * (t1 - t0))
        network_ms.append(1e3 * (t2 - t1))
        total_ms.append(1e3 * (t2 - t0))
    assert len(tokens) == encoder.config.token_num
    total = statistics.median(total_ms)
    return [
        name,
        f"{parameters:.2f}",
        f"{load_s:.2f}",
        f"{added:.0f}",
        "-" if added_gpu is None else f"{added_gpu:.0f}",
        f"{statistics.median(prepare_ms):.1f}",
        f"{statistics.median(network_ms):.1f}",
        f"{total:.1f}",
        f"{min(total_ms):.1f}",
        f"{CLIP_SECONDS * 1e3 / total:.0f}x",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--one", choices=sorted(MODELS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    if args.one:  # the child process: print one row as JSON
        print(json.dumps(measure(args.one, args.device, args.repeats)))
        return
    print(
        f"# BiCodec speaker encoder benchmark: device {args.device}, float32, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{CLIP_SECONDS:g} s clip at {CLIP_RATE} Hz, median of {args.repeats}"
    )
    rows = []
    for model in MODELS:
        child = [sys.executable, __file__, "--one", model, "--device", args.device]
        result = subprocess.run(
            [*child, "--repeats", str(args.repeats)], capture_output=True, text=True, check=True
        )
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    table(
        "clip -> 32 global tokens",
        [
            "model",
            "params (M)",
            "load/build (s)",
            "RSS added (MB)",
            "CUDA alloc (MB)",
            "prepare (ms)",
            "network (ms)",
            "total (ms)",
            "best total (ms)",
            "x real time",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
