"""Paths of a checkout that the test tooling uses (``tests/data``, ``launch_vllm.sh``)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
"""The root of the checkout: devtools lives in it and is never installed elsewhere."""

GOLDEN_BICODEC = REPO / "tests" / "data" / "bicodec" / "golden_small"
"""The small BiCodec checkpoint of the released architecture, with golden outputs."""

LAUNCHER = REPO / "launch_vllm.sh"
"""The script that starts vLLM from environment variables (compose and tests)."""

GOLDEN_SPEAKER = REPO / "tests" / "data" / "bicodec" / "golden_speaker"
"""A small BiCodec checkpoint with the speaker encoder (cloning), with golden outputs."""
