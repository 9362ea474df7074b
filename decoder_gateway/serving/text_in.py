"""A session of text streamed in and speech streamed out (a voice agent's connection).

The rules live here, apart from the WebSocket that carries them: utterances play in
the order they were sent, each while the next is being written; a sentence's audio
is framed as the session asks (streamed chunks or one WAV per sentence, PCM16 or
G.711); a failure ends its utterance only; a cancel (a barge-in) stops every utterance
at once and says what the client was sent. The session talks to its connection
through a :class:`TextInTransport` of :data:`TextInEvent`, which the route turns into
frames.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, field
from typing import Protocol

from decoder_gateway.audio.encoders import FORMATS
from decoder_gateway.errors import CancelledByClient, InvalidRequest, SlowClient
from decoder_gateway.llm.prompt import VoiceStyle
from decoder_gateway.serving.events import Audio, SegmentEnd, SegmentStart
from decoder_gateway.serving.output import OutputAudio, RawFormat
from decoder_gateway.serving.speech import SpeechService, SpeechStream
from decoder_gateway.serving.spoken import SentSentences, SpokenUntil, send_whole
from decoder_gateway.serving.utterance import Utterance
from decoder_gateway.voices.catalog import Voice

ENDPOINT = "text_stream"


@dataclass(frozen=True)
class TextInConfig:
    """How the utterances that follow are spoken and framed."""

    temperature: float = 0.7
    max_tokens: int | None = None
    response_format: RawFormat = "wav"
    stream_audio: bool = False  # chunks as they are decoded, else one piece per sentence
    speed: float = 1.0
    sample_rate: int | None = None  # None: the format's own (G.711: 8000), else the model's

    def output_rate(self, model_rate: int) -> int:
        """The rate of the audio sent."""
        return self.sample_rate or FORMATS[self.response_format].default_rate or model_rate


# -- what the session sends -------------------------------------------------------


@dataclass(frozen=True)
class SentenceStarted:
    utterance_index: int
    sentence_index: int
    sentence_text: str
    format: RawFormat
    start_s: float  # where the sentence starts in its utterance's audio
    sample_rate: int
    # A style utterance's voice, on its first sentence (sent with its first audio).
    global_tokens: list[int] | None = None


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


@dataclass(frozen=True)
class UtteranceCancelled:
    """The answer to a cancel, sent once every cancelled utterance has stopped (its
    generation aborted): nothing of them follows it."""

    utterance_index: int | None  # the first one stopped (the one playing); None: nothing was
    cancelled_utterances: int
    audio_seconds: float  # of the first one's audio, as sent
    spoken_text: str  # the text of that audio
    spoken_until: SpokenUntil


TextInEvent = (
    SentenceStarted
    | SentenceBytes
    | SentenceEnded
    | UtteranceEnded
    | UtteranceFailed
    | UtteranceCancelled
)


class TextInTransport(Protocol):
    """The session's connection: a send raises SlowClient once the client stalls."""

    @property
    def stalled(self) -> SlowClient | None: ...

    async def send(self, event: TextInEvent) -> None: ...


@dataclass
class _Player:
    """An utterance's player task: it waits for the one before, then sends its audio."""

    index: int
    task: asyncio.Task[None]


@dataclass
class _Playing:
    """What the client was sent of the utterance playing: for a cancel's answer."""

    index: int
    stream: SpeechStream
    sample_rate: int  # of the audio sent
    samples_sent: int = 0
    sentence_bytes: int = 0  # bytes sent for the sentence playing (WAV headers included)
    sentences: SentSentences = field(default_factory=SentSentences)


class TextInSession:
    """One connection: its configuration, the utterance being written, the players."""

    def __init__(self, service: SpeechService, transport: TextInTransport) -> None:
        self.service = service
        self.transport = transport
        self.config = TextInConfig()
        self.voice: Voice | None = None  # resolved on first use when never configured
        self.style: VoiceStyle | None = None  # each utterance designs its voice from it
        self.utterance: Utterance | None = None  # receiving text (until input.done)
        self.utterance_index = -1
        # Players not yet finished, in order (finished ones are dropped: a voice agent's
        # session may last for hundreds of utterances).
        self._players: list[_Player] = []
        self._playing: _Playing | None = None  # the utterance whose audio is being sent
        # Why the players are being stopped, while a cancel stops them: the outcome of
        # their requests.
        self._stop_cause: CancelledByClient | None = None
        # What the next cancel stops besides the players and the utterance being
        # written: utterances that text skipped for it made (see skip), and utterances
        # whose input.done came but which will never play (index, utterance).
        self._skipped: list[int] = []
        self._unplayed: list[tuple[int, Utterance]] = []
        self._skipping = False  # skipped text is writing an utterance

    @property
    def busy(self) -> bool:
        """Playing or mid-utterance: the session is not idle."""
        return self.utterance is not None or any(not p.task.done() for p in self._players)

    async def configure(
        self,
        config: TextInConfig,
        voice: str | None = None,
        speaker_id: int | None = None,
        ref_audio: str | None = None,
        style: VoiceStyle | None = None,
    ) -> None:
        """Settings for the next utterances; refused while one is being written.

        ``style``: each utterance (one request) is spoken in a voice designed from
        these labels, instead of a voice.
        """
        if self.utterance is not None:
            raise InvalidRequest(
                "session.config while an utterance is being written is refused (its text is "
                "kept): send input.done first"
            )
        if style is not None:
            resolved = self.service.style_voice(
                style, voice=voice, speaker_id=speaker_id, ref_audio=ref_audio
            )
        else:
            resolved = await self.service.voices.resolve(voice, speaker_id)
            if ref_audio is not None:
                resolved = await self.service.voices.inline(ref_audio, resolved)
        self.service.check_max_tokens(config.max_tokens)
        self.config, self.voice, self.style = config, resolved, style

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
                self.style,
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
        stopped = False
        try:
            await utterance.done()
        except asyncio.CancelledError:
            # A cancel stopped it (waiting for admission, say): that cancel ends it.
            stopped = True
            self._unplayed.append((self.utterance_index, utterance))
            raise
        finally:
            if not stopped:
                self._play_if_opened(utterance)
                if utterance.stream is None:  # no speakable text: done at once (in turn)
                    self._start_player(None, self.utterance_index)

    async def finish(self) -> None:
        """The client closes the session: end what it wrote, and play everything."""
        if self.utterance is not None:
            await self.done()
        await asyncio.gather(*(p.task for p in self._players), return_exceptions=True)

    async def close(self) -> None:
        """The connection is gone or closing: stop every utterance, upstream included
        (each player closes its own; the one being written may have none yet)."""
        for player in self._players:
            player.task.cancel()
        await asyncio.gather(*(p.task for p in self._players), return_exceptions=True)
        for _, utterance in self._unplayed:  # a cancel was on its way to them
            await utterance.close()
        if self.utterance is not None:
            await self.utterance.close()

    def skip(self, done: bool) -> None:
        """A fragment (``done``: an input.done) that a cancel read after it stops before
        it is spoken: it is not fed, but counts as the utterances it makes, so that the
        cancel stops them and the utterance indexes stay the client's."""
        if not done:
            if self.utterance is None and not self._skipping:
                self.utterance_index += 1
                self._skipped.append(self.utterance_index)
                self._skipping = True
        elif self.utterance is not None:  # written before; it never plays now
            self._unplayed.append((self.utterance_index, self.utterance))
            self.utterance = None
        elif self._skipping:
            self._skipping = False
        else:  # an empty utterance
            self.utterance_index += 1
            self._skipped.append(self.utterance_index)

    async def cancel(self) -> None:
        """input.cancel (a barge-in): stop every utterance at once (the one being
        written, whose text is dropped, the one playing and those waiting to play), abort
        their generation and free their slots, then tell the client what it was sent of
        the one playing. Nothing of them is sent after that answer; the session goes on,
        and the next text starts the next utterance. With nothing to stop, the answer
        says so and nothing changes."""
        unplayed = [*self._unplayed]
        if self.utterance is not None:
            unplayed.append((self.utterance_index, self.utterance))
        stopped = {p.index for p in self._players if not p.task.done()}
        stopped.update(self._skipped, (index for index, _ in unplayed))
        players = [p for p in self._players if not p.task.done()]
        self.utterance, self._players = None, []
        self._skipped, self._unplayed, self._skipping = [], [], False
        playing = self._playing
        self._stop_cause = CancelledByClient("the client cancelled the utterance")
        try:
            for player in players:
                player.task.cancel()
            await asyncio.gather(*(p.task for p in players), return_exceptions=True)
            for _, utterance in unplayed:  # without a stream they have no player to close them
                await utterance.close(self._stop_cause)
        finally:
            self._stop_cause = None
        first = min(stopped, default=None)
        seconds, spoken = 0.0, None
        if playing is not None and playing.index == first:
            seconds = playing.samples_sent / playing.sample_rate
            spoken = playing.sentences.spoken(playing.stream.segment_samples)
        await self.transport.send(
            UtteranceCancelled(
                utterance_index=first,
                cancelled_utterances=len(stopped),
                audio_seconds=seconds,
                spoken_text=spoken.text if spoken else "",
                spoken_until=spoken.until if spoken else "sentence",
            )
        )

    def _play_if_opened(self, utterance: Utterance) -> None:
        if utterance.stream is not None and not utterance.playing:
            utterance.playing = True
            self._start_player(utterance, self.utterance_index)

    def _start_player(self, utterance: Utterance | None, index: int) -> None:
        previous = self._players[-1].task if self._players else None
        self._players = [player for player in self._players if not player.task.done()]
        task = asyncio.create_task(
            self._play(utterance, index, previous, self.config), name=f"utterance-{index}"
        )
        self._players.append(_Player(index, task))

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
                await utterance.close(self._stop_cause)

    async def _play_stream(self, stream: SpeechStream, index: int, config: TextInConfig) -> int:
        send = self.transport.send
        rate = self.service.sample_rate
        playing = self._playing = _Playing(index, stream, config.output_rate(rate))
        sentences, sentence, started_at = 0, None, 0
        sentence_index = -1
        # A style utterance's first audio.start waits for its first audio, when its
        # voice is known, and carries it.
        pending: SentenceStarted | None = None

        async def send_pending() -> None:
            nonlocal pending
            if pending is not None:
                first, pending = pending, None
                await send(dataclasses.replace(first, global_tokens=stream.designed_tokens))

        try:
            async for event in stream:
                if self._stop_cause is not None:  # its cancellation was lost on the way
                    raise asyncio.CancelledError
                if isinstance(event, SegmentStart):
                    sentence = OutputAudio(
                        config.response_format,
                        rate,
                        playing.sample_rate,
                        config.speed,
                        whole=not config.stream_audio,
                    )
                    sentence_index, started_at = event.index, stream.samples
                    playing.sentences.start(event.index, event.text)
                    playing.sentence_bytes = 0
                    started = SentenceStarted(
                        index,
                        event.index,
                        event.text,
                        config.response_format,
                        started_at / rate,
                        sentence.sample_rate,
                    )
                    if event.index == 0 and stream.job.style is not None:
                        pending = started
                    else:
                        await send(started)
                elif isinstance(event, Audio):
                    assert sentence is not None
                    await send_pending()
                    await self._send_audio(playing, sentence, *await sentence.push(event.samples))
                elif isinstance(event, SegmentEnd):
                    assert sentence is not None
                    await send_pending()
                    await self._send_audio(playing, sentence, *await sentence.finish())
                    playing.sentences.end()
                    await send(
                        SentenceEnded(
                            index,
                            event.index,
                            playing.sentence_bytes,
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
                await send_pending()  # every audio.done follows its audio.start
                await send(
                    SentenceEnded(
                        index,
                        sentence_index,
                        playing.sentence_bytes,
                        started_at / rate,
                        stream.samples / rate,
                        error=True,
                    )
                )
            await send(UtteranceFailed(err))
        finally:
            # Upstream first: a cancel waits for it, and the encoder can wait.
            await stream.aclose(self.transport.stalled or self._stop_cause)
            if sentence is not None:
                await sentence.close()
        return sentences

    async def _send_audio(
        self, playing: _Playing, sentence: OutputAudio, data: bytes, samples: int
    ) -> None:
        if not data:
            return

        async def send_counted() -> None:
            await self.transport.send(SentenceBytes(data))
            playing.sentence_bytes += len(data)
            playing.samples_sent += samples
            playing.sentences.sent(sentence.model_samples(samples))

        await send_whole(send_counted())
