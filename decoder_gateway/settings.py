"""Every environment variable the gateway reads, typed, with its default.

Read once at start-up (``Settings()``) and passed down; nothing below reads
``os.environ``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Sentence-sized segments are what the fine-tunes were trained on; a segment of
# 1000 characters is already over a minute of speech.
MAX_SEGMENT_CHARS_BOUND = 1000
# Speech runs at about 15 characters and 50 semantic tokens per second: a segment
# needs about 3.3 tokens per character, and MAX_TOKENS_LIMIT must allow that.
MIN_TOKENS_PER_CHAR = 3
# The longest chunk is 1 s of audio (50 tokens): a client reading at playback speed
# may take that long to make room for one send, so the send deadline must be longer.
MIN_SLOW_CLIENT_TIMEOUT_S = 2.0
# UTF-8 takes up to 4 bytes per character; the rest of a request's JSON is small.
MAX_BYTES_PER_CHAR, JSON_OVERHEAD_BYTES = 4, 1024


ALIAS_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


class SettingsConflict(ValueError):
    """Settings that are valid one by one but contradict each other."""


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
    # A decoder batch: at most this many spans, and at most this many tokens of wave
    # generator window (unset: the device's fastest in bench_decoder.py, 64 on a CPU and
    # 4096 on CUDA for the released decoder, more for a narrower one). Big windows
    # batched thrash a CPU's cache; small ones share it.
    decoder_max_batch: int = Field(64, ge=1)
    decoder_batch_tokens: int | None = Field(None, ge=1)
    # Replay chunk decodes from CUDA graphs (one per bucket of shapes): on a GPU a
    # chunk's decode is launch-bound. Off until measured on the GPU you run on
    # (benchmarks/bench_decoder.py --device cuda --only graphs).
    decoder_cuda_graphs: bool = False
    decoder_threads: int | None = Field(None, ge=1, description="torch CPU threads; unset: torch's")

    # Voices: the packaged six, replaced or extended by VOICES_FILE
    voices_file: Path | None = None
    # Cloned voices: one JSON file each in this folder (a volume shared by replicas);
    # unset: decoder_gateway/voices under the user's cache folder.
    voice_library_dir: Path | None = None
    keep_voice_clips: bool = False  # also store each uploaded clip beside its voice
    # Other names for voices, "alloy=swahili_male,echo=acholi_female": clients that only
    # know OpenAI's voice names (pipecat, LiveKit) can then reach every voice.
    voice_aliases: str = ""
    max_clip_bytes: int = Field(10 * 1024 * 1024, ge=1024, description="POST /v1/audio/voices")
    max_inline_clip_bytes: int = Field(
        512 * 1024, ge=0, description="ref_audio on the speech endpoints (0: refused)"
    )
    # Voice design (POST /v1/audio/voices/design): voices made from style labels with
    # the controllable prompt. Off by default: only the base model SparkAudio/Spark-TTS-0.5B
    # was trained for it; the speaker fine-tunes were not and write no valid voice.
    voice_design: bool = False
    # Design generations sent with vLLM structured outputs: a grammar over token ids
    # (decoder_gateway/llm/grammar.py) lets the model write only the design's shape,
    # exactly 32 global tokens among them. Needs vLLM 0.10.2 or later (0.32 measured:
    # benchmarks/bench_vllm_cpu.py --only design); off: the model writes freely and a
    # wrong count is retried once, then refused.
    design_structured_outputs: bool = True

    # Sampling defaults (every field is sent explicitly; see PROTOCOL.md)
    top_p: float = Field(0.95, gt=0, le=1)
    top_k: int = Field(50, ge=-1)
    repetition_penalty: float = Field(1.0, gt=0)

    # Streaming decode (tokens at 50 per second)
    stream_first_chunk_tokens: int = Field(10, ge=1)
    stream_first_lookahead_tokens: int = Field(4, ge=0)
    stream_assumed_speedup: float = Field(2.0, ge=1)
    stream_crossfade_samples: int = Field(320, ge=0)
    # First chunk chosen by time: its look-ahead is what arrives this long after the
    # first token (at the measured rate); unset: the count above.
    stream_first_audio_budget_ms: float | None = Field(None, gt=0)
    # A listener with less audio ahead than the target gets its audio before look-ahead
    # (chunks at 16 tokens of it); one with less than the minimum gets its next chunk
    # from the tokens there are, rather than a stall. 0: the count schedule alone.
    stream_min_buffer_ms: float = Field(300.0, ge=0)
    stream_target_buffer_ms: float = Field(1000.0, ge=0)

    # Limits
    max_text_chars: int = Field(5000, ge=1)
    max_segment_chars: int = Field(300, ge=20, le=MAX_SEGMENT_CHARS_BOUND)
    max_tokens_limit: int = Field(4096, ge=1, description="largest max_tokens a request may ask")
    max_concurrent_streams: int = Field(64, ge=1)
    # Admission by measured capacity (serving/capacity.py): a stream is admitted while
    # the LLM and the decoder, as measured, keep every admitted stream ahead of its
    # listener; otherwise it waits up to ADMISSION_QUEUE_S, then gets 429.
    admission_control: bool = True
    admission_queue_s: float = Field(2.0, ge=0)
    admission_headroom: float = Field(0.1, ge=0)
    admission_cold_streams: int = Field(4, ge=1)
    admission_margin_s: float = Field(0.3, ge=0)
    segment_lookahead: int = Field(2, ge=1, description="segments generated ahead of playback")
    # Send each segment's urgency (its listener's buffer, in 100 ms steps) as vLLM's
    # request priority. Only for a vLLM started with SCHEDULING_POLICY=priority (any
    # other refuses a priority); measured in docs/performance.md.
    llm_priority: bool = False

    # Backpressure: audio chunks buffered per segment for a client that reads slowly,
    # and how long one send to a client may wait (its receive window closed) before
    # the request is cut off. Only time blocked in a send counts: waiting for the LLM
    # or the decoder is the server's delay, never the client's.
    stream_buffer_chunks: int = Field(8, ge=1)
    slow_client_timeout_s: float = Field(60.0, ge=MIN_SLOW_CLIENT_TIMEOUT_S)
    max_request_body_bytes: int = Field(65536, ge=1024, description="larger HTTP bodies: 413")

    # Security
    gateway_api_key: str | None = None  # unset: no authentication
    auth_exempt_paths: str = "/health,/livez,/metrics,/web"  # comma-separated, open without a key
    cors_allow_origins: str = ""  # comma-separated origins, "*" for any; empty: no CORS

    # WebSocket sessions
    ws_max_message_bytes: int = Field(65536, ge=1024)
    ws_max_queued_messages: int = Field(8, ge=1, description="messages waiting per connection")
    ws_idle_timeout_s: float = Field(600.0, gt=0, description="close after no message this long")
    ws_ping_interval_s: float = Field(20.0, gt=0)
    ws_ping_timeout_s: float = Field(20.0, gt=0)
    ws_auth_timeout_s: float = Field(10.0, gt=0, description="wait for a first auth message")

    log_format: Literal["text", "json"] = "text"

    # Shutdown (SIGTERM): the listening socket closes at once, and the syntheses in
    # progress (HTTP streams and WebSocket sessions) get this long to finish before they
    # are cut. A Kubernetes terminationGracePeriodSeconds must cover it plus preStop.
    shutdown_grace_s: float = Field(30.0, ge=0, description="time running streams get on SIGTERM")

    def alias_map(self) -> dict[str, str]:
        """VOICE_ALIASES as {alias: voice id}; a malformed entry raises ValueError."""
        aliases: dict[str, str] = {}
        for entry in filter(None, (part.strip() for part in self.voice_aliases.split(","))):
            alias, sep, voice = (piece.strip() for piece in entry.partition("="))
            if not sep or not ALIAS_NAME.fullmatch(alias) or not ALIAS_NAME.fullmatch(voice):
                raise ValueError(
                    f"VOICE_ALIASES entry {entry!r} is not alias=voice (names of A-Z a-z 0-9 _ -)"
                )
            if alias in aliases:
                raise ValueError(f"VOICE_ALIASES names {alias!r} twice")
            aliases[alias] = voice
        return aliases

    def library_folder(self) -> Path:
        if self.voice_library_dir is not None:
            return self.voice_library_dir
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        return cache / "decoder_gateway" / "voices"

    def body_limits(self) -> dict[str, int]:
        """Largest HTTP body per path (others: MAX_REQUEST_BODY_BYTES). Uploads carry a
        clip; speech requests may carry an inline one as base64 (4 bytes per 3)."""
        inline = self.max_request_body_bytes + -(-4 * self.max_inline_clip_bytes // 3)
        return {
            "/v1/audio/voices": self.max_clip_bytes + JSON_OVERHEAD_BYTES * 64,
            "/v1/audio/speech": inline,
            "/v1/audio/speech/stream": inline,
        }

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        """Check the settings against each other at start-up, naming the variables."""
        problems = []
        if self.max_segment_chars > self.max_text_chars:
            problems.append(
                f"MAX_SEGMENT_CHARS={self.max_segment_chars} is over "
                f"MAX_TEXT_CHARS={self.max_text_chars}"
            )
        if self.decoder_cuda_graphs and self.decoder_device == "cpu":
            problems.append("DECODER_CUDA_GRAPHS=true needs CUDA, but DECODER_DEVICE=cpu")
        needed = MIN_TOKENS_PER_CHAR * self.max_segment_chars
        if self.max_tokens_limit < needed:
            problems.append(
                f"MAX_TOKENS_LIMIT={self.max_tokens_limit} cannot hold the speech of a "
                f"MAX_SEGMENT_CHARS={self.max_segment_chars} segment (about "
                f"{MIN_TOKENS_PER_CHAR} tokens per character: at least {needed}); raise "
                "MAX_TOKENS_LIMIT or lower MAX_SEGMENT_CHARS"
            )
        largest_text = MAX_BYTES_PER_CHAR * self.max_text_chars + JSON_OVERHEAD_BYTES
        for name, value in (
            ("MAX_REQUEST_BODY_BYTES", self.max_request_body_bytes),
            ("WS_MAX_MESSAGE_BYTES", self.ws_max_message_bytes),
        ):
            if value < largest_text:
                problems.append(
                    f"{name}={value} cannot carry a text of MAX_TEXT_CHARS="
                    f"{self.max_text_chars} characters (up to {largest_text} bytes as JSON)"
                )
        if self.max_inline_clip_bytes > self.max_clip_bytes:
            problems.append(
                f"MAX_INLINE_CLIP_BYTES={self.max_inline_clip_bytes} is over "
                f"MAX_CLIP_BYTES={self.max_clip_bytes}"
            )
        try:
            self.alias_map()
        except ValueError as err:
            problems.append(str(err))
        if problems:
            raise SettingsConflict("settings contradict each other: " + "; ".join(problems))
        return self
