"""The LLM the run's gateway talks to: the stand-in as a process, or the real vLLM CPU."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from devtools.process import free_port
from devtools.standin_llm import StandinProcess
from devtools.tiny_spark_lm import write_model
from devtools.vllm_server import VllmServer, vllm_venv_problem

from .clients import (
    HOST,
    NO_FAULT_MARKER,
    STANDIN_MODEL,
    STANDIN_TOKENS_PER_WORD,
    VLLM_SEMANTIC_LENGTH,
)


class StandinLLM:
    """The stand-in as a subprocess on a fixed port; can be killed and started again."""

    kind = "standin"
    model = STANDIN_MODEL
    supports_control = True

    def __init__(self, log_dir: Path, tokens_per_s: float, prefill_s: float) -> None:
        self.port = free_port()
        self.root_url = f"http://{HOST}:{self.port}"
        self.base_url = f"{self.root_url}/v1"
        self.log_dir = log_dir
        self.tokens_per_s = tokens_per_s
        self.prefill_s = prefill_s
        self.server: StandinProcess | None = None
        self.generation = 0
        self.totals: Counter[str] = Counter()  # stats of the instances that are gone
        self.running_at_stop = 0  # streams in flight when an instance was stopped
        self.description = (
            f"stand-in vLLM (subprocess): {tokens_per_s:g} tokens/s per stream after "
            f"{prefill_s * 1000:g} ms prefill, {STANDIN_TOKENS_PER_WORD} tokens per word"
        )

    def start(self) -> None:
        self.generation += 1
        self.server = StandinProcess(
            self.log_dir / f"standin-{self.generation}.log",
            port=self.port,
            model=STANDIN_MODEL,
            tokens_per_s=self.tokens_per_s,
            prefill_s=self.prefill_s,
            tokens_per_word=STANDIN_TOKENS_PER_WORD,
            fault_exclude=NO_FAULT_MARKER,
        ).start()

    def stop(self, graceful: bool) -> None:
        """SIGTERM (then SIGKILL after 3 s) when graceful, else SIGKILL at once."""
        stats = self.stats()
        if stats:
            self.running_at_stop += int(stats.get("running", 0))
            self.totals.update(
                {k: v for k, v in stats.items() if isinstance(v, int) and k != "running"}
            )
        server, self.server = self.server, None
        if server is None:
            return
        if graceful:
            server.stop(timeout_s=3.0)
        else:
            server.kill()

    def stats(self) -> dict[str, Any] | None:
        if self.server is None:
            return None
        try:
            data = self.server.stats()
        except (httpx.HTTPError, ValueError):
            return None
        data.pop("requests", None)
        data.pop("last_request", None)
        return data

    def running_requests(self) -> int | None:
        stats = self.stats()
        return None if stats is None else int(stats["running"])

    def control(self, **settings: Any) -> bool:
        if self.server is None:
            return False
        try:
            self.server.control(**settings)
        except httpx.HTTPError:
            return False
        return True

    def summary(self) -> dict[str, Any]:
        final = self.stats() or {}
        totals = Counter(self.totals)
        totals.update({k: v for k, v in final.items() if isinstance(v, int) and k != "running"})
        keys = ("received", "rejected", "started", "completed", "aborted", "errored", "dropped")
        return {
            "instances": self.generation,
            **{k: totals.get(k, 0) for k in keys},
            "running_when_killed": self.running_at_stop,
        }


class VllmLLM:
    """The real vLLM CPU server on the tiny model, on a fixed port."""

    kind = "vllm"
    supports_control = False

    def __init__(self, log_dir: Path) -> None:
        problem = vllm_venv_problem()
        if problem:
            raise RuntimeError(problem)
        self.model_dir = write_model(log_dir / "tiny_spark_lm", VLLM_SEMANTIC_LENGTH)
        self.log_dir = log_dir
        self.port = free_port()
        self.server: VllmServer | None = None
        self.generation = 0
        self.model = "tiny-spark"
        self.root_url = f"http://{HOST}:{self.port}"
        self.base_url = f"{self.root_url}/v1"
        self.running_at_stop = 0
        self.description = (
            f"real vLLM (CPU) on the tiny Spark-format model, {VLLM_SEMANTIC_LENGTH} "
            "semantic tokens per sentence"
        )

    def start(self) -> None:
        self.generation += 1
        self.server = VllmServer(
            self.model_dir,
            self.log_dir / f"vllm-{self.generation}.log",
            served_model_name=self.model,
            port=self.port,
            max_model_len=2048,
        )
        self.server.start()

    def stop(self, graceful: bool) -> None:
        running = self.running_requests()
        self.running_at_stop += running or 0
        server, self.server = self.server, None
        if server is not None:
            server.stop(timeout_s=5.0 if graceful else 0.0)

    def stats(self) -> dict[str, Any] | None:
        return None

    def running_requests(self) -> int | None:
        try:
            text = httpx.get(f"{self.root_url}/metrics", timeout=5.0).text
        except httpx.HTTPError:
            return None
        values = re.findall(r"^vllm:num_requests_running(?:\{[^}]*\})? ([0-9.eE+-]+)$", text, re.M)
        return round(sum(float(v) for v in values)) if values else None

    def control(self, **settings: Any) -> bool:
        return False

    def summary(self) -> dict[str, Any]:
        return {"instances": self.generation, "running_when_killed": self.running_at_stop}


LLM = StandinLLM | VllmLLM
