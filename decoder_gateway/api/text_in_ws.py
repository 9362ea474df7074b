"""WS /v1/audio/speech/stream: text streamed in as an LLM writes it, speech streamed out.

The messages are those of vLLM-Omni's streaming-text WebSocket, so clients written
for it work unchanged:

* client: ``session.config`` (first, and again between utterances), ``input.text``
  (any fragment, even part of a word), ``input.done`` (end of the utterance: flush;
  the connection stays open), ``session.close``;
* server: per sentence ``audio.start``, binary audio, ``audio.done``; per utterance
  ``session.done``; ``error`` frames that never end the session.

A sentence goes to the LLM as soon as its boundary is certain (see
``serving/utterance.py``), while earlier ones play; utterances play in the order they
were sent. Audio is PCM16 at 16 kHz: token-level chunks with ``stream_audio: true``,
else one frame per sentence; ``response_format: wav`` (the default) gives each
sentence's audio as a WAV file (its header in the first frame when streaming).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import wave
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import ValidationError

from decoder_gateway.api.errors import ws_error_frame
from decoder_gateway.api.protocol import (
    AudioDone,
    AudioStart,
    ErrorMessage,
    InputText,
    SessionConfig,
    SessionDone,
)
from decoder_gateway.api.ws_session import (
    Connection,
    auth_reply,
    authenticate,
    decode_message,
    validation_frame,
)
from decoder_gateway.audio.encoders import AudioPipeline, wav_header
from decoder_gateway.audio.pcm import PCM_SAMPLE_WIDTH, to_pcm16
from decoder_gateway.errors import GatewayError, InvalidRequest, SlowClient
from decoder_gateway.serving import Audio, SegmentEnd, SegmentStart, SpeechStream
from decoder_gateway.serving.utterance import Utterance
from decoder_gateway.voices.catalog import Voice

router = APIRouter()
logger = logging.getLogger(__name__)

ENDPOINT = "text_stream"


def whole_wav(pcm: bytes, sample_rate: int) -> bytes:
    """A complete WAV file (exact sizes) of PCM16 mono."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(PCM_SAMPLE_WIDTH)
        out.setframerate(sample_rate)
        out.writeframes(pcm)
    return buffer.getvalue()


class SentenceAudio:
    """One sentence's audio on the wire: speed change, PCM16, WAV framing."""

    def __init__(self, config: SessionConfig, sample_rate: int) -> None:
        self.config = config
        self.sample_rate = sample_rate
        self.bytes_sent = 0
        self._held = bytearray()  # a whole sentence, when not streaming
        self._pipeline = (
            None
            if config.speed == 1.0
            else AudioPipeline("pcm", sample_rate, sample_rate, config.speed)
        )

    async def push(self, samples: Any) -> bytes:
        """The bytes to send now for these samples (empty when the sentence is held)."""
        if self._pipeline is None:
            pcm = to_pcm16(samples)
        else:
            pcm = await asyncio.to_thread(self._pipeline.push, samples)
        return self._frame(pcm)

    async def finish(self) -> bytes:
        """The sentence's last bytes: the rest of the speed filter, or the whole sentence."""
        pcm = b"" if self._pipeline is None else await asyncio.to_thread(self._pipeline.finish)
        if self.config.stream_audio:
            return self._frame(pcm)
        pcm = bytes(self._held) + pcm
        return whole_wav(pcm, self.sample_rate) if self.config.response_format == "wav" else pcm

    async def close(self) -> None:
        if self._pipeline is not None:
            await asyncio.to_thread(self._pipeline.close)

    def _frame(self, pcm: bytes) -> bytes:
        if not self.config.stream_audio:
            self._held += pcm
            return b""
        if pcm and self.bytes_sent == 0 and self.config.response_format == "wav":
            return wav_header(self.sample_rate) + pcm  # a streaming WAV: sizes unknown
        return pcm


class TextStreamSession:
    """One connection: its configuration, the utterance being written, the players."""

    def __init__(self, conn: Connection, gateway: Any) -> None:
        self.conn = conn
        self.gateway = gateway
        self.settings = gateway.settings
        self.service = gateway.speech
        self.config = SessionConfig()
        self.voice: Voice | None = None  # resolved from the config on first use
        self.utterance: Utterance | None = None  # receiving text (until input.done)
        self.utterance_index = -1
        # Players not yet finished, in order (finished ones are dropped: a voice agent's
        # session may last for hundreds of utterances).
        self._players: list[asyncio.Task[None]] = []

    @property
    def busy(self) -> bool:
        return self.utterance is not None or any(not p.done() for p in self._players)

    async def run(self) -> None:
        idle = self.settings.ws_idle_timeout_s
        while self.conn.stalled is None:
            try:
                raw = await asyncio.wait_for(self.conn.ws.receive(), idle)
            except TimeoutError:
                if self.busy:  # playing or mid-utterance: the session is not idle
                    continue
                await self.conn.ws.close(code=1000, reason=f"idle for {idle:.0f} s")
                return
            if raw["type"] == "websocket.disconnect":
                return
            data = decode_message(raw, self.settings.ws_max_message_bytes)
            if isinstance(data, ErrorMessage):
                await self.conn.send(data)
                continue
            try:
                if await self.handle(data) is False:
                    return
            except ValidationError as err:
                await self.conn.send(validation_frame(err))
            except GatewayError as err:
                await self.conn.send(ws_error_frame(err))

    async def handle(self, data: dict[str, Any]) -> bool:
        """One client message; False ends the session."""
        kind = data.get("type")
        if kind == "input.text":
            await self.text(InputText.model_validate(data).text)
        elif kind == "input.done":
            await self.done()
        elif kind == "session.config":
            await self.configure(SessionConfig.model_validate(data))
        elif kind == "session.close":
            if self.utterance is not None:
                await self.done()
            await asyncio.gather(*self._players, return_exceptions=True)
            with contextlib.suppress(RuntimeError, WebSocketDisconnect):
                await self.conn.ws.close(code=1000)
            return False
        elif kind == "auth":
            await self.conn.send(auth_reply(data, self.settings.gateway_api_key))
        else:
            await self.conn.send(
                ErrorMessage(
                    message=f"unknown message type {kind!r}: send session.config, input.text, "
                    "input.done or session.close",
                    code="invalid_message",
                )
            )
        return True

    async def configure(self, config: SessionConfig) -> None:
        if self.utterance is not None:
            raise InvalidRequest(
                "session.config while an utterance is being written is refused (its text is "
                "kept): send input.done first"
            )
        voice = await self.service.voices.resolve(config.voice, config.speaker_id)
        if config.ref_audio is not None:
            voice = await self.service.voices.inline(config.ref_audio, voice)
        self.service.check_max_tokens(config.max_tokens or config.max_new_tokens)
        self.config, self.voice = config, voice

    async def text(self, fragment: str) -> None:
        if self.utterance is None:
            if self.voice is None:
                self.voice = await self.service.voices.resolve(None)
            self.utterance_index += 1
            self.utterance = Utterance(
                self.service,
                self.voice,
                self.config.temperature,
                self.config.max_tokens or self.config.max_new_tokens,
                ENDPOINT,
            )
        utterance = self.utterance
        try:
            await utterance.feed(fragment)
        finally:
            self._play_if_opened(utterance)

    async def done(self) -> None:
        utterance, self.utterance = self.utterance, None
        if utterance is None:  # nothing since the last input.done: an empty utterance
            self.utterance_index += 1
            self._start_player(None, self.utterance_index)
            return
        try:
            await utterance.done()
        finally:
            self._play_if_opened(utterance)
            if utterance.stream is None:  # no speakable text: done at once (in turn)
                self._start_player(None, self.utterance_index)

    def _play_if_opened(self, utterance: Utterance) -> None:
        if utterance.stream is not None and not utterance.playing:
            utterance.playing = True
            self._start_player(utterance, self.utterance_index)

    def _start_player(self, utterance: Utterance | None, index: int) -> None:
        previous = self._players[-1] if self._players else None
        self._players = [player for player in self._players if not player.done()]
        self._players.append(
            asyncio.create_task(
                self._play(utterance, index, previous, self.config),
                name=f"utterance-{index}",
            )
        )

    async def _play(
        self,
        utterance: Utterance | None,
        index: int,
        previous: asyncio.Task[None] | None,
        config: SessionConfig,
    ) -> None:
        sentences = 0
        try:
            if previous is not None:  # utterances play in the order they were sent
                await asyncio.gather(previous, return_exceptions=True)
            if utterance is not None and utterance.stream is not None:
                sentences = await self._play_stream(utterance.stream, index, config)
            await self.conn.send(SessionDone(utterance_index=index, total_sentences=sentences))
        except SlowClient:
            pass  # the client stopped reading; the connection is cut
        finally:
            # Also when cancelled while waiting its turn: its generation is aborted.
            if utterance is not None:
                await utterance.close()

    async def _play_stream(self, stream: SpeechStream, index: int, config: SessionConfig) -> int:
        rate = self.service.sample_rate
        sentences, sentence, started_at = 0, None, 0
        sentence_index = -1
        try:
            async for event in stream:
                if isinstance(event, SegmentStart):
                    sentence = SentenceAudio(config, rate)
                    sentence_index, started_at = event.index, stream.samples
                    await self.conn.send(
                        AudioStart(
                            utterance_index=index,
                            sentence_index=event.index,
                            sentence_text=event.text,
                            format=config.response_format,
                            start_s=started_at / rate,
                        )
                    )
                elif isinstance(event, Audio):
                    assert sentence is not None
                    await self._send_audio(sentence, await sentence.push(event.samples))
                elif isinstance(event, SegmentEnd):
                    assert sentence is not None
                    await self._send_audio(sentence, await sentence.finish())
                    await self.conn.send(
                        AudioDone(
                            utterance_index=index,
                            sentence_index=event.index,
                            total_bytes=sentence.bytes_sent,
                            start_s=started_at / rate,
                            end_s=stream.samples / rate,
                        )
                    )
                    await sentence.close()
                    sentence, sentences = None, sentences + 1
        except SlowClient:
            raise
        except Exception as err:
            stream.fail(err)
            if sentence is not None:
                await sentence.close()
                await self.conn.send(
                    AudioDone(
                        utterance_index=index,
                        sentence_index=sentence_index,
                        total_bytes=sentence.bytes_sent,
                        error=True,
                        start_s=started_at / rate,
                        end_s=stream.samples / rate,
                    )
                )
            await self.conn.send(ws_error_frame(err))
        finally:
            await stream.aclose(self.conn.stalled)
        return sentences

    async def _send_audio(self, sentence: SentenceAudio, data: bytes) -> None:
        if data:
            await self.conn.send_audio(data)
            sentence.bytes_sent += len(data)

    async def close(self) -> None:
        """The connection is gone or closing: stop every utterance, upstream included
        (each player closes its own; the one being written may have none yet)."""
        for player in self._players:
            player.cancel()
        await asyncio.gather(*self._players, return_exceptions=True)
        if self.utterance is not None:
            await self.utterance.close()


@router.websocket("/v1/audio/speech/stream")
async def text_stream_websocket(ws: WebSocket) -> None:
    await ws.accept()
    gateway = ws.app.state.gateway
    settings = gateway.settings
    conn = Connection(ws, settings.slow_client_timeout_s)
    if settings.gateway_api_key and not await authenticate(conn, settings):
        return
    session = TextStreamSession(conn, gateway)
    try:
        await session.run()
    except (WebSocketDisconnect, SlowClient) as err:
        logger.info("text stream closed: %s", err)
    finally:
        await session.close()
