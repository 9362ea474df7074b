"""Voice design against the real vLLM OpenAI server (CPU build, tiny Spark-format LM).

The tiny model has no trained voice-design behaviour: after the controllable prompt
it writes noise. With structured outputs (DESIGN_STRUCTURED_OUTPUTS, the default) the
design grammar confines it to the design's shape; from ``<|start_global_token|>`` on
it then follows its fixed chain, so its designed voice is known in advance
(``tiny.expected_global_values()``) and so is the preview's length.
"""

from __future__ import annotations

import base64
import io
import wave

import pytest
import requests

from devtools import tiny_spark_lm as tiny
from devtools.gateway_server import GatewayServer

pytestmark = pytest.mark.vllm

HOP = 320  # samples per semantic token at 16 kHz
SEGMENT_BYTES = tiny.DEFAULT_SEMANTIC_LENGTH * HOP * 2
STYLE = {"gender": "male", "pitch": "low", "speed": "high"}


@pytest.fixture(scope="module")
def design_gateway(vllm_server, tmp_path_factory):
    with GatewayServer(
        vllm_server.base_url,
        tmp_path_factory.mktemp("gw_design_vllm"),
        MODEL_NAME=vllm_server.served_model_name,
        VOICE_DESIGN="on",
        DESIGN_STRUCTURED_OUTPUTS="on",
    ) as server:
        yield server


def wav_pcm(data_url: str) -> bytes:
    prefix = "data:audio/wav;base64,"
    assert data_url.startswith(prefix)
    with wave.open(io.BytesIO(base64.b64decode(data_url[len(prefix) :]))) as file:
        assert (file.getframerate(), file.getnchannels(), file.getsampwidth()) == (16000, 1, 2)
        return file.readframes(file.getnframes())


def test_the_random_model_designs_valid_voices_that_can_be_saved_and_spoken(design_gateway):
    response = requests.post(
        f"{design_gateway.url}/v1/audio/voices/design",
        json={**STYLE, "text": "Oli otya?", "candidates": 2, "seed": 3},
        timeout=180,
    )
    assert response.status_code == 200, response.text
    candidates = response.json()["candidates"]
    assert len(candidates) == 2
    for candidate in candidates:
        tokens = candidate["global_tokens"]
        assert len(tokens) == 32 and all(0 <= t <= 4095 for t in tokens)
        # What the chain writes after <|start_global_token|>, whatever came before it.
        assert tokens == tiny.expected_global_values()
        pcm = wav_pcm(candidate["audio"])
        assert len(pcm) == SEGMENT_BYTES and any(pcm)

    saved = requests.post(
        f"{design_gateway.url}/v1/audio/voices",
        json={"name": "designed_on_vllm", "global_tokens": candidates[0]["global_tokens"]},
        timeout=30,
    )
    assert saved.status_code == 201, saved.text
    assert saved.json()["voice"]["global_tokens"] == tiny.expected_global_values()
    try:
        spoken = requests.post(
            f"{design_gateway.url}/v1/audio/speech/stream",
            json={"text": "Oli otya? Nze bulungi.", "voice": "designed_on_vllm"},
            timeout=120,
        )
        assert spoken.status_code == 200, spoken.text
        assert len(spoken.content) == 2 * SEGMENT_BYTES  # two sentences of the chain
    finally:
        requests.delete(f"{design_gateway.url}/v1/audio/voices/designed_on_vllm", timeout=10)


def test_a_style_request_designs_its_voice_on_the_real_server(design_gateway):
    """The first sentence with the controllable prompt under the design grammar, its
    voice returned in the header and pinned for the second sentence."""
    response = requests.post(
        f"{design_gateway.url}/v1/audio/speech/stream",
        json={"text": "Oli otya? Nze bulungi.", "style": STYLE},
        timeout=180,
    )
    assert response.status_code == 200, response.text
    tokens = [int(t) for t in response.headers["x-voice-global-tokens"].split(",")]
    assert tokens == tiny.expected_global_values()
    assert len(response.content) == 2 * SEGMENT_BYTES and any(response.content)


def test_without_structured_outputs_the_random_model_writes_no_voice(vllm_server, tmp_path):
    """Why the setting matters: unconstrained, the same model writes noise, and the
    gateway refuses it (after one retry) rather than decode a wrong voice."""
    with GatewayServer(
        vllm_server.base_url,
        tmp_path,
        MODEL_NAME=vllm_server.served_model_name,
        VOICE_DESIGN="on",
        DESIGN_STRUCTURED_OUTPUTS="off",
    ) as gateway:
        response = requests.post(
            f"{gateway.url}/v1/audio/voices/design",
            json={**STYLE, "text": "Oli otya?", "candidates": 1, "seed": 3},
            timeout=180,
        )
    assert response.status_code == 502, response.text
    assert response.json()["error"]["code"] == "voice_design_failed"
