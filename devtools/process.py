"""A server as a child process: started, waited for until healthy, logged, stopped.

:class:`ServerProcess` is the one helper behind every server the tests and the
benchmarks start (the gateway, vLLM, the stand-in LLM as a process)::

    with ServerProcess("echo", [sys.executable, "-m", "http.server", str(port)],
                       log_path=tmp / "echo.log",
                       health_url=f"http://127.0.0.1:{port}/") as server:
        ...

Its output goes to ``log_path``; a start that fails (the process exits, or its
health endpoint does not answer in time) stops it and raises
:class:`ServerStartError` with the tail of that log.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import httpx

from devtools.paths import REPO

HOST = "127.0.0.1"
S = TypeVar("S", bound="ServerProcess")


class ServerStartError(RuntimeError):
    """A server process could not be started (the message ends with its log tail)."""


def free_port(host: str = HOST) -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a text file (empty when it cannot be read)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def wait_until(
    check: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.05
) -> None:
    """Poll ``check`` until it holds; TimeoutError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached after {timeout_s:g} s")
        time.sleep(poll_s)


class ServerProcess:
    """One server process; use as a context manager, or ``start()`` / ``stop()``.

    ``health_url`` is polled until it answers with one of ``ready_statuses`` (None:
    any HTTP answer counts, for servers whose health endpoint says 503 while a
    dependency is away). ``new_session`` puts the process in its own process group
    so that :meth:`stop` reaches its children too (vLLM's engine and workers).
    A stopped server can be started again (on the same port, if its command says so).
    """

    error_type: type[ServerStartError] = ServerStartError

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        *,
        log_path: Path | str,
        health_url: str,
        env: Mapping[str, str] | None = None,
        cwd: Path | str = REPO,
        ready_statuses: Collection[int] | None = (200,),
        start_timeout_s: float = 60.0,
        stop_timeout_s: float = 10.0,
        poll_s: float = 0.2,
        new_session: bool = False,
    ) -> None:
        self.name = name
        self.command = list(command)
        self.log_path = Path(log_path)
        self.health_url = health_url
        self.env = dict(os.environ if env is None else env)
        self.cwd = Path(cwd)
        self.ready_statuses = None if ready_statuses is None else frozenset(ready_statuses)
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.poll_s = poll_s
        self.new_session = new_session
        self.process: subprocess.Popen[bytes] | None = None
        self.startup_seconds: float | None = None

    # ---- state ----------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The process id while started (None before start and after stop)."""
        return None if self.process is None else self.process.pid

    def running(self) -> bool:
        """Whether the process is started and has not exited."""
        return self.process is not None and self.process.poll() is None

    def healthy(self) -> bool:
        """Whether the health endpoint answers now (with a ready status)."""
        try:
            response = httpx.get(self.health_url, timeout=2.0)
        except httpx.HTTPError:
            return False
        return self.ready_statuses is None or response.status_code in self.ready_statuses

    def log_text(self) -> str:
        """The whole log so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the log."""
        return tail(self.log_path, lines)

    # ---- start / stop -----------------------------------------------------------------

    def start(self: S, timeout_s: float | None = None) -> S:
        """Start the process and wait until it is healthy (``error_type`` if it is not)."""
        if self.running():
            raise self.error_type(f"{self.name} already started (pid {self.pid})")
        timeout_s = self.start_timeout_s if timeout_s is None else timeout_s
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        with self.log_path.open("wb") as log:  # the child keeps its own copy of the fd
            self.process = subprocess.Popen(
                self.command,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=self.new_session,
            )
        try:
            self._wait_healthy(started + timeout_s, timeout_s)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        return self

    def _wait_healthy(self, deadline: float, timeout_s: float) -> None:
        process = self.process
        assert process is not None
        while True:
            code = process.poll()
            if code is not None:
                raise self.error_type(
                    f"{self.name} exited with code {code} during start-up; "
                    f"log {self.log_path}:\n{self.log_tail(60)}"
                )
            if self.healthy():
                return
            if time.monotonic() > deadline:
                raise self.error_type(
                    f"{self.name} not healthy after {timeout_s:g} s; "
                    f"log {self.log_path}:\n{self.log_tail(60)}"
                )
            time.sleep(self.poll_s)

    def stop(self, timeout_s: float | None = None) -> None:
        """Terminate (SIGTERM), then kill (SIGKILL) after ``timeout_s``; reap it."""
        process, self.process = self.process, None
        if process is None:
            return
        timeout_s = self.stop_timeout_s if timeout_s is None else timeout_s
        for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10.0)):
            if process.poll() is not None:
                break
            self._signal(process, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(wait_s)
        if self.new_session:  # children share the group: make sure none survive
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def kill(self) -> None:
        """Stop at once with SIGKILL, as a crash would; reap it."""
        process, self.process = self.process, None
        if process is None:
            return
        self._signal(process, signal.SIGKILL)
        process.wait()

    def _signal(self, process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            if self.new_session:
                os.killpg(process.pid, sig)
            else:
                process.send_signal(sig)

    def __enter__(self: S) -> S:
        if not self.running():
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
