"""What a listener has been sent of a request, for the answer to a cancel (a barge-in).

The audio sent is known exactly, sample by sample, and so is the sentence each stretch
of it speaks. Inside a sentence it is not: the model writes speech tokens for a
sentence's text with no alignment to its words. So the text is told to the sentence,
and into the sentence that was cut off by estimate, once that sentence's length is
known (its generation has ended): the words that end within the share of its
characters equal to the share of its audio sent. Speech runs at a fairly even rate of
characters within one sentence, so the estimate may be a word off either way. While
the cut sentence's length is still unknown, the text stops at its last whole sentence.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Literal

SpokenUntil = Literal["sentence", "word"]
_WORD = re.compile(r"\S+")


@dataclass(frozen=True)
class Spoken:
    """The text whose audio was sent, and whether it ends at a sentence or in one."""

    text: str = ""
    until: SpokenUntil = "sentence"


def words_within(text: str, fraction: float) -> str:
    """The words of ``text`` that end within its first ``fraction`` of characters."""
    if fraction >= 1.0:
        return text
    budget = fraction * len(text)
    end = 0
    for word in _WORD.finditer(text):
        if word.end() > budget:
            break
        end = word.end()
    return text[:end]


class SentSentences:
    """The sentences whose audio went to a listener, whole or in part.

    Audio is counted in samples of the model's own rate (a transport that resamples or
    changes the speed converts what it sent back to them), so that it compares with a
    sentence's length as the serving layer knows it.
    """

    def __init__(self) -> None:
        self._whole: list[str] = []
        self._current: tuple[int, str] | None = None  # (segment index, text)
        self._current_samples = 0.0

    def start(self, index: int, text: str) -> None:
        """Segment ``index`` (``text``) starts playing."""
        self._current = (index, text)
        self._current_samples = 0.0

    def sent(self, model_samples: float) -> None:
        """``model_samples`` more of the current sentence's audio went to the listener."""
        self._current_samples += model_samples

    def end(self) -> None:
        """The current sentence's audio has all been sent."""
        if self._current is not None:
            self._whole.append(self._current[1])
        self._current = None

    def spoken(self, length_of: Callable[[int], int | None]) -> Spoken:
        """The text sent so far; ``length_of(index)`` is a segment's length in model
        samples, or None while its generation goes on."""
        parts = list(self._whole)
        until: SpokenUntil = "sentence"
        if self._current is not None and self._current_samples > 0:
            index, text = self._current
            length = length_of(index)
            if length:
                words = words_within(text, self._current_samples / length)
                if words:
                    parts.append(words)
                    until = "sentence" if words == text else "word"
        return Spoken(" ".join(parts), until)


async def send_whole(send: Coroutine[Any, Any, None]) -> None:
    """Run ``send`` (a frame's send and its accounting) to its end, even when the caller
    is cancelled meanwhile (a cancel stops the sender): the cancellation then waits for
    it and goes on. A frame once begun is sent whole and counted, so what a cancel
    reports as sent is exactly what the client got before the answer."""
    sending = asyncio.ensure_future(send)
    try:
        await asyncio.shield(sending)
    except asyncio.CancelledError:
        await asyncio.wait({sending})
        if not sending.cancelled():
            sending.exception()  # retrieved: the cancellation is what goes on
        raise
