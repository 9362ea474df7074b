"""The tiny Spark-format LM on the real vLLM CPU server: wire format and exact outputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from devtools import tiny_spark_lm as tiny
from devtools.vllm_server import VllmServer

pytestmark = pytest.mark.vllm

VOICES = Path(__file__).resolve().parents[1] / "decoder_gateway" / "voices" / "voices.json"
STOP_IDS = [tiny.END_SEMANTIC_ID, tiny.IM_END_ID]


def _voice(speaker_id: int) -> dict[str, Any]:
    """The voice entry of ``speaker_id`` from the package's voices.json."""
    voices = json.loads(VOICES.read_text())["voices"]
    return next(v for v in voices if v["speaker_id"] == speaker_id)


def _speaker_prompt(speaker_id: int, text: str) -> str:
    """Speaker fine-tune prompt with the voice's pinned 32 global tokens."""
    globals_ = "".join(tiny.global_token(v) for v in _voice(speaker_id)["global_tokens"])
    return (
        f"<|task_tts|><|start_content|>{speaker_id}: {text}<|end_content|>"
        f"<|start_global_token|>{globals_}<|end_global_token|><|start_semantic_token|>"
    )


def _request(server: VllmServer, prompt: str, **overrides: Any) -> dict[str, Any]:
    """A completions body with every sampling field set, as the gateway sends it."""
    body: dict[str, Any] = {
        "model": server.served_model_name,
        "prompt": prompt,
        "max_tokens": 400,
        "temperature": 0.8,
        "top_k": 50,
        "top_p": 0.95,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "stop_token_ids": STOP_IDS,
        "skip_special_tokens": False,
        "return_token_ids": True,
    }
    body.update(overrides)
    return body


def _stream(server: VllmServer, body: dict[str, Any]) -> list[dict[str, Any]]:
    """POST a streamed completion and return the decoded SSE events (without [DONE])."""
    events: list[dict[str, Any]] = []
    done = False
    with (
        httpx.Client(timeout=60) as client,
        client.stream("POST", f"{server.base_url}/completions", json=body) as resp,
    ):
        assert resp.status_code == 200, resp.read()
        for line in resp.iter_lines():
            if not line:
                continue
            assert line.startswith("data: "), line
            payload = line[len("data: ") :]
            if payload == "[DONE]":
                done = True
                continue
            assert not done, "event after [DONE]"
            events.append(json.loads(payload))
    assert done, "stream did not end with [DONE]"
    return events


def _choices(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """All choice deltas of a stream, in order."""
    return [c for e in events for c in e.get("choices", [])]


def test_speaker_prompt_streams_exact_semantic_chain(vllm_server: VllmServer) -> None:
    """Pinned voice prompt: the model emits exactly the semantic chain, then the stop."""
    body = _request(
        vllm_server,
        _speaker_prompt(248, "Hello world."),
        stream=True,
        stream_options={"include_usage": True},
    )
    events = _stream(vllm_server, body)
    choices = _choices(events)
    assert "error" not in json.dumps(events[0])
    assert isinstance(choices[0]["prompt_token_ids"], list)
    assert choices[0]["prompt_token_ids"][-2:] == [tiny.END_GLOBAL_ID, tiny.START_SEMANTIC_ID]

    ids = [i for c in choices for i in (c.get("token_ids") or [])]
    expected = tiny.expected_semantic_ids()
    assert ids == [*expected, tiny.END_SEMANTIC_ID]

    last = choices[-1]
    assert last["finish_reason"] == "stop"
    assert last["stop_reason"] == tiny.END_SEMANTIC_ID
    assert all(c["finish_reason"] is None for c in choices[:-1])

    text = "".join(c["text"] for c in choices)
    assert text == "".join(tiny.semantic_token(v) for v in tiny.expected_semantic_values())

    usage_events = [e for e in events if not e.get("choices")]
    assert len(usage_events) == 1 and usage_events[0] is events[-1]
    assert usage_events[0]["usage"]["completion_tokens"] == len(expected) + 1


def test_open_global_prompt_generates_32_globals_then_semantics(
    vllm_server: VllmServer,
) -> None:
    """A prompt ending at <|start_global_token|> yields 32 globals, then semantics."""
    prompt = "<|task_tts|><|start_content|>248: Hello world.<|end_content|><|start_global_token|>"
    events = _stream(vllm_server, _request(vllm_server, prompt, stream=True))
    ids = [i for c in _choices(events) for i in (c.get("token_ids") or [])]
    assert ids == [
        *tiny.expected_global_ids(),
        tiny.END_GLOBAL_ID,
        tiny.START_SEMANTIC_ID,
        *tiny.expected_semantic_ids(),
        tiny.END_SEMANTIC_ID,
    ]


def test_im_end_after_end_semantic_without_stop_ids(vllm_server: VllmServer) -> None:
    """Without stop ids the chain ends at <|im_end|>, the model's EOS."""
    body = _request(vllm_server, "<|end_semantic_token|>", stop_token_ids=[])
    resp = httpx.post(f"{vllm_server.base_url}/completions", json=body, timeout=60)
    resp.raise_for_status()
    choice = resp.json()["choices"][0]
    assert choice["token_ids"] == [tiny.IM_END_ID]
    assert choice["finish_reason"] == "stop"


def test_tokenize_gives_the_real_spark_ids(vllm_server: VllmServer) -> None:
    """POST /tokenize maps every kind of Spark token string to its PROTOCOL.md id."""
    strings = {
        **tiny.NAMED_TOKENS,
        tiny.global_token(0): tiny.GLOBAL_BASE,
        tiny.global_token(4095): tiny.GLOBAL_BASE + 4095,
        tiny.semantic_token(0): tiny.SEMANTIC_BASE,
        tiny.semantic_token(8191): tiny.SEMANTIC_BASE + 8191,
        "<|gender_1|>": tiny.GENDER_BASE + 1,
        "<|pitch_label_4|>": tiny.PITCH_LABEL_BASE + 4,
        "<|speed_label_2|>": tiny.SPEED_LABEL_BASE + 2,
    }
    prompt = "".join(strings)
    resp = httpx.post(
        f"{vllm_server.url}/tokenize",
        json={"model": vllm_server.served_model_name, "prompt": prompt},
        timeout=30,
    )
    resp.raise_for_status()
    data = resp.json()
    assert data["tokens"] == list(strings.values())
    assert data["count"] == len(strings)

    text = httpx.post(
        f"{vllm_server.url}/tokenize",
        json={"model": vllm_server.served_model_name, "prompt": "241: Hello world."},
        timeout=30,
    ).json()["tokens"]
    assert text and all(t < tiny.ENDOFTEXT_ID for t in text)


def test_metrics_count_generated_tokens(vllm_server: VllmServer) -> None:
    """The Prometheus endpoint reports generation counters for the served model."""
    metrics = vllm_server.metrics()
    assert "vllm:generation_tokens_total" in metrics
    assert f'model_name="{vllm_server.served_model_name}"' in metrics
