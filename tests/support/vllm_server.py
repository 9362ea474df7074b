"""Start and stop the real vLLM (CPU build) OpenAI server through ``launch_vllm.sh``.

The server runs from the vLLM virtual environment given by ``VLLM_VENV``
(default ``<repo>/.venv-vllm``), whose ``bin`` goes first on ``PATH`` so that the
``python3`` the launcher runs is that venv's.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

REPO_ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = REPO_ROOT / "launch_vllm.sh"
DEFAULT_SERVED_NAME = "tiny-spark"
DEFAULT_START_TIMEOUT_S = 180.0


class VllmServerError(RuntimeError):
    """The server could not be started."""


def vllm_venv() -> Path:
    """Path of the vLLM virtual environment (``VLLM_VENV`` or ``<repo>/.venv-vllm``)."""
    return Path(os.environ.get("VLLM_VENV") or REPO_ROOT / ".venv-vllm")


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


def free_port() -> int:
    """Return a TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, lines: int = 60) -> str:
    """Return the last ``lines`` lines of a text file (empty if missing)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class VllmServer:
    """One vLLM OpenAI server process serving ``model_dir``; use as a context manager."""

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
        self.log_path = Path(log_path)
        self.served_model_name = served_model_name
        self.port = port or free_port()
        self.max_model_len = max_model_len
        self.venv = venv or vllm_venv()
        self.extra_env = dict(extra_env or {})
        self.start_timeout_s = start_timeout_s
        self.startup_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Root URL of the server (``/health``, ``/metrics``, ``/tokenize`` live here)."""
        return f"http://127.0.0.1:{self.port}"

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
                "VLLM_HOST": "127.0.0.1",
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

    def start(self) -> VllmServer:
        """Start the server and wait until ``GET /health`` answers 200."""
        if self._proc is not None:
            raise VllmServerError("server already started")
        problem = vllm_venv_problem(self.venv)
        if problem:
            raise VllmServerError(problem)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        with self.log_path.open("wb") as log:
            self._proc = subprocess.Popen(
                ["bash", str(LAUNCHER)],
                cwd=REPO_ROOT,
                env=self.environment(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: stop() reaches the engine too
            )
        try:
            self._wait_healthy(started)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        return self

    def _wait_healthy(self, started: float) -> None:
        """Poll ``/health`` until it answers, the process dies or time runs out."""
        assert self._proc is not None
        deadline = started + self.start_timeout_s
        while True:
            code = self._proc.poll()
            if code is not None:
                raise VllmServerError(
                    f"vLLM exited with code {code} during start-up; log {self.log_path}:\n"
                    + _tail(self.log_path)
                )
            if self.healthy():
                return
            if time.monotonic() > deadline:
                raise VllmServerError(
                    f"vLLM not healthy after {self.start_timeout_s:.0f} s; log {self.log_path}:\n"
                    + _tail(self.log_path)
                )
            time.sleep(0.5)

    def healthy(self) -> bool:
        """Whether ``GET /health`` answers 200 now."""
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                return bool(resp.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def metrics(self) -> str:
        """The Prometheus text of ``GET /metrics``."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as resp:
            return str(resp.read().decode())

    def log_tail(self, lines: int = 60) -> str:
        """The last lines of the server log."""
        return _tail(self.log_path, lines)

    def stop(self, timeout_s: float = 20.0) -> None:
        """Terminate the server's process group, then kill it if it lingers."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10.0)):
            if proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(wait_s)
        # Children (engine core, workers) share the group; make sure none survive.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    def __enter__(self) -> VllmServer:
        """Start the server (if not yet started) and return it."""
        if self._proc is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the server."""
        self.stop()
