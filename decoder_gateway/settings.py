"""Every environment variable the gateway reads, typed, with its default.

Read once at start-up (``Settings()``) and passed down; nothing below reads
``os.environ``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=None, extra="ignore", populate_by_name=True)

    # HTTP server
    host: str = "0.0.0.0"
    port: int = Field(8001, ge=1, le=65535)
    log_level: str = "info"

    # The vLLM OpenAI server
    llm_base_url: str = "http://localhost:8000/v1"
    llm_api_key: str = "EMPTY"  # vLLM ignores it unless started with --api-key
    model_name: str = "crestai/spark-tts-nexvox"
    llm_timeout_s: float = Field(30.0, gt=0, description="connect / idle-read timeout")

    # BiCodec weights: BICODEC_DIR, else BiCodec/* of TOKENIZER_REPO from the hub
    bicodec_dir: Path | None = None
    tokenizer_repo: str = "unsloth/Spark-TTS-0.5B"
    tokenizer_cache_dir: Path | None = None
    hf_token: str | None = None
    decoder_device: Literal["auto", "cuda", "cpu"] = "auto"
    decoder_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # Spans per decoder forward pass. On a CPU with the full-size decoder, 1 is faster
    # (padding costs more than batching saves there: benchmarks/bench_decoder.py).
    decoder_max_batch: int = Field(16, ge=1)
    decoder_threads: int | None = Field(None, ge=1, description="torch CPU threads; unset: torch's")

    # Voices: the packaged six, replaced or extended by VOICES_FILE
    voices_file: Path | None = None

    # Sampling defaults (every field is sent explicitly; see PROTOCOL.md)
    top_p: float = Field(0.95, gt=0, le=1)
    top_k: int = Field(50, ge=-1)
    repetition_penalty: float = Field(1.0, gt=0)

    # Streaming decode (tokens at 50 per second)
    stream_first_chunk_tokens: int = Field(10, ge=1)
    stream_first_lookahead_tokens: int = Field(4, ge=0)
    stream_assumed_speedup: float = Field(2.0, ge=1)
    stream_crossfade_samples: int = Field(320, ge=0)

    # Limits
    max_text_chars: int = Field(5000, ge=1)
    max_segment_chars: int = Field(300, ge=20)
    max_tokens_limit: int = Field(4096, ge=1, description="largest max_tokens a request may ask")
    max_concurrent_streams: int = Field(64, ge=1)
    segment_lookahead: int = Field(2, ge=1, description="segments generated ahead of playback")

    # Backpressure: audio chunks buffered per segment for a client that reads slowly,
    # and how long a client may take no audio before its request is cut off
    stream_buffer_chunks: int = Field(8, ge=1)
    slow_client_timeout_s: float = Field(60.0, gt=0)

    # Security
    gateway_api_key: str | None = None  # unset: no authentication
    auth_exempt_paths: str = "/health,/metrics,/web"  # comma-separated, open without a key
    cors_allow_origins: str = ""  # comma-separated origins, "*" for any; empty: no CORS

    # WebSocket sessions
    ws_max_message_bytes: int = Field(65536, ge=1024)
    ws_max_queued_messages: int = Field(8, ge=1, description="messages waiting per connection")
    ws_idle_timeout_s: float = Field(600.0, gt=0, description="close after no message this long")
    ws_ping_interval_s: float = Field(20.0, gt=0)
    ws_ping_timeout_s: float = Field(20.0, gt=0)
    ws_auth_timeout_s: float = Field(10.0, gt=0, description="wait for a first auth message")

    log_format: Literal["text", "json"] = "text"
