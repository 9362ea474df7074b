"""Start and stop the real vLLM (CPU build) OpenAI server through ``launch_vllm.sh``.

The server runs from the vLLM virtual environment given by ``VLLM_VENV``
(default ``<repo>/.venv-vllm``), whose ``bin`` goes first on ``PATH`` so that the
``python3`` the launcher runs is that venv's.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import httpx

from devtools.paths import LAUNCHER, REPO
from devtools.process import HOST, ServerProcess, ServerStartError, free_port

__all__ = ["VllmServer", "VllmServerError", "free_port", "vllm_venv", "vllm_venv_problem"]

REPO_ROOT = REPO
DEFAULT_SERVED_NAME = "tiny-spark"
DEFAULT_START_TIMEOUT_S = 180.0


class VllmServerError(ServerStartError):
    """The server could not be started."""


def vllm_venv() -> Path:
    """Path of the vLLM virtual environment (``VLLM_VENV`` or ``<repo>/.venv-vllm``)."""
    return Path(os.environ.get("VLLM_VENV") or REPO / ".venv-vllm")


def vllm_venv_problem(venv: Path | None = None) -> str | None:
    """Return why the vLLM venv is unusable, or ``None`` when it looks fine."""
    venv = venv or vllm_venv()
    python = venv / "bin" / "python3"
    if not python.exists():
        return (
            f"vLLM virtual environment not found at {venv} (no bin/python3); create it with "
            "scripts/setup_vllm_env.sh or point VLLM_VENV at one"
        )
    spec = venv / "lib"
    if not any(spec.glob("python3*/site-packages/vllm/__init__.py")):
        return f"vLLM is not installed in {venv}; run scripts/setup_vllm_env.sh {venv}"
    return None


class VllmServer(ServerProcess):
    """One vLLM OpenAI server process serving ``model_dir``; use as a context manager."""

    error_type = VllmServerError

    def __init__(
        self,
        model_dir: Path | str,
        log_path: Path | str,
        *,
        served_model_name: str = DEFAULT_SERVED_NAME,
        port: int | None = None,
        max_model_len: int = 512,
        venv: Path | None = None,
        extra_env: Mapping[str, str] | None = None,
        start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
    ) -> None:
        """Prepare (but do not start) a server; see :meth:`start`."""
        self.model_dir = Path(model_dir)
        self.served_model_name = served_model_name
        self.port = port or free_port()
        self.max_model_len = max_model_len
        self.venv = venv or vllm_venv()
        self.extra_env = dict(extra_env or {})
        super().__init__(
            "vLLM",
            ["bash", str(LAUNCHER)],
            log_path=log_path,
            health_url=f"{self.url}/health",
            env=self.environment(),
            cwd=REPO,
            start_timeout_s=start_timeout_s,
            stop_timeout_s=20.0,
            poll_s=0.5,
            new_session=True,  # own process group: stop() reaches the engine too
        )

    @property
    def url(self) -> str:
        """Root URL of the server (``/health``, ``/metrics``, ``/tokenize`` live here)."""
        return f"http://{HOST}:{self.port}"

    @property
    def base_url(self) -> str:
        """OpenAI base URL (``.../v1``)."""
        return f"{self.url}/v1"

    def environment(self) -> dict[str, str]:
        """Environment the launcher runs with."""
        env = dict(os.environ)
        env.update(
            {
                "PATH": f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
                "VIRTUAL_ENV": str(self.venv),
                "MODEL_NAME": str(self.model_dir),
                "SERVED_MODEL_NAME": self.served_model_name,
                "DTYPE": "float32",
                "MAX_MODEL_LEN": str(self.max_model_len),
                "VLLM_HOST": HOST,
                "VLLM_PORT": str(self.port),
                "VLLM_CPU_KVCACHE_SPACE": "1",
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
                "VLLM_NO_USAGE_STATS": "1",
                "DO_NOT_TRACK": "1",
                "PYTHONUNBUFFERED": "1",
            }
        )
        for key in ("PYTHONPATH", "PYTHONHOME", "VLLM_API_KEY", "EXTRA_VLLM_ARGS"):
            env.pop(key, None)
        env.update(self.extra_env)
        return env

    def start(self, timeout_s: float | None = None) -> VllmServer:
        """Start the server and wait until ``GET /health`` answers 200."""
        problem = vllm_venv_problem(self.venv)
        if problem:
            raise VllmServerError(problem)
        return super().start(timeout_s)

    def metrics(self) -> str:
        """The Prometheus text of ``GET /metrics``."""
        response = httpx.get(f"{self.url}/metrics", timeout=10.0)
        response.raise_for_status()
        return response.text
