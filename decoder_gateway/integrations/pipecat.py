"""A pipecat TTS service on the gateway's streaming-text WebSocket.

Install it with ``pip install "decoder-gateway[pipecat]"``::

    from decoder_gateway.integrations.pipecat import SparkTTSService

    tts = SparkTTSService(
        url="ws://localhost:8001/v1/audio/speech/stream",
        settings=SparkTTSService.Settings(voice="swahili_male"),
    )

:class:`SparkTTSService` writes the LLM's text into ``WS /v1/audio/speech/stream`` as
pipecat hands it over (token by token by default: the gateway finds the sentences
itself, and speaks the first while the rest is being written), one utterance per
turn, ended by ``input.done``. On an interruption it sends ``input.cancel``: the
gateway stops at once, aborts the generation and keeps the connection, so nothing
reconnects (pipecat's services without a cancel reconnect their socket instead). The
words reach pipecat as their audio plays: each sentence's place in the audio comes
from the gateway (``audio.start`` and ``audio.done``), and its words are spread over
it by their characters, so an interrupted reply leaves in the conversation what its
listener was played, to about a word.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncGenerator
from typing import Any

from loguru import logger
from pipecat.frames.frames import ErrorFrame, Frame, TTSAudioRawFrame, TTSStoppedFrame
from pipecat.processors.frame_processor import FrameProcessorSetup
from pipecat.services.settings import TTSSettings
from pipecat.services.tts_service import TextAggregationMode, WebsocketTTSService
from pipecat.utils.tracing.service_decorators import traced_tts
from websockets.protocol import State

DEFAULT_URL = "ws://localhost:8001/v1/audio/speech/stream"
_WORD = re.compile(r"\S+")


def word_times(text: str, start_s: float, end_s: float) -> list[tuple[str, float]]:
    """The words of a sentence that plays from ``start_s`` to ``end_s``, each at the
    time its first character comes, counting speech as even over the characters (the
    gateway knows where each sentence lies in the audio, not each word)."""
    span = max(0.0, end_s - start_s)
    size = max(1, len(text))
    return [(m.group(), start_s + span * m.start() / size) for m in _WORD.finditer(text)]


class SparkTTSService(WebsocketTTSService):
    """Spark-TTS through the decoder gateway; see the module docstring.

    ``url``: the gateway's ``/v1/audio/speech/stream`` (``ws://`` or ``wss://``).
    ``api_key``: the gateway's ``GATEWAY_API_KEY``, when it has one. The voice is
    ``settings.voice`` (a voice id of ``GET /v1/voices``; None: the gateway's
    default), applied from the next turn when it changes. Audio comes as PCM16 at the
    pipeline's output rate, which the gateway resamples to (8000 to 48000 Hz).
    """

    Settings = TTSSettings
    _settings: TTSSettings

    def __init__(
        self,
        *,
        url: str = DEFAULT_URL,
        api_key: str | None = None,
        sample_rate: int | None = None,
        settings: TTSSettings | None = None,
        text_aggregation_mode: TextAggregationMode | None = None,
        **kwargs: Any,
    ) -> None:
        defaults = TTSSettings(model=None, voice=None, language=None)
        if settings is not None:
            defaults.apply_update(settings)
        super().__init__(
            # The gateway cuts sentences itself, from any fragments, at once.
            text_aggregation_mode=text_aggregation_mode or TextAggregationMode.TOKEN,
            # Words are pushed as their audio plays (word_times), not as they are sent.
            push_text_frames=False,
            push_start_frame=True,
            sample_rate=sample_rate,
            settings=defaults,
            **kwargs,
        )
        self._url = url
        self._api_key = api_key
        self._receive_task: Any = None
        self._reset_session()

    def can_generate_metrics(self) -> bool:
        return True

    def _reset_session(self) -> None:
        """What a new connection starts from: the gateway numbers a session's
        utterances from 0, and this service numbers them alike, one per turn."""
        self._next_utterance = 0
        self._contexts: dict[int, str] = {}  # the gateway's utterance index -> context
        self._utterances: dict[str, int] = {}  # context -> its utterance, text sent
        self._ended: set[str] = set()  # contexts whose input.done went out
        self._sentences: dict[tuple[int, int], str] = {}  # (utterance, sentence) -> text
        self._playing: str | None = None  # the context of the audio arriving now

    # -- connection ------------------------------------------------------------------

    async def setup(self, setup: FrameProcessorSetup) -> None:
        await super().setup(setup)
        await self._connect()

    async def _connect(self) -> None:
        await super()._connect()
        await self._connect_websocket()
        if self._websocket and not self._receive_task:
            self._receive_task = self.create_task(self._receive_task_handler(self._report_error))

    async def _disconnect(self) -> None:
        await super()._disconnect()
        if self._receive_task:
            await self.cancel_task(self._receive_task)
            self._receive_task = None
        await self._disconnect_websocket()

    async def _connect_websocket(self) -> None:
        try:
            if self._websocket and self._websocket.state is State.OPEN:
                return
            headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
            self._websocket = await self._websocket_connect(self._url, additional_headers=headers)
            self._reset_session()
            await self._call_event_handler("on_connected")
        except Exception as err:
            await self.push_error_frame(ErrorFrame(error=f"{self} error: {err}", exception=err))
            self._websocket = None
            await self._call_event_handler("on_connection_error", f"{err}")

    async def _disconnect_websocket(self) -> None:
        try:
            await self.stop_all_metrics()
            if self._websocket:
                await self._websocket.close()
        except Exception as err:
            logger.warning(f"{self} error while closing: {err}")
        finally:
            self._websocket = None
            await self._call_event_handler("on_disconnected")

    async def _send(self, message: dict[str, Any]) -> None:
        if self._websocket is None:
            raise ConnectionError(f"{self}: not connected to the gateway")
        await self._websocket.send(json.dumps(message))

    # -- text in -----------------------------------------------------------------------

    @traced_tts
    async def run_tts(self, text: str, context_id: str) -> AsyncGenerator[Frame | None, None]:
        """Write ``text`` into the utterance of ``context_id`` (its first text opens it,
        under the settings of now); the audio comes on the receive task."""
        try:
            if not self._websocket or self._websocket.state is State.CLOSED:
                await self._connect()
            if context_id not in self._utterances:
                index = self._next_utterance
                self._next_utterance += 1
                self._utterances[context_id] = index
                self._contexts[index] = context_id
                await self._send(
                    {
                        "type": "session.config",
                        "voice": self._settings.voice,
                        "response_format": "pcm",
                        "stream_audio": True,
                        "sample_rate": self.sample_rate,
                    }
                )
            await self._send({"type": "input.text", "text": text})
            await self.start_tts_usage_metrics(text)
            yield None
        except Exception as err:
            yield ErrorFrame(error=f"{self} error: {err}")

    async def flush_audio(self, context_id: str | None = None) -> None:
        """The turn's text is complete: ``input.done`` ends its utterance."""
        context = context_id or self.get_active_audio_context_id()
        if context not in self._utterances or context in self._ended or not self._websocket:
            return
        self._ended.add(context)
        await self._send({"type": "input.done"})

    async def on_audio_context_interrupted(self, context_id: str) -> None:
        """The user talks: ``input.cancel`` stops every utterance of the session (one
        message for all the contexts pipecat interrupts). What still arrives of them
        before the gateway's ``audio.cancelled`` belongs to no context: dropped."""
        await self.stop_all_metrics()
        if self._contexts and self._websocket:
            self._contexts.clear()
            self._utterances.clear()
            self._ended.clear()
            self._playing = None
            try:
                await self._send({"type": "input.cancel"})
            except Exception as err:
                logger.warning(f"{self} could not send input.cancel: {err}")
        await super().on_audio_context_interrupted(context_id)

    # -- audio and events out ------------------------------------------------------------

    async def _receive_messages(self) -> None:
        async for message in self._websocket:  # type: ignore[union-attr]
            if isinstance(message, bytes):
                await self._audio(message)
            else:
                await self._event(json.loads(message))

    async def _audio(self, pcm: bytes) -> None:
        context = self._playing
        if context is not None and self.audio_context_available(context):
            frame = TTSAudioRawFrame(pcm, self.sample_rate, 1, context_id=context)
            await self.append_to_audio_context(context, frame)

    async def _event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        utterance = event.get("utterance_index")
        context = self._contexts.get(utterance) if isinstance(utterance, int) else None
        if kind == "audio.start":
            self._playing = context  # None: a cancelled utterance's, dropped
            if context is not None:
                self._sentences[(utterance, event["sentence_index"])] = event["sentence_text"]
        elif kind == "audio.done" and context is not None:
            text = self._sentences.pop((utterance, event["sentence_index"]), "")
            words = word_times(text, event["start_s"], event["end_s"])
            await self.add_word_timestamps(words, context)
        elif kind == "session.done":
            if context is not None:
                del self._contexts[utterance]
                self._utterances.pop(context, None)
                self._ended.discard(context)
                await self.append_to_audio_context(context, TTSStoppedFrame(context_id=context))
                await self.remove_audio_context(context)
            if self._playing == context:
                self._playing = None
        elif kind == "audio.cancelled":
            logger.debug(
                f"{self} cancelled after {event.get('audio_seconds')} s of audio: "
                f"{event.get('spoken_text')!r}"
            )
        elif kind == "error":
            await self.push_error(
                error_msg=f"{self} gateway error {event.get('code')}: {event.get('message')}"
            )
