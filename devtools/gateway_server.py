"""Run the real gateway (``python -m decoder_gateway``, uvicorn) on loopback."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from devtools.paths import GOLDEN_BICODEC, REPO
from devtools.process import HOST, ServerProcess, free_port

__all__ = ["FAULTY_GATEWAY_MODULE", "GOLDEN_BICODEC", "REPO", "GatewayServer", "free_port"]

GATEWAY_MODULE = "decoder_gateway"
FAULTY_GATEWAY_MODULE = "devtools.faulty_gateway"


class GatewayServer(ServerProcess):
    """A gateway process on a free loopback port; ``env`` adds to or overrides its
    environment (the golden-small decoder on the CPU unless told otherwise).

    ``faulty=True`` starts :mod:`devtools.faulty_gateway` instead: the
    same gateway, whose decoder fails for the voice ``decoder_fault``.
    """

    def __init__(
        self,
        llm_base_url: str,
        log_dir: Path,
        *,
        faulty: bool = False,
        start_timeout_s: float = 60.0,
        **env: str,
    ) -> None:
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.ws_url = f"ws://{HOST}:{self.port}"
        self.faulty = faulty
        module = FAULTY_GATEWAY_MODULE if faulty else GATEWAY_MODULE
        super().__init__(
            "the gateway" + (" (faulty)" if faulty else ""),
            [sys.executable, "-m", module],
            log_path=Path(log_dir) / f"gateway-{self.port}.log",
            # The port opens once the lifespan (decoder load) is done: any answer means
            # up (/health is 503 while the LLM is away, others may want a key).
            health_url=f"{self.url}/health",
            ready_statuses=None,
            env={
                **os.environ,
                "HOST": HOST,
                "PORT": str(self.port),
                "LLM_BASE_URL": llm_base_url,
                "BICODEC_DIR": str(GOLDEN_BICODEC),
                "DECODER_DEVICE": "cpu",
                "MODEL_NAME": "tiny-spark",
                "LOG_LEVEL": "info",
                "PYTHONUNBUFFERED": "1",
                # Its own voice library, never the user's (~/.cache/...).
                "VOICE_LIBRARY_DIR": str(Path(log_dir) / f"voices-{self.port}"),
                **env,
            },
            cwd=REPO,
            start_timeout_s=start_timeout_s,
        )
