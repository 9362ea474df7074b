"""``python -m decoder_gateway``: read the settings, serve with uvicorn.

Shutdown (SIGTERM, or a first Ctrl-C) drains: the listening socket closes at once (new
connections are refused), idle keep-alive connections are closed, HTTP responses in
progress run to their end, and WebSocket sessions stay open until no synthesis runs in
the process, then get close code 1012 (service restart). Whatever still runs after
SHUTDOWN_GRACE_S is cut. The process then exits with status 0.

uvicorn (0.54) drains HTTP the same way, but closes every WebSocket at once with 1012,
which would cut the syntheses they carry: hence :class:`DrainingServer`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import signal
import socket
import sys
import tempfile
from collections.abc import Callable
from types import FrameType

import uvicorn
from pydantic import ValidationError

from decoder_gateway.app import create_app, stream_slots
from decoder_gateway.logs import configure
from decoder_gateway.serving.admission import StreamSlots
from decoder_gateway.settings import Settings, SettingsConflict
from decoder_gateway.voices.catalog import VoiceCatalog
from decoder_gateway.voices.library import VoiceLibrary
from decoder_gateway.voices.service import check_voice_aliases

logger = logging.getLogger("uvicorn.error")
# uvicorn's exit status when the app did not start (the lifespan failed).
STARTUP_FAILURE = 3


def read_settings() -> Settings:
    """Settings from the environment; exits with a message naming the variables."""
    try:
        return Settings()
    except ValidationError as err:
        lines = []
        for error in err.errors():
            names = ".".join(str(part).upper() for part in error["loc"])
            message = error["msg"].removeprefix("Value error, ")
            lines.append(f"  {names}: {message}" if names else f"  {message}")
        sys.exit("decoder_gateway: invalid settings\n" + "\n".join(lines))


def check_voices(settings: Settings) -> None:
    """Voice settings that need the catalog and the library (VOICE_ALIASES), and a voice
    folder the gateway can write: cloned voices are stored there."""
    folder = settings.library_folder()
    try:
        check_voice_aliases(
            settings.alias_map(),
            VoiceCatalog.load(settings.voices_file),
            VoiceLibrary(folder),
        )
    except (SettingsConflict, ValueError, OSError) as err:
        sys.exit(f"decoder_gateway: invalid settings\n  {err}")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        sys.exit(
            "decoder_gateway: invalid settings\n  VOICE_LIBRARY_DIR: the voice folder "
            f"{folder} cannot be written ({err.strerror or err})"
        )


def _is_websocket(connection: object) -> bool:
    """Whether one of uvicorn's connections is a WebSocket (any of its implementations)."""
    return type(connection).__module__.startswith("uvicorn.protocols.websockets.")


class DrainingServer(uvicorn.Server):
    """uvicorn's server whose shutdown lets running syntheses finish, WebSockets included.

    ``busy()`` says whether a synthesis runs in the process; ``drain()`` makes new
    ones refused (a WebSocket session may ask for one while the others finish); the
    grace period is the config's ``timeout_graceful_shutdown`` (None: no limit).
    """

    def __init__(
        self, config: uvicorn.Config, busy: Callable[[], bool], drain: Callable[[], None]
    ) -> None:
        super().__init__(config)
        self.busy, self.drain = busy, drain

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        loop = asyncio.get_running_loop()
        grace = self.config.timeout_graceful_shutdown
        deadline = loop.time() + (math.inf if grace is None else grace)
        logger.info("Shutting down: new connections refused, running streams get %s s", grace)
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        self.drain()
        state = self.server_state
        asked: set[object] = set()  # connections told to close once done
        while (state.connections or state.tasks) and not self.force_exit:
            if loop.time() >= deadline:
                break
            # HTTP: idle keep-alive connections close now, responses in progress at
            # their end. WebSockets: once no synthesis runs (a session may send its next
            # message meanwhile), all of them, with 1012.
            idle = not self.busy()
            for connection in list(state.connections):
                if connection not in asked and (idle or not _is_websocket(connection)):
                    asked.add(connection)
                    connection.shutdown()
            await asyncio.sleep(0.1)
        if not (state.connections or state.tasks):
            for server in self.servers:
                await server.wait_closed()
        elif not self.force_exit:
            logger.error(
                "Grace period of %s s over: cutting %d connection(s), %d task(s)",
                grace,
                len(state.connections),
                len(state.tasks),
            )
            for connection in list(state.connections):
                if connection not in asked:
                    connection.shutdown()
            for task in list(state.tasks):
                task.cancel(msg="shutdown grace period over")
            await asyncio.sleep(0.1)  # let the cancelled tasks close their transports
        if not self.force_exit:
            await self.lifespan.shutdown()


def _busy(slots: Callable[[], StreamSlots | None]) -> Callable[[], bool]:
    def busy() -> bool:
        current = slots()
        return current is not None and current.active > 0

    return busy


def _drain(slots: Callable[[], StreamSlots | None]) -> Callable[[], None]:
    def drain() -> None:
        current = slots()
        if current is not None:
            current.draining = True

    return drain


def _drained(signum: int, frame: FrameType | None) -> None:
    """SIGTERM after uvicorn's shutdown: nothing left to do (exit status 0)."""


def main() -> None:
    settings = read_settings()
    check_voices(settings)
    log_config = configure(settings.log_level, settings.log_format)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        log_config=log_config,
        # The protocol-level cap is generous: the route answers messages over
        # WS_MAX_MESSAGE_BYTES with an error frame and keeps the connection.
        ws_max_size=max(16 * settings.ws_max_message_bytes, 1 << 20),
        ws_ping_interval=settings.ws_ping_interval_s,
        ws_ping_timeout=settings.ws_ping_timeout_s,
        timeout_graceful_shutdown=settings.shutdown_grace_s,
    )
    slots = functools.partial(stream_slots, app)
    server = DrainingServer(config, _busy(slots), _drain(slots))
    # uvicorn raises the signal it stopped for again once it has shut down, with the
    # handler it found: the default one would end a drained process with "killed by
    # SIGTERM" (143) instead of 0.
    signal.signal(signal.SIGTERM, _drained)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    if not server.started:
        sys.exit(STARTUP_FAILURE)


if __name__ == "__main__":
    main()
