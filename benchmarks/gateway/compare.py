"""The ``compare`` section: the gateway against the original single-file server's way
(sentence after sentence, each generated in full, decoded whole, then delivered)."""

from __future__ import annotations

import asyncio

from report import table  # benchmarks/, the script's own folder

from decoder_gateway.client import GatewayClient
from decoder_gateway.llm.client import LLMClient
from decoder_gateway.settings import Settings
from decoder_gateway.text import split_segments
from decoder_gateway.voices.catalog import VoiceCatalog
from devtools.gateway_server import GatewayServer
from gateway.decoder import Decoder
from gateway.llms import Llm
from gateway.measure import BaselineTimes, Delivery, baseline_request, gateway_request
from gateway.stats import median, ms
from gateway.workload import COMPARE_PARAGRAPH, VOICE, Plan


async def _compare_round(
    llm_info: Llm, url: str, decoder: Decoder, text: str, times: BaselineTimes
) -> tuple[Delivery, Delivery]:
    settings = Settings()
    voice = VoiceCatalog.load().resolve(VOICE)
    llm = LLMClient(llm_info.base_url, "EMPTY", llm_info.model)
    try:
        await llm.check_token_map()
        async with GatewayClient(url, timeout_s=300.0) as client:
            ours = await gateway_request(client, text)
        theirs = await baseline_request(llm, decoder, voice, settings, text, times)
    finally:
        await llm.close()
    return ours, theirs


def run_compare(llm: Llm, gateway: GatewayServer, decoder: Decoder, plan: Plan) -> None:
    text = COMPARE_PARAGRAPH
    sentences = split_segments(text, max_chars=Settings().max_segment_chars)
    # Warm-up of both paths (connections, first decode of each length class).
    asyncio.run(_compare_round(llm, gateway.url, decoder, text, BaselineTimes()))
    times = BaselineTimes()
    ours: list[Delivery] = []
    theirs: list[Delivery] = []
    for _ in range(plan.compare_repeats):
        a, b = asyncio.run(_compare_round(llm, gateway.url, decoder, text, times))
        ours.append(a)
        theirs.append(b)
    rows = []
    for name, runs in (
        ("gateway: token streaming, 2 sentences in flight", ours),
        ("original: sentence by sentence, generate all, decode whole", theirs),
    ):
        rows.append(
            [
                name,
                ms(median([d.ttfa_s for d in runs])),
                f"{ms(min(d.ttfa_s for d in runs))}-{ms(max(d.ttfa_s for d in runs))}",
                f"{median([d.total_s for d in runs]):.2f}",
                f"{median([d.audio_s for d in runs]):.2f}",
                f"{median([d.rtf for d in runs]):.3f}",
                f"{median([d.stall_s for d in runs]):.2f}",
                f"{median([d.ttfa_s + d.audio_s + d.stall_s for d in runs]):.2f}",
            ]
        )
    gain = median([d.ttfa_s for d in theirs]) / median([d.ttfa_s for d in ours])
    table(
        f"{llm.name}: one {len(sentences)}-sentence paragraph "
        f"({len(text.split())} words), median of {plan.compare_repeats}, alone on the server",
        [
            "pipeline",
            "TTFA (ms)",
            "TTFA range (ms)",
            "total (s)",
            "audio (s)",
            "RTF",
            "playback stall (s)",
            "listener hears the end at (s)",
        ],
        rows,
    )
    n = len(sentences)
    print(
        f"\nTTFA {gain:.1f}x lower with the gateway. Baseline per sentence (median): "
        f"LLM {ms(median(times.llm_s))} ms for {int(median(times.tokens))} tokens "
        f"({median(times.tokens) / median(times.llm_s):.0f} tokens/s), whole-sentence "
        f"decode {ms(median(times.decode_s))} ms; tokens per sentence "
        f"{times.tokens[-n:]}. The baseline has no HTTP hop (the gateway's figures include one)."
    )
