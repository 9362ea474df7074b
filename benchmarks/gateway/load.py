"""The ``load`` section: concurrent clients posting paragraphs back to back."""

from __future__ import annotations

import asyncio
import time

from report import table  # benchmarks/, the script's own folder

from decoder_gateway.client import GatewayClient
from devtools.gateway_server import GatewayServer
from gateway.llms import Llm
from gateway.measure import Delivery, decoder_stats, gateway_metrics, gateway_request, tree_cpu_s
from gateway.stats import median, ms, p90
from gateway.workload import Plan


async def load_level(url: str, texts: list[str], clients: int, each: int) -> list[Delivery]:
    async with GatewayClient(
        url, timeout_s=300.0, connect_timeout_s=10.0, max_connections=clients + 4
    ) as client:

        async def one_client(i: int) -> list[Delivery]:
            return [
                await gateway_request(client, texts[(i + r * clients) % len(texts)])
                for r in range(each)
            ]

        per_client = await asyncio.gather(*(one_client(i) for i in range(clients)))
    return [d for ds in per_client for d in ds]


def run_load(llm: Llm, gateway: GatewayServer, plan: Plan, texts: list[str]) -> None:
    assert gateway.process is not None
    rows = []
    for clients, each in plan.load:
        cpu_gw, cpu_llm = tree_cpu_s(gateway.process.pid), tree_cpu_s(llm.pid)
        cpu_me = time.process_time()
        metrics = gateway_metrics(gateway.url)
        started = time.perf_counter()
        deliveries = asyncio.run(load_level(gateway.url, texts, clients, each))
        wall = time.perf_counter() - started
        cpu_gw = tree_cpu_s(gateway.process.pid) - cpu_gw
        cpu_llm = tree_cpu_s(llm.pid) - cpu_llm
        cpu_me = time.process_time() - cpu_me
        batch, busy, rate = decoder_stats(metrics, gateway_metrics(gateway.url), wall)
        ttfa = [d.ttfa_s for d in deliveries]
        audio = sum(d.audio_s for d in deliveries)
        rows.append(
            [
                clients,
                len(deliveries),
                f"{audio / len(deliveries):.1f}",
                ms(median(ttfa)),
                ms(p90(ttfa)),
                ms(max(ttfa)),
                f"{median([d.rtf for d in deliveries]):.3f}",
                f"{max(d.rtf for d in deliveries):.3f}",
                f"{median([d.stall_s for d in deliveries]):.2f}",
                f"{audio / wall:.1f}",
                f"{cpu_gw / wall:.2f} / {cpu_llm / wall:.2f} / {cpu_me / wall:.2f}",
                batch,
                busy,
                rate,
            ]
        )
    table(
        f"{llm.name}: concurrent clients, each posting paragraphs back to back",
        [
            "clients",
            "requests",
            "audio per request (s)",
            "TTFA median (ms)",
            "TTFA p90 (ms)",
            "TTFA max (ms)",
            "RTF median",
            "RTF max",
            "playback stall median (s)",
            "audio s per wall s",
            "CPU cores: gateway / LLM / client",
            "spans per decoder pass",
            "decoder busy",
            "LLM tokens/s per segment",
        ],
        rows,
    )
