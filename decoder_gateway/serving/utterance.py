"""Text streamed in for one utterance (a voice agent's LLM writing its reply): fragments
in, one :class:`SpeechStream` out whose segments arrive as the text does.

The fragments go through the same segmenter rules as whole texts
(:class:`~decoder_gateway.text.TextSegmenter`), so a text gives the same segments
however it was cut. Each segment is released to the LLM as soon as its boundary is
certain, while the ones before it play; the stream (and its slot) opens with the
first segment, so no capacity is held while a client is still thinking.
"""

from __future__ import annotations

from decoder_gateway.errors import InvalidRequest
from decoder_gateway.llm.prompt import VoiceStyle
from decoder_gateway.serving.job import SpeechJob, new_request_id
from decoder_gateway.serving.scheduler import SegmentSource
from decoder_gateway.serving.speech import SpeechService, SpeechStream
from decoder_gateway.text import TextSegmenter
from decoder_gateway.voices.catalog import Voice


class Utterance:
    """One utterance of a streaming-text session; see the module docstring."""

    def __init__(
        self,
        service: SpeechService,
        voice: Voice,
        temperature: float,
        max_tokens: int | None,
        endpoint: str,
        style: VoiceStyle | None = None,
    ) -> None:
        self.service = service
        self.endpoint = endpoint
        limits = service.settings
        self.max_chars = limits.max_text_chars
        self.job = SpeechJob(
            text="",
            segments=(),
            voice=voice,
            temperature=temperature,
            max_tokens=service.check_max_tokens(max_tokens),
            request_id=new_request_id(),
            style=style,  # with its voice from SpeechService.style_voice
        )
        self.segmenter = TextSegmenter(max_chars=limits.max_segment_chars)
        self.source = SegmentSource()
        self.stream: SpeechStream | None = None
        self.playing = False  # a player sends the stream (set by the session)
        self.received_chars = 0
        # Stopped before input.done: its synthesis failed (the client got the error and
        # session.done) or the session closed. The rest of its text has nowhere to go.
        self.ended = False

    async def feed(self, fragment: str) -> SpeechStream | None:
        """Take a fragment; returns the stream when this fragment opened it.

        Raises InvalidRequest (the fragment is refused, nothing of it is kept) when the
        utterance would pass MAX_TEXT_CHARS, and when a released segment holds prompt
        markup (that segment is dropped, the rest of the utterance goes on). Once the
        utterance has ended (:attr:`ended`), fragments are dropped.
        """
        if self.ended:
            return None
        if self.received_chars + len(fragment) > self.max_chars:
            raise InvalidRequest(
                f"the utterance would have {self.received_chars + len(fragment)} characters; "
                f"the limit is {self.max_chars}: send input.done and start another",
                "text",
            )
        self.received_chars += len(fragment)
        return await self._release(self.segmenter.feed(fragment))

    async def done(self) -> SpeechStream | None:
        """input.done: release the rest; no segment will follow."""
        if self.ended:
            return None
        try:
            return await self._release(self.segmenter.flush())
        finally:
            self.source.close()

    async def close(self, cause: BaseException | None = None) -> None:
        """Stop the utterance (client gone, session closed, cancelled, or its synthesis
        over): abort its generation. ``cause``: why it stopped, when not by itself."""
        self.ended = not self.source.closed  # before input.done: text may still come
        self.source.close()
        if self.stream is not None:
            await self.stream.aclose(cause)

    async def _release(self, segments: list[str]) -> SpeechStream | None:
        opened, refused = None, None
        for segment in segments:
            try:
                self.service.check_segment(segment, "text")
            except InvalidRequest as err:
                refused = refused or err
                continue
            if self.stream is None:
                self.stream = opened = await self.service.open(self.job, self.endpoint, self.source)
            self.source.add(segment)
        if refused is not None:
            raise refused
        return opened
