"""What the benchmark asks of the gateway: the request settings, the texts, the plans.

The paragraphs are fixed so that runs compare: the same words, hence the same audio
lengths, every time.
"""

from __future__ import annotations

from dataclasses import dataclass

from decoder_gateway.api.stream_protocol import SpeechStreamRequest
from decoder_gateway.voices.catalog import VoiceCatalog

VOICE = VoiceCatalog.load().default_voice
TEMPERATURE = SpeechStreamRequest.model_fields["temperature"].default  # the request default
STANDIN_MODEL = "spark-tts"
STANDIN_TOKENS_PER_S = 200.0
STANDIN_PREFILL_S = 0.02
STANDIN_TOKENS_PER_WORD = 10

# Client paragraphs (3 sentences; 2 for the tiny vLLM, whose sentences are all
# `--vllm-semantic-length` tokens long whatever the text).
PARAGRAPHS = [
    "The market opens early on Saturday morning. Farmers bring fresh tomatoes, "
    "onions and bananas from the villages. Most of the stalls are sold out before noon.",
    "Please remember to bring your identity card to the clinic. The nurse will check "
    "your details before you see the doctor. The clinic closes at five in the evening.",
    "Heavy rain is expected across the central region tonight. Drivers should take "
    "care on the roads near the lake. The weather will clear by tomorrow afternoon.",
    "Our school football team won the district final yesterday. The players trained "
    "every evening for three months. The whole village came out to welcome them home.",
    "The new water tank was built with help from the parish council. Each family can "
    "now collect clean water close to home. Children no longer walk miles to the well.",
    "Thank you for calling the farmers' help line. Our advisers can answer questions "
    "about seeds, fertiliser and pests. Please stay on the line and we will be with you soon.",
    "The bus to Kampala leaves the station every hour. Tickets can be bought from the "
    "office or on your phone. Children under five travel for free with an adult.",
    "Wash your hands with soap before you prepare food. Keep drinking water covered and "
    "clean. These small habits protect the whole family from disease.",
]
COMPARE_PARAGRAPH = (
    "Good morning, and welcome to the evening news from Kampala. Parliament has "
    "approved a new budget for roads and schools in the northern districts. "
    "The minister says the first projects will begin before the end of the year."
)


@dataclass
class Plan:
    load: list[tuple[int, int]]  # (concurrent clients, requests per client)
    compare_repeats: int
