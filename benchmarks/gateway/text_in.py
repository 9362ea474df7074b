"""The ``text-in`` section: text streamed in, as a voice agent's LLM writes it, against
the same text sent whole."""

from __future__ import annotations

import asyncio
import time

from report import table  # benchmarks/, the script's own folder

from decoder_gateway.client import GatewayClient, TextInSocket
from decoder_gateway.text import split_segments
from devtools.gateway_server import GatewayServer
from gateway.llms import Llm
from gateway.measure import gateway_request
from gateway.stats import median, ms
from gateway.workload import COMPARE_PARAGRAPH, VOICE, Plan

AGENT_WORDS_PER_S = 30.0


async def _streamed_in(url: str, text: str) -> tuple[float, float, float]:
    """Feed ``text`` word by word at AGENT_WORDS_PER_S over WS /v1/audio/speech/stream.

    Returns (first audio after the fragment that made the first sentence certain,
    first audio after the first fragment, time the last fragment was sent).
    """
    words = text.split(" ")
    first_sentence = split_segments(text)[0]
    # The first sentence is certain once the first character after it arrives.
    confirming = len(first_sentence.split(" "))
    sent_at: list[float] = []
    first_audio = asyncio.get_running_loop().create_future()

    async def feed(session: TextInSocket) -> None:
        for i, word in enumerate(words):
            await session.write(word + " ")
            sent_at.append(time.monotonic())
            if i + 1 < len(words):
                await asyncio.sleep(1 / AGENT_WORDS_PER_S)
        await session.done()

    async with (
        GatewayClient(url, timeout_s=300.0, connect_timeout_s=10.0) as client,
        client.text_in_socket() as session,
    ):
        await session.configure(voice=VOICE, response_format="pcm", stream_audio=True)
        sender = asyncio.create_task(feed(session))
        async for frame in session.frames():  # until session.done
            if isinstance(frame, bytes) and not first_audio.done():
                first_audio.set_result(time.monotonic())
        await sender
    heard = first_audio.result()
    return heard - sent_at[confirming], heard - sent_at[0], sent_at[-1] - sent_at[0]


async def _whole(url: str, text: str) -> float:
    async with GatewayClient(url, timeout_s=300.0) as client:
        return (await gateway_request(client, text)).ttfa_s


def run_text_in(llm: Llm, gateway: GatewayServer, plan: Plan) -> None:
    text = COMPARE_PARAGRAPH
    first_sentence = split_segments(text)[0]
    asyncio.run(_streamed_in(gateway.url, text))  # warm-up
    streamed, whole_first, whole_reply = [], [], []
    for _ in range(plan.compare_repeats):
        streamed.append(asyncio.run(_streamed_in(gateway.url, text)))
        whole_first.append(asyncio.run(_whole(gateway.url, first_sentence)))
        whole_reply.append(asyncio.run(_whole(gateway.url, text)))
    typing_s = median([s[2] for s in streamed])
    # When the first sentence is certain (its last word + the next one), from the first word.
    certain_s = len(first_sentence.split(" ")) / AGENT_WORDS_PER_S
    rows = [
        [
            "streamed in, word by word (WS /v1/audio/speech/stream)",
            ms(median([s[0] for s in streamed])),
            ms(median([s[1] for s in streamed])),
        ],
        [
            "first sentence sent whole once certain (POST /v1/audio/speech/stream)",
            ms(median(whole_first)),
            ms(certain_s + median(whole_first)),
        ],
        [
            "whole reply sent once written (POST /v1/audio/speech/stream)",
            "-",
            ms(typing_s + median(whole_reply)),
        ],
    ]
    header = [
        "text in",
        "first audio after the first sentence is certain (ms)",
        "first audio after the LLM's first word (ms)",
    ]
    table(
        f"{llm.name}: a reply written at {AGENT_WORDS_PER_S:g} words/s "
        f"({len(text.split())} words, {typing_s:.2f} s to write), median of "
        f"{plan.compare_repeats}",
        header,
        rows,
    )
