"""The LLM behind the gateway: the stand-in at a GPU-like rate, or vLLM on a tiny model.

Each runs as its own process, as in a deployment: in a thread, the stand-in would share
the client's GIL and slow both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from devtools.standin_llm import StandinProcess
from devtools.tiny_spark_lm import write_model
from devtools.vllm_server import VllmServer, vllm_venv, vllm_venv_problem
from gateway.workload import (
    STANDIN_MODEL,
    STANDIN_PREFILL_S,
    STANDIN_TOKENS_PER_S,
    STANDIN_TOKENS_PER_WORD,
)


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
