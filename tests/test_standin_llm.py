"""The stand-in for vLLM's OpenAI server (tests/support/standin_llm.py), checked with
the official openai client and httpx: the wire format the gateway relies on, and
each fault it can inject."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import openai
import pytest
from openai import AsyncOpenAI

from devtools.standin_llm import (
    END_SEMANTIC,
    GLOBAL_BASE,
    IM_END,
    SEMANTIC_BASE,
    StandinConfig,
    StandinServer,
    expected_global_tokens,
    expected_output_ids,
    expected_semantic_count,
    expected_semantic_tokens,
)

STOPS = [END_SEMANTIC, IM_END]
PINNED = [7 * i % 4096 for i in range(32)]
TEXT = "Oli otya, nnyabo"


def speaker_prompt(text: str = TEXT, globals_: list[int] | None = PINNED) -> str:
    prompt = f"<|task_tts|><|start_content|>acholi_female: {text}<|end_content|>"
    prompt += "<|start_global_token|>"
    if globals_ is None:
        return prompt
    pinned = "".join(f"<|bicodec_global_{g}|>" for g in globals_)
    return prompt + pinned + "<|end_global_token|><|start_semantic_token|>"


def body(prompt: str, **extra: Any) -> dict[str, Any]:
    """A request as the gateway sends it."""
    return {
        "model": "spark-tts",
        "prompt": prompt,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 2048,
        "temperature": 0.8,
        "top_p": 0.95,
        "top_k": 50,
        "stop_token_ids": STOPS,
        "skip_special_tokens": False,
        "spaces_between_special_tokens": False,
        "return_token_ids": True,
        **extra,
    }


def sse_events(text: str) -> list[str]:
    """The ``data:`` payloads of an SSE body, in order."""
    return [line[len("data: ") :] for line in text.split("\n") if line.startswith("data: ")]


@pytest.fixture(scope="module")
def server() -> Iterator[StandinServer]:
    with StandinServer(tokens_per_s=4000, prefill_s=0.0) as running:
        yield running


@pytest.fixture(autouse=True)
def _fresh(server: StandinServer) -> None:
    server.reset()


@pytest.fixture
async def client(server: StandinServer) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(base_url=server.base_url, api_key="none", max_retries=0) as api:
        yield api


async def stream_completion(client: AsyncOpenAI, prompt: str, **extra: Any) -> list[Any]:
    """All chunks of one streamed completion, through the openai client."""
    fields = body(prompt, **extra)
    stream = await client.completions.create(
        model=fields.pop("model"),
        prompt=fields.pop("prompt"),
        stream=True,
        stream_options=fields.pop("stream_options"),
        max_tokens=fields.pop("max_tokens"),
        temperature=fields.pop("temperature"),
        top_p=fields.pop("top_p"),
        extra_body={k: v for k, v in fields.items() if k != "stream"},
    )
    return [chunk async for chunk in stream]


async def apost(url: str, json_body: dict[str, Any]) -> httpx.Response:
    """A POST from an async test, without blocking its event loop."""
    async with httpx.AsyncClient(timeout=10) as http:
        return await http.post(url, json=json_body)


def ids_of(chunks: list[Any]) -> list[int]:
    return [i for chunk in chunks for choice in chunk.choices for i in (choice.token_ids or [])]


# ---- wire format ----------------------------------------------------------------------


def test_raw_stream_has_vllm_chunk_shape(server: StandinServer) -> None:
    prompt = speaker_prompt()
    response = httpx.post(f"{server.base_url}/completions", json=body(prompt), timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert "content-length" not in response.headers
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    *choice_chunks, usage_chunk = chunks
    for chunk in choice_chunks:
        assert list(chunk) == ["id", "object", "created", "model", "choices"]
        assert chunk["id"].startswith("cmpl-") and chunk["id"] == chunks[0]["id"]
        assert chunk["object"] == "text_completion"
        assert chunk["model"] == "spark-tts"
        assert isinstance(chunk["created"], int)
        (choice,) = chunk["choices"]
        assert list(choice) == [
            "index",
            "text",
            "logprobs",
            "finish_reason",
            "stop_reason",
            "prompt_token_ids",
            "token_ids",
        ]
        assert choice["index"] == 0 and choice["logprobs"] is None
    first, last = choice_chunks[0]["choices"][0], choice_chunks[-1]["choices"][0]
    assert isinstance(first["prompt_token_ids"], list) and first["prompt_token_ids"]
    assert all(c["choices"][0]["prompt_token_ids"] is None for c in choice_chunks[1:])
    assert all(c["choices"][0]["finish_reason"] is None for c in choice_chunks[:-1])
    assert last == {
        "index": 0,
        "text": "",
        "logprobs": None,
        "finish_reason": "stop",
        "stop_reason": END_SEMANTIC,
        "prompt_token_ids": None,
        "token_ids": [END_SEMANTIC],
    }
    # Semantic tokens as text with no spaces, one token per chunk; ids alongside.
    for chunk in choice_chunks[:-1]:
        (token,) = chunk["choices"][0]["token_ids"]
        assert chunk["choices"][0]["text"] == f"<|bicodec_semantic_{token - SEMANTIC_BASE}|>"
    n = expected_semantic_count(prompt)
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {
        "prompt_tokens": len(first["prompt_token_ids"]),
        "total_tokens": len(first["prompt_token_ids"]) + n + 1,
        "completion_tokens": n + 1,
    }
    assert usage_chunk["system_fingerprint"]


async def test_openai_client_reads_pinned_prompt(client: AsyncOpenAI) -> None:
    prompt = speaker_prompt()
    chunks = await stream_completion(client, prompt)
    semantic = [i - SEMANTIC_BASE for i in ids_of(chunks) if i != END_SEMANTIC]
    assert semantic == expected_semantic_tokens(prompt)
    assert len(semantic) == expected_semantic_count(prompt) == 10 * len(TEXT.split())
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(semantic) + 1
    assert chunks[-2].choices[0].finish_reason == "stop"


async def test_unpinned_prompt_gets_32_globals_first(client: AsyncOpenAI) -> None:
    prompt = speaker_prompt(globals_=None)
    chunks = await stream_completion(client, prompt)
    ids = ids_of(chunks)
    globals_ = expected_global_tokens(prompt)
    assert len(globals_) == 32
    assert ids[:32] == [GLOBAL_BASE + g for g in globals_]
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert "<|end_global_token|><|start_semantic_token|><|bicodec_semantic_" in text
    assert ids == expected_output_ids(prompt)[:-1]  # up to the stop, not the EOS


async def test_without_return_token_ids_the_ids_are_null(client: AsyncOpenAI) -> None:
    prompt = speaker_prompt()
    chunks = await stream_completion(client, prompt, return_token_ids=False)
    choices = [c.choices[0] for c in chunks if c.choices]
    assert all(c.token_ids is None and c.prompt_token_ids is None for c in choices)
    text = "".join(c.text for c in choices)
    values = [int(v) for v in re.findall(r"<\|bicodec_semantic_(\d+)\|>", text)]
    assert values == expected_semantic_tokens(prompt)


async def test_token_count_rules(server: StandinServer, client: AsyncOpenAI) -> None:
    short = speaker_prompt("Yes")
    assert expected_semantic_count(short) == 10
    assert expected_semantic_count(speaker_prompt("")) == 5  # the minimum
    controllable = (
        "<|task_controllable_tts|><|start_content|>one two three<|end_content|>"
        "<|start_style_label|><|gender_0|><|pitch_label_2|><|speed_label_2|><|end_style_label|>"
    )
    assert expected_semantic_count(controllable) == 30
    assert len(expected_global_tokens(controllable)) == 32
    fixed = StandinConfig(tokens_per_segment=7)
    assert expected_semantic_count(short, fixed) == 7
    server.control(tokens_per_segment=7)
    chunks = await stream_completion(client, short)
    assert len(ids_of(chunks)) == 7 + 1


async def test_max_tokens_ends_with_length(client: AsyncOpenAI) -> None:
    chunks = await stream_completion(client, speaker_prompt(), max_tokens=12)
    ids = ids_of(chunks)
    assert len(ids) == 12 and END_SEMANTIC not in ids
    last = chunks[-2].choices[0]
    assert last.finish_reason == "length" and last.stop_reason is None
    assert last.text.startswith("<|bicodec_semantic_")  # the last token's text is kept
    assert chunks[-1].usage.completion_tokens == 12


async def test_eos_stop_without_stop_token_ids(client: AsyncOpenAI) -> None:
    chunks = await stream_completion(client, speaker_prompt(), stop_token_ids=[])
    ids = ids_of(chunks)
    assert ids[-2:] == [END_SEMANTIC, IM_END]
    last = chunks[-2].choices[0]
    assert last.finish_reason == "stop" and last.stop_reason is None and last.text == ""
    assert chunks[-3].choices[0].text == "<|end_semantic_token|>"


async def test_tokens_per_chunk(server: StandinServer, client: AsyncOpenAI) -> None:
    server.control(tokens_per_chunk=4)
    prompt = speaker_prompt()
    chunks = await stream_completion(client, prompt)
    sizes = [len(c.choices[0].token_ids) for c in chunks if c.choices]
    assert sizes[0] == 4 and max(sizes) == 4
    assert ids_of(chunks)[:-1] == [SEMANTIC_BASE + s for s in expected_semantic_tokens(prompt)]


async def test_request_bodies_are_recorded(server: StandinServer, client: AsyncOpenAI) -> None:
    await stream_completion(client, speaker_prompt(), request_id="abc", seed=3)
    # The client has the whole stream before the server's handler has counted it.
    stats = server.wait_for(lambda s: s["completed"] == 1)
    sent = stats["last_request"]
    assert sent["top_k"] == 50 and sent["temperature"] == 0.8 and sent["top_p"] == 0.95
    assert sent["stop_token_ids"] == STOPS and sent["return_token_ids"] is True
    assert sent["seed"] == 3 and sent["max_tokens"] == 2048
    assert stats["received"] == stats["started"] == stats["completed"] == 1
    assert stats["running"] == 0 and stats["finished_reasons"] == {"stop": 1}


async def test_request_id_names_the_completion(client: AsyncOpenAI) -> None:
    chunks = await stream_completion(client, speaker_prompt(), request_id="seg-1")
    assert {c.id for c in chunks} == {"cmpl-seg-1"}


def test_non_streaming_answer(server: StandinServer) -> None:
    prompt = speaker_prompt()
    response = httpx.post(
        f"{server.base_url}/completions", json=body(prompt, stream=False), timeout=10
    )
    answer = response.json()
    (choice,) = answer["choices"]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == END_SEMANTIC
    assert choice["token_ids"][:-1] == [SEMANTIC_BASE + s for s in expected_semantic_tokens(prompt)]
    assert answer["usage"]["completion_tokens"] == len(choice["token_ids"])


# ---- pacing ---------------------------------------------------------------------------


async def test_pacing_is_respected(server: StandinServer, client: AsyncOpenAI) -> None:
    server.control(tokens_per_s=200.0, prefill_s=0.02, tokens_per_segment=49)
    started = time.monotonic()
    chunks = await stream_completion(client, speaker_prompt())
    elapsed = time.monotonic() - started
    assert len(ids_of(chunks)) == 50
    assert 0.2 <= elapsed < 3.0


async def test_max_num_seqs_queues_requests(server: StandinServer, client: AsyncOpenAI) -> None:
    server.control(tokens_per_s=200.0, prefill_s=0.0, tokens_per_segment=19, max_num_seqs=1)
    started = time.monotonic()
    await asyncio.gather(*(stream_completion(client, speaker_prompt()) for _ in range(2)))
    assert time.monotonic() - started >= 2 * 19 / 200


# ---- shared ceiling (total_tokens_per_s) ----------------------------------------------


async def token_rate(server: StandinServer, prompt: str) -> float:
    """Tokens/s one streamed completion got, measured at the client over HTTP: the
    tokens after the first chunk over the time from the first chunk to the last."""
    arrivals: list[tuple[float, int]] = []
    async with (
        httpx.AsyncClient(timeout=30) as http,
        http.stream("POST", f"{server.base_url}/completions", json=body(prompt)) as response,
    ):
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                choices = json.loads(line[len("data: ") :])["choices"]
                if count := sum(len(c["token_ids"] or []) for c in choices):
                    arrivals.append((time.monotonic(), count))
    assert len(arrivals) > 10
    return sum(count for _, count in arrivals[1:]) / (arrivals[-1][0] - arrivals[0][0])


async def concurrent_rates(server: StandinServer, streams: int) -> list[float]:
    prompts = [speaker_prompt(f"stream {i}") for i in range(streams)]
    return list(await asyncio.gather(*(token_rate(server, p) for p in prompts)))


async def test_total_ceiling_is_shared_by_the_streams(server: StandinServer) -> None:
    server.control(tokens_per_s=300.0, total_tokens_per_s=400, prefill_s=0.0, tokens_per_segment=79)
    (alone,) = await concurrent_rates(server, 1)
    assert alone == pytest.approx(300, rel=0.25)  # under the ceiling: its own pace
    for rate in await concurrent_rates(server, 4):
        assert rate == pytest.approx(100, rel=0.25)  # 400 / 4


async def test_without_ceiling_streams_keep_their_pace(server: StandinServer) -> None:
    server.control(tokens_per_s=300.0, prefill_s=0.0, tokens_per_segment=79)
    assert server.config.total_tokens_per_s is None
    for rate in await concurrent_rates(server, 4):
        assert rate == pytest.approx(300, rel=0.25)


async def test_total_ceiling_holds_whole_answers_back(server: StandinServer) -> None:
    server.control(total_tokens_per_s=400, prefill_s=0.0, tokens_per_segment=79)
    url = f"{server.base_url}/completions"
    started = time.monotonic()
    answers = await asyncio.gather(
        *(apost(url, body(speaker_prompt(f"whole {i}"), stream=False)) for i in range(2))
    )
    elapsed = time.monotonic() - started
    assert all(a.json()["usage"]["completion_tokens"] == 80 for a in answers)
    assert 0.9 * 160 / 400 <= elapsed < 2.0  # 160 tokens through 400/s, not 4000/s each


def test_total_ceiling_setting(server: StandinServer) -> None:
    assert server.control(total_tokens_per_s=500)["total_tokens_per_s"] == 500.0
    assert server.control(total_tokens_per_s=None)["total_tokens_per_s"] is None
    for bad in (0, -1, "fast", True):
        response = httpx.post(f"{server.root_url}/control", json={"total_tokens_per_s": bad})
        assert response.status_code == 400, bad


# ---- faults ---------------------------------------------------------------------------


async def test_fail_before_stream(server: StandinServer, client: AsyncOpenAI) -> None:
    server.control(fail_before_stream=503)
    with pytest.raises(openai.APIStatusError) as caught:
        await stream_completion(client, speaker_prompt())
    assert caught.value.status_code == 503
    response = await apost(f"{server.base_url}/completions", body(speaker_prompt()))
    assert response.status_code == 503
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == 503
    server.control(fail_before_stream=True)
    response = await apost(f"{server.base_url}/completions", body(speaker_prompt()))
    assert response.status_code == 500
    stats = server.stats()
    assert stats["rejected"] == 3 and stats["started"] == 0


async def test_fault_requests_and_match(server: StandinServer, client: AsyncOpenAI) -> None:
    server.control(fail_before_stream=500, fault_requests=1)
    with pytest.raises(openai.InternalServerError):
        await stream_completion(client, speaker_prompt())
    assert ids_of(await stream_completion(client, speaker_prompt()))  # fault used up
    server.control(fault_requests=None, fault_match="second sentence")
    assert ids_of(await stream_completion(client, speaker_prompt("first sentence")))
    with pytest.raises(openai.InternalServerError):
        await stream_completion(client, speaker_prompt("second sentence"))


async def test_per_request_override(client: AsyncOpenAI) -> None:
    chunks = await stream_completion(client, speaker_prompt(), standin={"tokens_per_segment": 3})
    assert len(ids_of(chunks)) == 4


async def test_in_band_error(server: StandinServer, client: AsyncOpenAI) -> None:
    server.control(error_after_tokens=5)
    received: list[Any] = []
    with pytest.raises(openai.APIError) as caught:
        stream = await client.completions.create(
            model="spark-tts",
            prompt=speaker_prompt(),
            stream=True,
            max_tokens=100,
            extra_body={"return_token_ids": True, "stop_token_ids": STOPS},
        )
        async for chunk in stream:
            received.append(chunk)
    assert "error_after_tokens" in caught.value.message
    assert len(ids_of(received)) == 5
    raw = (await apost(f"{server.base_url}/completions", body(speaker_prompt()))).text
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    assert set(json.loads(events[-2])) == {"error"}
    assert json.loads(events[-2])["error"]["code"] == 500
    stats = server.stats()
    assert stats["errored"] == 2 and stats["completed"] == 0 and stats["running"] == 0


async def test_dropped_connection_raises(server: StandinServer, client: AsyncOpenAI) -> None:
    server.control(drop_after_tokens=4)
    received: list[Any] = []
    with pytest.raises(openai.APIConnectionError):
        stream = await client.completions.create(
            model="spark-tts",
            prompt=speaker_prompt(),
            stream=True,
            max_tokens=100,
            extra_body={"return_token_ids": True},
        )
        async for chunk in stream:
            received.append(chunk)
    assert len(ids_of(received)) == 4
    async with httpx.AsyncClient(timeout=10) as http:
        request = http.build_request(
            "POST", f"{server.base_url}/completions", json=body(speaker_prompt())
        )
        response = await http.send(request, stream=True)
        with pytest.raises(httpx.RemoteProtocolError):
            await response.aread()
    stats = await server.await_for(lambda s: s["running"] == 0)
    assert stats["dropped"] == 2 and stats["completed"] == 0


async def test_client_closing_early_is_an_abort(server: StandinServer, client: AsyncOpenAI) -> None:
    server.control(tokens_per_s=100.0)
    stream = await client.completions.create(
        model="spark-tts", prompt=speaker_prompt(), stream=True, max_tokens=500
    )
    count = 0
    async for _chunk in stream:
        count += 1
        if count == 3:
            break
    await stream.close()
    stats = await server.await_for(lambda s: s["aborted"] == 1 and s["running"] == 0)
    assert stats["completed"] == 0 and stats["finished_reasons"] == {"abort": 1}
    assert stats["generated_tokens"] < 10


async def test_abort_during_stall_is_seen_at_once(
    server: StandinServer, client: AsyncOpenAI
) -> None:
    server.control(stall_s=30.0, stall_after_tokens=2)
    stream = await client.completions.create(
        model="spark-tts", prompt=speaker_prompt(), stream=True, max_tokens=500
    )
    chunks: list[Any] = []

    async def read() -> None:
        async for chunk in stream:
            chunks.append(chunk)

    with pytest.raises(TimeoutError):
        await asyncio.wait_for(read(), timeout=0.5)  # the stall
    assert len(chunks) == 2
    await stream.close()
    started = time.monotonic()
    await server.await_for(lambda s: s["aborted"] == 1 and s["running"] == 0, timeout=3)
    assert time.monotonic() - started < 2


async def test_stall_then_continue(server: StandinServer, client: AsyncOpenAI) -> None:
    server.control(stall_s=0.3, stall_after_tokens=1, tokens_per_segment=5)
    started = time.monotonic()
    chunks = await stream_completion(client, speaker_prompt())
    assert time.monotonic() - started >= 0.3
    assert len(ids_of(chunks)) == 6


async def test_no_semantic_tokens(server: StandinServer, client: AsyncOpenAI) -> None:
    server.control(no_semantic_tokens=True)
    chunks = await stream_completion(client, speaker_prompt(globals_=None))
    assert ids_of(chunks) == [END_SEMANTIC]
    assert chunks[0].choices[0].finish_reason == "stop" and chunks[0].choices[0].text == ""


async def test_global_count(server: StandinServer, client: AsyncOpenAI) -> None:
    server.control(global_count=16)
    chunks = await stream_completion(client, speaker_prompt(globals_=None))
    ids = ids_of(chunks)
    assert sum(GLOBAL_BASE <= i < GLOBAL_BASE + 4096 for i in ids) == 16
    pinned = await stream_completion(client, speaker_prompt())  # pinned: no globals at all
    assert not any(GLOBAL_BASE <= i < GLOBAL_BASE + 4096 for i in ids_of(pinned))


def test_text_only_split_and_spaced(server: StandinServer) -> None:
    server.control(text_only=True, split_text_tokens=True, text_spaces=True)
    prompt = speaker_prompt(globals_=None)
    response = httpx.post(f"{server.base_url}/completions", json=body(prompt), timeout=10)
    chunks = [json.loads(e) for e in sse_events(response.text)[:-1]]
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    assert all("token_ids" not in c and "prompt_token_ids" not in c for c in choices)
    texts = [c["text"] for c in choices]
    token = re.compile(r"^(\s*<\|[a-z_0-9]+\|>)*\s*$")
    assert any(not token.match(t) for t in texts)  # some token strings are cut in two
    whole = "".join(texts)
    assert "|> <|" in whole
    values = [int(v) for v in re.findall(r"<\|bicodec_semantic_(\d+)\|>", whole)]
    assert values == expected_semantic_tokens(prompt)
    assert choices[-1]["finish_reason"] == "stop"


# ---- the other endpoints ----------------------------------------------------------------


def test_health_models_tokenize(server: StandinServer) -> None:
    root = server.root_url
    assert httpx.get(f"{root}/health").status_code == 200
    models = httpx.get(f"{server.base_url}/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["spark-tts"]
    names = [
        "<|bicodec_global_0|>",
        "<|bicodec_semantic_0|>",
        "<|bicodec_semantic_8191|>",
        "<|end_semantic_token|>",
        "<|im_end|>",
        "<|start_global_token|>",
        "<|task_tts|>",
    ]
    answer = httpx.post(
        f"{root}/tokenize",
        json={"model": "spark-tts", "prompt": "".join(names), "add_special_tokens": False},
    ).json()
    assert set(answer) == {"count", "max_model_len", "tokens", "token_strs"}
    assert answer["tokens"] == [151665, 155761, 163952, 165157, 151645, 165150, 165137]
    assert answer["count"] == 7 and answer["max_model_len"] == 4096
    strs = httpx.post(
        f"{root}/tokenize", json={"prompt": "hi <|task_tts|>", "return_token_strs": True}
    ).json()["token_strs"]
    assert strs == ["hi", " ", "<|task_tts|>"]
    back = httpx.post(f"{root}/detokenize", json={"tokens": [165137, 155761]}).json()
    assert back == {"prompt": "<|task_tts|><|bicodec_semantic_0|>"}
    assert "vllm:num_requests_running" in httpx.get(f"{root}/metrics").text


def test_wrong_model_and_api_key(server: StandinServer) -> None:
    wrong = httpx.post(f"{server.base_url}/completions", json=body("x", model="other"))
    assert wrong.status_code == 404 and wrong.json()["error"]["type"] == "NotFoundError"
    server.control(api_key="secret")
    assert httpx.get(f"{server.base_url}/models").status_code == 401
    assert httpx.get(f"{server.root_url}/health").status_code == 200  # not under /v1
    authed = httpx.get(f"{server.base_url}/models", headers={"Authorization": "Bearer secret"})
    assert authed.status_code == 200


def test_control_rejects_unknown_settings(server: StandinServer) -> None:
    response = httpx.post(f"{server.root_url}/control", json={"no_such_fault": 1})
    assert response.status_code == 400
    response = httpx.post(f"{server.root_url}/control", json={"stall_s": "long"})
    assert response.status_code == 400
    assert server.control(stall_s=1)["stall_s"] == 1.0


def test_command_line() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "devtools.standin_llm"),
            *("--port", str(port), "--tokens-per-s", "1000"),
            *("--total-tokens-per-s", "5000"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None, process.stdout and process.stdout.read()
            assert time.monotonic() < deadline, "the stand-in did not start"
            time.sleep(0.05)
        response = httpx.post(
            f"http://127.0.0.1:{port}/v1/completions", json=body(speaker_prompt()), timeout=10
        )
        assert sse_events(response.text)[-1] == "[DONE]"
        settings = httpx.get(f"http://127.0.0.1:{port}/control").json()
        assert settings["total_tokens_per_s"] == 5000.0
    finally:
        process.terminate()
        process.communicate(timeout=10)  # reaps it and closes the pipe
