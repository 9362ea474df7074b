"""The pipecat service (decoder_gateway.integrations.pipecat), driven by pipecat's own
frames through pipecat's own test pipeline (``pipecat.tests.utils.run_test``) against
a real gateway process and the stand-in LLM (10 speech tokens per word, 320 samples a
token): an LLM's reply streamed in and spoken, and an interruption that cancels it on
the same connection, its generation aborted upstream, before the next reply.
"""

from __future__ import annotations

import pytest
import requests
from pipecat.frames.frames import (
    InterruptionFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    TTSTextFrame,
)
from pipecat.pipeline.worker import PipelineParams
from pipecat.tests.utils import SleepFrame, run_test

from decoder_gateway.integrations.pipecat import SparkTTSService, word_times
from decoder_gateway.llm.prompt import speaker_prompt
from decoder_gateway.voices.catalog import VoiceCatalog
from devtools.metrics import sample
from devtools.standin_llm import expected_semantic_count

VOICES = VoiceCatalog.load()
RATE = 16000  # the pipeline's output rate: the model's own, so lengths are exact


def samples_of(*sentences: str) -> int:
    voice = VOICES.resolve("swahili_male")
    return sum(320 * expected_semantic_count(speaker_prompt(voice, s)) for s in sentences)


def reply(*fragments: str) -> list:
    """An LLM's reply as pipecat's LLM services push it."""
    return [
        LLMFullResponseStartFrame(),
        *(LLMTextFrame(text) for text in fragments),
        LLMFullResponseEndFrame(),
    ]


def service(gateway) -> tuple[SparkTTSService, list[str]]:
    """The service, and the connections it opened (to show one is kept)."""
    tts = SparkTTSService(
        url=f"{gateway.ws_url}/v1/audio/speech/stream",
        settings=SparkTTSService.Settings(voice="swahili_male"),
    )
    connections: list[str] = []

    @tts.event_handler("on_connected")
    async def connected(_: SparkTTSService) -> None:
        connections.append("open")

    return tts, connections


def cancelled_requests(gateway) -> float:
    text = requests.get(f"{gateway.url}/metrics", timeout=10).text
    return sample(text, "tts_requests_total", endpoint="text_stream", outcome="cancelled")


async def test_a_reply_streamed_in_is_spoken_with_its_words_timed(gateway, llm):
    tts, connections = service(gateway)
    down, _ = await run_test(
        tts,
        frames_to_send=[*reply("Habari ", "yako? Nzuri ", "sana."), SleepFrame(sleep=3.0)],
        pipeline_params=PipelineParams(audio_out_sample_rate=RATE),
    )
    audio = [f for f in down if isinstance(f, TTSAudioRawFrame)]
    assert audio and all(f.sample_rate == RATE and f.num_channels == 1 for f in audio)
    assert sum(len(f.audio) for f in audio) == 2 * samples_of("Habari yako?", "Nzuri sana.")
    assert len({f.context_id for f in audio}) == 1
    kinds = [type(f) for f in down]
    assert kinds.index(TTSStartedFrame) < kinds.index(TTSAudioRawFrame)
    assert TTSStoppedFrame in kinds
    words = [f.text for f in down if isinstance(f, TTSTextFrame)]
    assert words == ["Habari", "yako?", "Nzuri", "sana."]
    assert connections == ["open"]
    prompts = [r["prompt"] for r in llm.stats()["requests"]]
    assert all("246: " in p for p in prompts)  # the voice of the settings


async def test_an_interruption_cancels_on_the_same_connection(gateway, llm):
    """The user talks over a long reply: pipecat's InterruptionFrame makes the service
    send input.cancel; the gateway aborts the generation, nothing more of that reply
    comes, and the next reply is spoken whole over the same connection."""
    llm.control(tokens_per_s=50)  # real time: the reply is still being written
    before = cancelled_requests(gateway)
    tts, connections = service(gateway)
    long_reply = "Leo tutazungumza kuhusu kilimo, mvua, soko la mji na bei ya mahindi."
    down, _ = await run_test(
        tts,
        frames_to_send=[
            *reply("Habari yako? ", long_reply),
            SleepFrame(sleep=1.5),
            InterruptionFrame(),
            SleepFrame(sleep=1.0),
            *reply("Asante."),
            SleepFrame(sleep=2.0),
        ],
        pipeline_params=PipelineParams(audio_out_sample_rate=RATE),
    )
    interrupted_at = next(i for i, f in enumerate(down) if isinstance(f, InterruptionFrame))
    before_audio = [f for f in down[:interrupted_at] if isinstance(f, TTSAudioRawFrame)]
    after_audio = [f for f in down[interrupted_at:] if isinstance(f, TTSAudioRawFrame)]
    assert before_audio, "the first reply played before the interruption"
    first = before_audio[0].context_id
    assert all(f.context_id != first for f in after_audio)  # nothing more of it
    assert sum(len(f.audio) for f in after_audio) == 2 * samples_of("Asante.")
    assert sum(len(f.audio) for f in before_audio) < 2 * samples_of("Habari yako?", long_reply)
    assert connections == ["open"]  # no reconnection: the cancel did it
    assert cancelled_requests(gateway) == before + 1
    stats = llm.wait_for(lambda s: s["running"] == 0, 10)
    assert stats["aborted"] >= 1


def test_words_are_spread_over_their_sentence_by_characters():
    assert word_times("Habari yako", 1.0, 2.1) == [("Habari", 1.0), ("yako", pytest.approx(1.7))]
    assert word_times("", 0.0, 1.0) == []
