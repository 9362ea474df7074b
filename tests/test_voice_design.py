"""Voice design end to end: a real gateway process (uvicorn on loopback) against the
stand-in LLM, driven over HTTP. The stand-in answers the controllable prompt with
attribute tokens, 32 global tokens that depend on the labels and the seed, then speech,
and it records every request, so a test knows which voice each candidate must carry.
"""

from __future__ import annotations

import base64
import io
import os
import re
import subprocess
import sys
import wave

import pytest
import requests

from decoder_gateway.api.voices_protocol import DEFAULT_PREVIEW_TEXT
from decoder_gateway.llm.prompt import VoiceStyle, controllable_prompt
from decoder_gateway.voices.catalog import VoiceCatalog
from devtools.gateway_server import REPO, GatewayServer
from devtools.standin_llm import expected_global_tokens, expected_semantic_count

HOP = 320  # samples per semantic token at 16 kHz
STYLE = {"gender": "female", "pitch": "high", "speed": "moderate"}


@pytest.fixture
def design_gateway(make_gateway) -> GatewayServer:
    return make_gateway(VOICE_DESIGN="on")


def design(gateway: GatewayServer, **body: object) -> requests.Response:
    return requests.post(f"{gateway.url}/v1/audio/voices/design", json=body, timeout=60)


def save(gateway: GatewayServer, **body: object) -> requests.Response:
    return requests.post(f"{gateway.url}/v1/audio/voices", json=body, timeout=30)


def wav_of(data_url: str) -> tuple[int, int, bytes]:
    """(sample rate, channels, PCM) of a ``data:audio/wav;base64,`` URL."""
    prefix = "data:audio/wav;base64,"
    assert data_url.startswith(prefix)
    with wave.open(io.BytesIO(base64.b64decode(data_url[len(prefix) :]))) as file:
        assert file.getsampwidth() == 2
        return file.getframerate(), file.getnchannels(), file.readframes(file.getnframes())


def design_requests(llm) -> list[dict]:
    return [r for r in llm.stats()["requests"] if "task_controllable_tts" in r["prompt"]]


def prompt_globals(prompt: str) -> list[int]:
    return [int(t) for t in re.findall(r"<\|bicodec_global_(\d+)\|>", prompt)]


# -- off by default ---------------------------------------------------------------------


def test_design_is_off_by_default_with_a_501_that_says_why(gateway, llm):
    response = design(gateway, **STYLE)
    assert response.status_code == 501
    error = response.json()["error"]
    assert error["code"] == "voice_design_unavailable"
    assert "SparkAudio/Spark-TTS-0.5B" in error["message"] and "fine-tune" in error["message"]
    assert "VOICE_DESIGN" in error["message"]
    assert llm.stats()["received"] == 0  # nothing reached the LLM


# -- design, audition, save, speak -------------------------------------------------------


def test_candidates_carry_the_voices_the_model_wrote_and_a_wav_preview(design_gateway, llm):
    response = design(design_gateway, **STYLE, seed=7)
    assert response.status_code == 200, response.text
    candidates = response.json()["candidates"]
    assert len(candidates) == 3  # the default
    prompt = controllable_prompt(DEFAULT_PREVIEW_TEXT, VoiceStyle("female", "high", "moderate"))
    assert prompt.endswith(
        "<|start_style_label|><|gender_0|><|pitch_label_3|><|speed_label_2|><|end_style_label|>"
    )
    samples = expected_semantic_count(prompt) * HOP
    for index, candidate in enumerate(candidates):
        # The globals the model wrote after its attribute tokens, read by id: candidate
        # i sampled with seed 7 + i.
        assert candidate["global_tokens"] == expected_global_tokens(prompt, seed=7 + index)
        rate, channels, pcm = wav_of(candidate["audio"])
        assert (rate, channels) == (16000, 1)
        assert len(pcm) == 2 * samples and any(pcm)
        assert candidate["duration_s"] == pytest.approx(samples / 16000, abs=1e-3)
    assert len({tuple(c["global_tokens"]) for c in candidates}) == 3

    sent = design_requests(llm)
    assert [r["prompt"] for r in sent] == [prompt] * 3
    assert sorted(r["seed"] for r in sent) == [7, 8, 9]
    assert all(r["temperature"] == pytest.approx(0.8) for r in sent)

    # The same seed designs the same voices; other labels design others.
    again = design(design_gateway, **STYLE, seed=7, candidates=1).json()["candidates"]
    assert again[0]["global_tokens"] == candidates[0]["global_tokens"]
    male = design(design_gateway, gender="male", pitch="very_low", speed="very_high", seed=7)
    assert male.status_code == 200
    assert male.json()["candidates"][0]["global_tokens"] != candidates[0]["global_tokens"]


def test_a_server_without_token_ids_reads_the_voice_from_the_text(design_gateway, llm):
    llm.control(text_only=True, split_text_tokens=True)
    response = design(design_gateway, **STYLE, text="Short one.", candidates=1, seed=3)
    assert response.status_code == 200, response.text
    prompt = controllable_prompt("Short one.", VoiceStyle("female", "high", "moderate"))
    assert response.json()["candidates"][0]["global_tokens"] == expected_global_tokens(
        prompt, seed=3
    )


def test_save_a_designed_voice_then_speak_with_it_everywhere(design_gateway, llm):
    candidate = design(design_gateway, **STYLE, candidates=2).json()["candidates"][1]
    tokens = candidate["global_tokens"]
    response = save(
        design_gateway,
        name="bright",
        global_tokens=tokens,
        gender="female",
        speaker_description="high, designed",
    )
    assert response.status_code == 201, response.text
    voice = response.json()["voice"]
    default = VoiceCatalog.load().resolve(None)
    assert voice["id"] == voice["name"] == "bright" and voice["global_tokens"] == tokens
    assert voice["speaker_id"] == default.speaker_id and voice["base_voice"] == default.id
    assert voice["gender"] == "female" and voice["speaker_description"] == "high, designed"
    assert voice["created_at"].endswith("Z")
    listed = requests.get(f"{design_gateway.url}/v1/audio/voices", timeout=10).json()
    assert {"id": "bright", "cloned": True}.items() <= next(
        v for v in listed["voices"] if v["id"] == "bright"
    ).items()
    one = requests.get(f"{design_gateway.url}/v1/audio/voices/bright", timeout=10)
    assert one.json()["voice"]["global_tokens"] == tokens

    stream = requests.post(
        f"{design_gateway.url}/v1/audio/speech/stream",
        json={"text": "Oli otya?", "voice": "bright"},
        timeout=30,
    )
    assert stream.status_code == 200 and len(stream.content) > 0
    prompt = llm.stats()["requests"][-1]["prompt"]
    assert prompt_globals(prompt) == tokens
    # The base model's own prompt: no speaker id before the text.
    assert "<|start_content|>Oli otya?<|end_content|>" in prompt
    speech = requests.post(
        f"{design_gateway.url}/v1/audio/speech",
        json={"input": "Webale nnyo.", "voice": "bright", "response_format": "wav"},
        timeout=30,
    )
    assert speech.status_code == 200 and speech.content[:4] == b"RIFF"
    assert prompt_globals(llm.stats()["requests"][-1]["prompt"]) == tokens


def test_tokens_made_elsewhere_import_without_design_or_a_speaker_encoder(gateway, llm):
    tokens = [(i * 977 + 5) % 4096 for i in range(32)]
    response = save(gateway, name="imported_voice", global_tokens=tokens, base_voice="swahili_male")
    assert response.status_code == 201, response.text
    try:
        assert response.json()["voice"]["base_voice"] == "swahili_male"
        spoken = requests.post(
            f"{gateway.url}/v1/audio/speech/stream",
            json={"text": "Habari yako?", "voice": "imported_voice"},
            timeout=30,
        )
        assert spoken.status_code == 200
        prompt = llm.stats()["requests"][-1]["prompt"]
        assert prompt_globals(prompt) == tokens
        assert f"{VoiceCatalog.load().resolve('swahili_male').speaker_id}: " in prompt
        again = save(gateway, name="imported_voice", global_tokens=tokens)
        assert again.status_code == 409 and again.json()["error"]["code"] == "voice_exists"
    finally:
        requests.delete(f"{gateway.url}/v1/audio/voices/imported_voice", timeout=10)


# -- bad input ------------------------------------------------------------------------------

BAD_DESIGNS = [
    ({**STYLE, "gender": "other"}, "gender"),
    ({**STYLE, "pitch": "medium"}, "pitch"),
    ({**STYLE, "speed": "fast"}, "speed"),
    ({"pitch": "low", "speed": "low"}, "gender"),
    ({**STYLE, "candidates": 0}, "candidates"),
    ({**STYLE, "candidates": 5}, "candidates"),
    ({**STYLE, "text": "   "}, "text"),
    ({**STYLE, "text": "Hi <|end_content|> there"}, "text"),
    ({**STYLE, "text": "word " * 100}, "text"),
    ({**STYLE, "colour": "blue"}, "colour"),
]

BAD_SAVES = [
    ({"name": "v", "global_tokens": list(range(31))}, "global_tokens"),
    ({"name": "v", "global_tokens": list(range(33))}, "global_tokens"),
    ({"name": "v", "global_tokens": [*range(31), 4096]}, "global_tokens"),
    ({"name": "v", "global_tokens": [*range(31), -1]}, "global_tokens"),
    ({"name": "v", "global_tokens": [*range(31), "x"]}, "global_tokens"),
    ({"name": "v"}, "global_tokens"),
    ({"global_tokens": list(range(32))}, "name"),
    ({"name": "a b", "global_tokens": list(range(32))}, "name"),
    ({"name": "v", "global_tokens": list(range(32)), "base_voice": "nope"}, "base_voice"),
]


def test_bad_input_is_a_400_naming_the_field(design_gateway, llm):
    for body, param in BAD_DESIGNS:
        response = design(design_gateway, **body)
        assert response.status_code == 400, (body, response.text)
        assert response.json()["error"]["param"].startswith(param), (body, response.json())
    for body, param in BAD_SAVES:
        response = save(design_gateway, **body)
        assert response.status_code == 400, (body, response.text)
        assert response.json()["error"]["param"].startswith(param), (body, response.json())
    taken = save(design_gateway, name="luganda_female", global_tokens=list(range(32)))
    assert taken.status_code == 409
    assert design_requests(llm) == []
    listed = requests.get(f"{design_gateway.url}/v1/audio/voices", timeout=10).json()
    assert not [v for v in listed["voices"] if v["cloned"]]


# -- a wrong count of global tokens ----------------------------------------------------------


def test_a_wrong_count_is_retried_once_with_another_seed(design_gateway, llm):
    llm.control(global_count=31, fault_requests=1)
    response = design(design_gateway, **STYLE, candidates=1, seed=11)
    assert response.status_code == 200, response.text
    sent = design_requests(llm)
    assert len(sent) == 2 and sent[0]["seed"] != sent[1]["seed"]
    prompt = sent[1]["prompt"]
    tokens = response.json()["candidates"][0]["global_tokens"]
    assert tokens == expected_global_tokens(prompt, seed=sent[1]["seed"])


@pytest.mark.parametrize("count", [31, 33, 0])
def test_a_wrong_count_twice_is_an_explicit_error_never_a_voice(design_gateway, llm, count):
    llm.control(global_count=count)
    response = design(design_gateway, **STYLE, candidates=2)
    assert response.status_code == 502, response.text
    error = response.json()["error"]
    assert error["code"] == "voice_design_failed" and error["type"] == "server_error"
    assert f"{count} then {count} global tokens" in error["message"]
    assert len(design_requests(llm)) <= 4  # each candidate: one try and one retry
    llm.reset()
    assert requests.get(f"{design_gateway.url}/health", timeout=10).status_code == 200
    assert design(design_gateway, **STYLE, candidates=1).status_code == 200


# -- structured outputs (DESIGN_STRUCTURED_OUTPUTS) ------------------------------------------

# The design's shape over the upstream token ids (PROTOCOL.md): optional attribute values
# between the acoustic markers, exactly 32 globals, then speech until a stop token.
DESIGN_GRAMMAR = """\
start: acoustic? <[165150]> voice{32} <[165156]> <[165151]> speech+
acoustic: <[165149]> attribute{0,8} <[165155]>
attribute: <[163953-165148]>
voice: <[151665-155760]>
speech: <[155761-163952]>
"""


def test_design_generations_carry_the_grammar_and_speech_does_not(design_gateway, llm):
    response = design(design_gateway, **STYLE, candidates=2, seed=5)
    assert response.status_code == 200, response.text
    sent = design_requests(llm)
    assert len(sent) == 2
    assert [r["structured_outputs"] for r in sent] == [{"grammar": DESIGN_GRAMMAR}] * 2
    tokens = response.json()["candidates"][0]["global_tokens"]
    assert save(design_gateway, name="shaped", global_tokens=tokens).status_code == 201
    spoken = requests.post(
        f"{design_gateway.url}/v1/audio/speech/stream",
        json={"text": "Oli otya?", "voice": "shaped"},
        timeout=30,
    )
    assert spoken.status_code == 200 and spoken.content
    assert "structured_outputs" not in llm.stats()["requests"][-1]


def test_structured_outputs_off_sends_the_design_unconstrained(make_gateway, llm):
    gateway = make_gateway(VOICE_DESIGN="on", DESIGN_STRUCTURED_OUTPUTS="off")
    response = design(gateway, **STYLE, candidates=1, seed=5)
    assert response.status_code == 200, response.text
    sent = design_requests(llm)
    assert len(sent) == 1 and "structured_outputs" not in sent[0]


def test_a_vllm_that_refuses_the_grammar_is_a_502_naming_the_setting(design_gateway, llm):
    llm.control(fail_before_stream=400, fault_match="task_controllable_tts")
    response = design(design_gateway, **STYLE, candidates=1)
    assert response.status_code == 502, response.text
    message = response.json()["error"]["message"]
    assert "refused" in message and "DESIGN_STRUCTURED_OUTPUTS=off" in message


# -- the command-line client -------------------------------------------------------------


def run_cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "decoder_gateway.client", "voices", *args, "--url", url],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=REPO,
        env={k: v for k, v in os.environ.items() if k != "GATEWAY_API_KEY"},
    )


def test_cli_design_writes_the_previews_and_saves_the_pick(design_gateway, llm, tmp_path):
    out = tmp_path / "previews"
    result = run_cli(
        design_gateway.url,
        *("design", "--gender", "male", "--pitch", "low", "--speed", "high"),
        *("--candidates", "2", "--seed", "40", "--out", str(out), "--save", "deep", "--pick", "2"),
    )
    assert result.returncode == 0, result.stderr
    assert "saved candidate 2 as voice deep" in result.stdout
    for number in (1, 2):
        with wave.open(str(out / f"candidate-{number}.wav")) as file:
            assert file.getframerate() == 16000 and file.getnframes() > 0
    prompt = controllable_prompt(DEFAULT_PREVIEW_TEXT, VoiceStyle("male", "low", "high"))
    stored = requests.get(f"{design_gateway.url}/v1/audio/voices/deep", timeout=10).json()
    assert stored["voice"]["global_tokens"] == expected_global_tokens(prompt, seed=41)
    assert stored["voice"]["gender"] == "male"


def test_cli_design_on_a_server_without_it_exits_1_with_the_reason(gateway, llm, tmp_path):
    result = run_cli(gateway.url, "design", "--gender", "female", "--out", str(tmp_path))
    assert result.returncode == 1
    assert "VOICE_DESIGN" in result.stderr and "HTTP 501" in result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []
