"""``python -m decoder_gateway``: read the settings, serve with uvicorn."""

from __future__ import annotations

import sys

import uvicorn
from pydantic import ValidationError

from .app import create_app
from .logs import configure
from .serving.voices import check_voice_aliases
from .settings import Settings, SettingsConflict
from .voice_library import VoiceLibrary
from .voices import VoiceCatalog


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
    """Voice settings that need the catalog and the library (VOICE_ALIASES)."""
    try:
        check_voice_aliases(
            settings.alias_map(),
            VoiceCatalog.load(settings.voices_file),
            VoiceLibrary(settings.library_folder()),
        )
    except (SettingsConflict, ValueError, OSError) as err:
        sys.exit(f"decoder_gateway: invalid settings\n  {err}")


def main() -> None:
    settings = read_settings()
    check_voices(settings)
    log_config = configure(settings.log_level, settings.log_format)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        log_config=log_config,
        # The protocol-level cap is generous: the route answers messages over
        # WS_MAX_MESSAGE_BYTES with an error frame and keeps the connection.
        ws_max_size=max(16 * settings.ws_max_message_bytes, 1 << 20),
        ws_ping_interval=settings.ws_ping_interval_s,
        ws_ping_timeout=settings.ws_ping_timeout_s,
    )


if __name__ == "__main__":
    main()
