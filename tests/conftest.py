"""Shared fixtures: the tiny Spark-format LM, one real vLLM CPU server per session, the
fault-injecting stand-in, and real gateway processes on loopback."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from devtools.gateway_server import GatewayServer
from devtools.standin_llm import StandinServer
from devtools.tiny_spark_lm import write_model
from devtools.vllm_server import VllmServer, VllmServerError, vllm_venv_problem


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of the tiny deterministic Spark-format LM (built once per session)."""
    return write_model(tmp_path_factory.mktemp("tiny_spark_lm"))


@pytest.fixture(scope="session")
def vllm_server(
    tiny_lm_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[VllmServer]:
    """The real vLLM CPU server (via ``launch_vllm.sh``) serving the tiny LM."""
    problem = vllm_venv_problem()
    if problem:
        pytest.fail(problem, pytrace=False)
    log_path = tmp_path_factory.mktemp("vllm_logs") / "vllm.log"
    # --enable-log-requests: vLLM then logs "Aborted request(s) <id>", which the
    # disconnect tests look for.
    server = VllmServer(
        tiny_lm_dir,
        log_path,
        max_model_len=2048,
        extra_env={"EXTRA_VLLM_ARGS": "--enable-log-requests"},
    )
    try:
        server.start()
    except VllmServerError as err:
        pytest.fail(str(err), pytrace=False)
    try:
        yield server
    finally:
        server.stop()


# -- the gateway against the fault-injecting stand-in ------------------------------

STANDIN_MODEL = "spark-tts"


@pytest.fixture(scope="session")
def standin_server() -> Iterator[StandinServer]:
    """One stand-in LLM server per session; ``llm`` resets it for each test."""
    with StandinServer(model=STANDIN_MODEL, tokens_per_s=2000, prefill_s=0.005) as server:
        yield server


@pytest.fixture
def llm(standin_server: StandinServer) -> StandinServer:
    standin_server.reset()
    return standin_server


@pytest.fixture(scope="session")
def gateway(
    standin_server: StandinServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayServer]:
    """The real gateway process (uvicorn on loopback) talking to the stand-in."""
    logs = tmp_path_factory.mktemp("gateway_logs")
    # The count schedule alone (no buffer thresholds): a chunk planned for a short buffer
    # depends on timing, and the tests of this gateway compare the audio of separate
    # requests sample by sample.
    with GatewayServer(
        standin_server.base_url,
        logs,
        MODEL_NAME=STANDIN_MODEL,
        STREAM_MIN_BUFFER_MS="0",
        STREAM_TARGET_BUFFER_MS="0",
    ) as server:
        yield server


@pytest.fixture
def make_gateway(
    standin_server: StandinServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., GatewayServer]]:
    """Start extra gateways with their own settings; stopped after the test."""
    started: list[GatewayServer] = []

    def start(llm_base_url: str | None = None, **env: str) -> GatewayServer:
        env.setdefault("MODEL_NAME", STANDIN_MODEL)
        server = GatewayServer(
            llm_base_url or standin_server.base_url, tmp_path_factory.mktemp("gw"), **env
        )
        started.append(server.start())
        return server

    yield start
    for server in started:
        server.stop()
