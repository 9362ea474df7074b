"""FastAPI app factory: the lifespan builds the shared pipeline once; routers stay thin."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import torch
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from decoder_gateway.api import (
    errors,
    http_stream,
    info,
    openai_speech,
    seed_ws,
    text_in_ws,
    voices,
    web,
)
from decoder_gateway.api.auth import APIKeyMiddleware
from decoder_gateway.api.middleware import BodySizeLimit, WebSocketOriginCheck
from decoder_gateway.codec import (
    SpeakerEncoder,
    SpeakerEncoderUnavailable,
    load_decoder,
    load_speaker_encoder,
    resolve_bicodec_dir,
)
from decoder_gateway.codec.runtime.worker import DecodeWorker
from decoder_gateway.errors import GatewayError
from decoder_gateway.llm.client import LLMClient
from decoder_gateway.metrics import Metrics
from decoder_gateway.serving import SpeechService
from decoder_gateway.serving.admission import StreamSlots
from decoder_gateway.serving.design import VoiceDesigner
from decoder_gateway.serving.gateway import Gateway
from decoder_gateway.settings import Settings
from decoder_gateway.voices.catalog import VoiceCatalog
from decoder_gateway.voices.library import VoiceLibrary
from decoder_gateway.voices.service import VoiceService

logger = logging.getLogger(__name__)


def pick_device(setting: str) -> str:
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("DECODER_DEVICE=cuda but torch sees no CUDA device")
    return setting


def decoder_threads(setting: int | None, device: str) -> int | None:
    """PyTorch's CPU threads: DECODER_THREADS, else for a decoder on the CPU half the
    cores this process may run on (None: PyTorch's own choice).

    A decode pass is many small kernels, and threads that share their cores with the
    event loop, the LLM or anything else wait on each other: on 2 cores one thread
    kept every admitted stream playing where two did not (docs/performance.md).
    """
    if setting:
        return setting
    if device != "cpu":
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // 2)


async def build_gateway(settings: Settings) -> Gateway:
    catalog = VoiceCatalog.load(settings.voices_file)
    folder = await asyncio.to_thread(
        resolve_bicodec_dir,
        settings.bicodec_dir,
        settings.tokenizer_repo,
        settings.tokenizer_cache_dir,
        settings.hf_token,
    )
    device = pick_device(settings.decoder_device)
    threads = decoder_threads(settings.decoder_threads, device)
    if threads is not None:
        torch.set_num_threads(threads)
    if settings.decoder_cuda_graphs and device != "cuda":
        raise RuntimeError("DECODER_CUDA_GRAPHS=true but the decoder runs on the CPU")
    decoder = await asyncio.to_thread(
        functools.partial(
            load_decoder,
            folder,
            device,
            getattr(torch, settings.decoder_dtype),
            batch_tokens=settings.decoder_batch_tokens,
            cuda_graphs=settings.decoder_cuda_graphs,
        )
    )
    encoder, encoder_problem = await asyncio.to_thread(_load_speaker_encoder, folder, device)
    metrics = Metrics()
    llm = LLMClient(
        settings.llm_base_url,
        settings.llm_api_key,
        settings.model_name,
        settings.llm_timeout_s,
        on_abort=metrics.upstream_aborts.inc,
    )
    try:
        await llm.check_token_map()
    except GatewayError as err:  # vLLM may still be starting: /health will retry
        logger.warning("token ids not checked yet: %s", err.message)
    worker = DecodeWorker(decoder, settings.decoder_max_batch, metrics)
    worker.start()
    library = VoiceLibrary(settings.library_folder(), keep_clips=settings.keep_voice_clips)
    await asyncio.to_thread(library.cleanup_stale)
    voice_service = VoiceService(settings, catalog, library, encoder, metrics, encoder_problem)
    speech = SpeechService(settings, llm, worker, voice_service, metrics)
    # Designs take their slots from the speech service's: they are speech work too.
    designer = VoiceDesigner(settings, llm, worker, speech.slots, metrics)
    return Gateway(settings, voice_service, llm, decoder, worker, speech, metrics, designer)


def _load_speaker_encoder(folder: Path, device: str) -> tuple[SpeakerEncoder | None, str | None]:
    """The speaker encoder for cloning, or None and why (the packaged voices work anyway)."""
    try:
        return load_speaker_encoder(folder, device), None
    except SpeakerEncoderUnavailable as err:
        logger.warning("voice cloning off: %s", err)
        return None, "the BiCodec checkpoint has no speaker encoder"


def stream_slots(app: FastAPI) -> StreamSlots | None:
    """The stream slots of ``app``, for draining at shutdown; None until its start-up has
    built the gateway."""
    gateway: Gateway | None = getattr(app.state, "gateway", None)
    return None if gateway is None else gateway.speech.slots


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gateway = await build_gateway(settings)
        app.state.gateway = gateway
        logger.info(
            "gateway ready: %d voices, decoder on %s, LLM %s at %s",
            len(gateway.voices.catalog),
            gateway.decoder.device,
            settings.model_name,
            settings.llm_base_url,
        )
        try:
            yield
        finally:
            await gateway.worker.close()
            await gateway.voices.close()
            await gateway.llm.close()

    app = FastAPI(
        title="Spark-TTS decoder gateway",
        description="Streaming text-to-speech for African languages (Spark-TTS on vLLM).",
        version="0.1.0",
        lifespan=lifespan,
    )
    errors.install(app)
    # Added last = outermost: bodies are bounded and foreign WebSocket origins refused
    # before anything else runs.
    if settings.gateway_api_key:
        exempt = [p.strip() for p in settings.auth_exempt_paths.split(",") if p.strip()]
        app.add_middleware(APIKeyMiddleware, api_key=settings.gateway_api_key, exempt_paths=exempt)
    origins = [o.strip() for o in settings.cors_allow_origins.split(",") if o.strip()]
    if origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "X-API-Key", "X-Request-Id"],
            expose_headers=[
                "X-Request-Id",
                "X-Sample-Rate",
                "X-Bit-Depth",
                "X-Channels",
                "X-Voice-Global-Tokens",
            ],
        )
        # CORS does not cover WebSockets: browsers connect from any page unless the
        # server checks the handshake's Origin itself.
        app.add_middleware(WebSocketOriginCheck, allowed_origins=origins)
    app.add_middleware(
        BodySizeLimit, max_bytes=settings.max_request_body_bytes, per_path=settings.body_limits()
    )
    for module in (info, http_stream, seed_ws, text_in_ws, openai_speech, voices, web):
        app.include_router(module.router)
    return app
