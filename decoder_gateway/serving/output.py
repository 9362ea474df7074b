"""Audio as a WebSocket sends it: the model's samples in, the bytes to send out, each
piece with the number of samples it holds (what a cancel reports as sent).

PCM16 at the model's own rate and speed goes out as the model made it; anything else
(another rate, a tempo change, G.711) goes through an :class:`AudioPipeline`, off the
event loop. WAV is PCM16 behind a header: one complete file per piece when the audio
is held whole, else a streaming header (sizes unknown) before the first bytes.
"""

from __future__ import annotations

import asyncio
from typing import Literal

import torch

from decoder_gateway.audio.encoders import AudioPipeline, wav_header, whole_wav
from decoder_gateway.audio.pcm import to_pcm16

RawFormat = Literal["pcm", "wav", "mulaw", "alaw"]


class OutputAudio:
    """One piece of audio as sent (a sentence, or a whole message): see the module doc.

    ``whole``: hold everything and send it at :meth:`finish` (one frame per piece),
    else send as it comes.
    """

    def __init__(
        self,
        response_format: RawFormat,
        model_rate: int,
        sample_rate: int,
        speed: float = 1.0,
        whole: bool = False,
    ) -> None:
        self.response_format = response_format
        self.model_rate = model_rate
        self.sample_rate = sample_rate
        self.speed = speed
        self.whole = whole
        self._held = bytearray()
        self._held_samples = 0
        self._header_due = response_format == "wav" and not whole
        encoding = "pcm" if response_format == "wav" else response_format
        as_is = encoding == "pcm" and speed == 1.0 and sample_rate == model_rate
        self._pipeline = None if as_is else AudioPipeline(encoding, model_rate, sample_rate, speed)

    def model_samples(self, samples: int) -> float:
        """Samples sent -> the samples of the model's audio they stand for."""
        return samples * self.speed * self.model_rate / self.sample_rate

    async def push(self, samples: torch.Tensor) -> tuple[bytes, int]:
        """The bytes to send now for these model samples, and the samples they hold
        (none while the audio is held whole)."""
        if self._pipeline is None:
            return self._frame(to_pcm16(samples), samples.shape[0])
        before = self._pipeline.samples_out
        data = await asyncio.to_thread(self._pipeline.push, samples)
        return self._frame(data, self._pipeline.samples_out - before)

    async def finish(self) -> tuple[bytes, int]:
        """The last bytes (the rest of the filters, or the whole piece held), and the
        samples they hold."""
        data, samples = b"", 0
        if self._pipeline is not None:
            before = self._pipeline.samples_out
            data = await asyncio.to_thread(self._pipeline.finish)
            samples = self._pipeline.samples_out - before
        if not self.whole:
            return self._frame(data, samples)
        data, samples = bytes(self._held) + data, self._held_samples + samples
        if self.response_format == "wav":
            data = whole_wav(data, self.sample_rate)
        return data, samples

    async def close(self) -> None:
        """Release the encoder; safe after :meth:`finish` and more than once."""
        if self._pipeline is not None:
            await asyncio.to_thread(self._pipeline.close)

    def _frame(self, data: bytes, samples: int) -> tuple[bytes, int]:
        if self.whole:
            self._held += data
            self._held_samples += samples
            return b"", 0
        if data and self._header_due:
            self._header_due = False
            return wav_header(self.sample_rate) + data, samples
        return data, samples
