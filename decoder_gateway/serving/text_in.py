"""A session of text streamed in and speech streamed out (a voice agent's connection).

The rules live here, apart from the WebSocket that carries them: utterances play in
the order they were sent, each while the next is being written; a sentence's audio
is framed as the session asks (streamed chunks or one WAV per sentence); a failure
ends its utterance only. The session talks to its connection through a
:class:`TextInTransport` of :data:`TextInEvent`, which the route turns into frames.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Literal, Protocol

from decoder_gateway.audio.encoders import AudioPipeline, wav_header, whole_wav
from decoder_gateway.audio.pcm import to_pcm16
from decoder_gateway.errors import InvalidRequest, SlowClient
from decoder_gateway.serving.events import Audio, SegmentEnd, SegmentStart
from decoder_gateway.serving.speech import SpeechService, SpeechStream
from decoder_gateway.serving.utterance import Utterance
from decoder_gateway.voices.catalog import Voice

ENDPOINT = "text_stream"

AudioFraming = Literal["pcm", "wav"]


@dataclass(frozen=True)
class TextInConfig:
    """How the utterances that follow are spoken and framed."""

    temperature: float = 0.7
    max_tokens: int | None = None
    response_format: AudioFraming = "wav"
    stream_audio: bool = False  # chunks as they are decoded, else one piece per sentence
    speed: float = 1.0


# -- what the session sends -------------------------------------------------------


@dataclass(frozen=True)
class SentenceStarted:
    utterance_index: int
    sentence_index: int
    sentence_text: str
    format: AudioFraming
    start_s: float  # where the sentence starts in its utterance's audio


@dataclass(frozen=True)
class SentenceBytes:
    data: bytes


@dataclass(frozen=True)
class SentenceEnded:
    utterance_index: int
    sentence_index: int
    total_bytes: int
    start_s: float
    end_s: float
    error: bool = False


@dataclass(frozen=True)
class UtteranceEnded:
    utterance_index: int
    total_sentences: int


@dataclass(frozen=True)
class UtteranceFailed:
    error: BaseException


TextInEvent = SentenceStarted | SentenceBytes | SentenceEnded | UtteranceEnded | UtteranceFailed


class TextInTransport(Protocol):
    """The session's connection: a send raises SlowClient once the client stalls."""

    @property
    def stalled(self) -> SlowClient | None: ...

    async def send(self, event: TextInEvent) -> None: ...


class SentenceAudio:
    """One sentence's audio as sent: speed change, PCM16, WAV framing."""

    def __init__(self, config: TextInConfig, sample_rate: int) -> None:
        self.config = config
        self.sample_rate = sample_rate
        self.bytes_sent = 0
        self._held = bytearray()  # a whole sentence, when not streaming
        self._pipeline = (
            None
            if config.speed == 1.0
            else AudioPipeline("pcm", sample_rate, sample_rate, config.speed)
        )

    async def push(self, audio: Audio) -> bytes:
        """The bytes to send now for this audio (empty while the sentence is held)."""
        if self._pipeline is None:
            pcm = to_pcm16(audio.samples)
        else:
            pcm = await asyncio.to_thread(self._pipeline.push, audio.samples)
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


class TextInSession:
    """One connection: its configuration, the utterance being written, the players."""

    def __init__(self, service: SpeechService, transport: TextInTransport) -> None:
        self.service = service
        self.transport = transport
        self.config = TextInConfig()
        self.voice: Voice | None = None  # resolved on first use when never configured
        self.utterance: Utterance | None = None  # receiving text (until input.done)
        self.utterance_index = -1
        # Players not yet finished, in order (finished ones are dropped: a voice agent's
        # session may last for hundreds of utterances).
        self._players: list[asyncio.Task[None]] = []

    @property
    def busy(self) -> bool:
        """Playing or mid-utterance: the session is not idle."""
        return self.utterance is not None or any(not p.done() for p in self._players)

    async def configure(
        self,
        config: TextInConfig,
        voice: str | None = None,
        speaker_id: int | None = None,
        ref_audio: str | None = None,
    ) -> None:
        """Settings for the next utterances; refused while one is being written."""
        if self.utterance is not None:
            raise InvalidRequest(
                "session.config while an utterance is being written is refused (its text is "
                "kept): send input.done first"
            )
        resolved = await self.service.voices.resolve(voice, speaker_id)
        if ref_audio is not None:
            resolved = await self.service.voices.inline(ref_audio, resolved)
        self.service.check_max_tokens(config.max_tokens)
        self.config, self.voice = config, resolved

    async def text(self, fragment: str) -> None:
        """The next fragment of the utterance being written (the first opens one)."""
        if self.utterance is None:
            if self.voice is None:
                self.voice = await self.service.voices.resolve(None)
            self.utterance_index += 1
            self.utterance = Utterance(
                self.service,
                self.voice,
                self.config.temperature,
                self.config.max_tokens,
                ENDPOINT,
            )
        utterance = self.utterance
        try:
            await utterance.feed(fragment)
        finally:
            self._play_if_opened(utterance)

    async def done(self) -> None:
        """The end of the utterance being written (an empty one if none is)."""
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

    async def finish(self) -> None:
        """The client closes the session: end what it wrote, and play everything."""
        if self.utterance is not None:
            await self.done()
        await asyncio.gather(*self._players, return_exceptions=True)

    async def close(self) -> None:
        """The connection is gone or closing: stop every utterance, upstream included
        (each player closes its own; the one being written may have none yet)."""
        for player in self._players:
            player.cancel()
        await asyncio.gather(*self._players, return_exceptions=True)
        if self.utterance is not None:
            await self.utterance.close()

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
        config: TextInConfig,
    ) -> None:
        sentences = 0
        try:
            if previous is not None:  # utterances play in the order they were sent
                await asyncio.gather(previous, return_exceptions=True)
            if utterance is not None and utterance.stream is not None:
                sentences = await self._play_stream(utterance.stream, index, config)
            await self.transport.send(UtteranceEnded(index, sentences))
        except SlowClient:
            pass  # the client stopped reading; the connection is cut
        finally:
            # Also when cancelled while waiting its turn: its generation is aborted.
            if utterance is not None:
                await utterance.close()

    async def _play_stream(self, stream: SpeechStream, index: int, config: TextInConfig) -> int:
        send = self.transport.send
        rate = self.service.sample_rate
        sentences, sentence, started_at = 0, None, 0
        sentence_index = -1
        try:
            async for event in stream:
                if isinstance(event, SegmentStart):
                    sentence = SentenceAudio(config, rate)
                    sentence_index, started_at = event.index, stream.samples
                    start_s = started_at / rate
                    await send(
                        SentenceStarted(
                            index, event.index, event.text, config.response_format, start_s
                        )
                    )
                elif isinstance(event, Audio):
                    assert sentence is not None
                    await self._send_audio(sentence, await sentence.push(event))
                elif isinstance(event, SegmentEnd):
                    assert sentence is not None
                    await self._send_audio(sentence, await sentence.finish())
                    await send(
                        SentenceEnded(
                            index,
                            event.index,
                            sentence.bytes_sent,
                            started_at / rate,
                            stream.samples / rate,
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
                await send(
                    SentenceEnded(
                        index,
                        sentence_index,
                        sentence.bytes_sent,
                        started_at / rate,
                        stream.samples / rate,
                        error=True,
                    )
                )
            await send(UtteranceFailed(err))
        finally:
            await stream.aclose(self.transport.stalled)
        return sentences

    async def _send_audio(self, sentence: SentenceAudio, data: bytes) -> None:
        if data:
            await self.transport.send(SentenceBytes(data))
            sentence.bytes_sent += len(data)
