"""Barge-in: a cancel stops speech at once and says what was sent, on both WebSockets;
closing an HTTP response is the HTTP cancel.

Real gateway processes on loopback against the stand-in LLM, with real WebSocket and
HTTP clients. Every cancel is checked for what the issue promises: its answer within
0.5 s, no audio after the answer, the upstream (vLLM) request aborted, no stream slot
held, and the connection kept for what comes next. The stand-in writes 10 speech
tokens per word and 320 samples per token, so audio lengths are known in advance.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest
import requests
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect

from decoder_gateway.llm.prompt import speaker_prompt
from decoder_gateway.serving.spoken import SentSentences, Spoken, words_within
from decoder_gateway.voices.catalog import VoiceCatalog
from devtools.metrics import sample
from devtools.standin_llm import expected_semantic_count

TEXT_IN = "/v1/audio/speech/stream"
SEED = "/v1/audio/speech/stream/ws"
ANSWER_S = 0.5  # the bound on a cancel's answer
VOICES = VoiceCatalog.load()
# Sentence 1 is short; sentence 2 is long enough to be cut off while it is generated.
FIRST = "Habari yako?"
SECOND = "Nzuri sana rafiki yangu mpendwa wa zamani kutoka kijiji cha mbali sana."
REPLY = f"{FIRST} {SECOND} Tutaonana kesho asubuhi."


def sentence_samples(text: str, voice: str = "swahili_male") -> int:
    return 320 * expected_semantic_count(speaker_prompt(VOICES.resolve(voice), text))


def metrics(gateway) -> str:
    return requests.get(f"{gateway.url}/metrics", timeout=10).text


def wait_until(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.02)


def no_stream_is_held(gateway) -> None:
    """Every admitted stream has been released and nothing waits for a slot."""
    wait_until(
        lambda: (
            sample(metrics(gateway), "tts_active_streams") == 0
            and sample(metrics(gateway), "tts_admission_queue") == 0
        )
    )


def upstream_all_ended(llm) -> dict:
    return llm.wait_for(lambda s: s["running"] == 0, 10)


def frames_until(ws: ClientConnection, kind: str, timeout_s: float = 30.0) -> list:
    """Every frame (JSON parsed, binary as bytes) up to and with the first of ``kind``."""
    got: list = []
    while True:
        message = ws.recv(timeout=timeout_s)
        if isinstance(message, bytes):
            got.append(message)
            continue
        got.append(json.loads(message))
        if got[-1]["type"] == kind:
            return got


def nothing_more(ws: ClientConnection, quiet_s: float = 0.6) -> None:
    """No frame at all arrives for ``quiet_s``."""
    with pytest.raises(TimeoutError):
        ws.recv(timeout=quiet_s)


def audio_bytes(frames: list) -> int:
    return sum(len(f) for f in frames if isinstance(f, bytes))


def cancel_text_in(ws: ClientConnection) -> tuple[float, list]:
    """input.cancel; (seconds to its answer, frames up to and with audio.cancelled)."""
    sent = time.monotonic()
    ws.send(json.dumps({"type": "input.cancel"}))
    frames = frames_until(ws, "audio.cancelled")
    return time.monotonic() - sent, frames


def text_in_session(ws: ClientConnection, **config: object) -> None:
    config = {"voice": "swahili_male", "response_format": "pcm", "stream_audio": True, **config}
    ws.send(json.dumps({"type": "session.config", **config}))


def say(ws: ClientConnection, text: str, done: bool = True) -> None:
    ws.send(json.dumps({"type": "input.text", "text": text}))
    if done:
        ws.send(json.dumps({"type": "input.done"}))


# -- the text-in WebSocket: input.cancel ----------------------------------------------


def test_input_cancel_stops_at_once_and_says_what_was_sent(gateway, llm):
    """Cut off in sentence 2, while it is still being generated: the answer within
    0.5 s, its audio_seconds exactly the audio received, the spoken text sentence 1
    (sentence 2's length is unknown yet), upstream aborted, and the session goes on."""
    llm.control(tokens_per_s=100)  # twice real time: sentence 2 takes about a second
    before = metrics(gateway)
    with ws_connect(f"{gateway.ws_url}{TEXT_IN}") as ws:
        text_in_session(ws)
        say(ws, REPLY)
        frames = frames_until(ws, "audio.done")  # sentence 1, whole
        while not isinstance(frames[-1], bytes):  # sentence 2 has begun to play
            frames.append(ws.recv(timeout=30))
        took, answer = cancel_text_in(ws)
        frames += answer
        cancelled = frames[-1]
        nothing_more(ws)
        assert took < ANSWER_S, took
        received = audio_bytes(frames)
        assert received > 2 * sentence_samples(FIRST)
        assert cancelled == {
            "type": "audio.cancelled",
            "utterance_index": 0,
            "cancelled_utterances": 1,
            "audio_seconds": received / 2 / 16000,
            "spoken_text": FIRST,
            "spoken_until": "sentence",
        }
        stats = upstream_all_ended(llm)
        assert stats["aborted"] >= 1
        no_stream_is_held(gateway)
        # The session goes on: the next text is the next utterance, spoken whole.
        say(ws, "Tutaonana kesho.")
        after = frames_until(ws, "session.done")
    assert after[-1] == {"type": "session.done", "utterance_index": 1, "total_sentences": 1}
    assert audio_bytes(after) == 2 * sentence_samples("Tutaonana kesho.")
    counted = metrics(gateway)
    labels = {"endpoint": "text_stream", "outcome": "cancelled"}
    assert sample(counted, "tts_requests_total", **labels) == (
        sample(before, "tts_requests_total", **labels) + 1
    )


def test_input_cancel_with_nothing_playing_is_a_clear_no_op(gateway, llm):
    with ws_connect(f"{gateway.ws_url}{TEXT_IN}") as ws:
        text_in_session(ws)
        took, frames = cancel_text_in(ws)
        assert took < ANSWER_S
        assert frames == [
            {
                "type": "audio.cancelled",
                "utterance_index": None,
                "cancelled_utterances": 0,
                "audio_seconds": 0.0,
                "spoken_text": "",
                "spoken_until": "sentence",
            }
        ]
        say(ws, FIRST)
        spoken = frames_until(ws, "session.done")
        took, frames = cancel_text_in(ws)  # after the utterance has ended: nothing
        assert frames[-1]["utterance_index"] is None and took < ANSWER_S
    assert spoken[-1]["utterance_index"] == 0
    assert audio_bytes(spoken) == 2 * sentence_samples(FIRST)
    assert llm.stats()["aborted"] == 0


def test_a_cancel_storm_gets_one_answer_each_and_loses_nothing(gateway, llm):
    llm.control(tokens_per_s=100)
    with ws_connect(f"{gateway.ws_url}{TEXT_IN}") as ws:
        text_in_session(ws)
        say(ws, REPLY)
        first = frames_until(ws, "audio.start")
        for _ in range(25):
            ws.send(json.dumps({"type": "input.cancel"}))
        answers: list = []
        while len([f for f in answers if isinstance(f, dict)]) < 25:
            message = ws.recv(timeout=10)
            answers.append(message if isinstance(message, bytes) else json.loads(message))
        nothing_more(ws)
        cancels = [f for f in answers if isinstance(f, dict)]
        assert all(f["type"] == "audio.cancelled" for f in cancels)
        assert cancels[0]["utterance_index"] == 0
        assert [f["utterance_index"] for f in cancels[1:]] == [None] * 24
        # Audio only before the first answer, and exactly what it reports.
        first_answer = next(i for i, f in enumerate(answers) if isinstance(f, dict))
        assert audio_bytes(answers[first_answer:]) == 0
        assert cancels[0]["audio_seconds"] == audio_bytes(first + answers) / 2 / 16000
        upstream_all_ended(llm)
        no_stream_is_held(gateway)
        say(ws, FIRST)
        after = frames_until(ws, "session.done")
    assert audio_bytes(after) == 2 * sentence_samples(FIRST)


def test_a_cancel_during_the_first_chunk(gateway, llm):
    """The sentence has started (audio.start) but no audio has come: nothing was sent."""
    llm.control(prefill_s=3.0)
    with ws_connect(f"{gateway.ws_url}{TEXT_IN}") as ws:
        text_in_session(ws)
        say(ws, REPLY)
        assert frames_until(ws, "audio.start")[-1]["sentence_index"] == 0
        llm.wait_for(lambda s: s["running"] >= 1, 10)
        took, frames = cancel_text_in(ws)
        assert took < ANSWER_S
        assert frames == [
            {
                "type": "audio.cancelled",
                "utterance_index": 0,
                "cancelled_utterances": 1,
                "audio_seconds": 0.0,
                "spoken_text": "",
                "spoken_until": "sentence",
            }
        ]
        nothing_more(ws)
        assert upstream_all_ended(llm)["aborted"] >= 1
        no_stream_is_held(gateway)


def test_a_cancel_stops_every_utterance_playing_waiting_or_written(gateway, llm):
    llm.control(tokens_per_s=100)
    with ws_connect(f"{gateway.ws_url}{TEXT_IN}") as ws:
        text_in_session(ws)
        say(ws, REPLY)  # utterance 0: plays
        say(ws, "Asante sana kwa kuuliza.")  # utterance 1: waits its turn
        say(ws, "Na wewe je? Mimi", done=False)  # utterance 2: still being written
        frames = frames_until(ws, "audio.start")
        took, answer = cancel_text_in(ws)
        assert took < ANSWER_S
        assert answer[-1]["utterance_index"] == 0
        assert answer[-1]["cancelled_utterances"] == 3
        nothing_more(ws)
        assert answer[-1]["audio_seconds"] == audio_bytes(frames + answer) / 2 / 16000
        upstream_all_ended(llm)
        no_stream_is_held(gateway)
        # The text of utterance 2 was dropped: what comes now is utterance 3, alone.
        say(ws, " ni mzima.")
        after = frames_until(ws, "session.done")
    assert [f["sentence_text"] for f in after if isinstance(f, dict) and "sentence_text" in f] == [
        "ni mzima."
    ]
    assert after[-1]["utterance_index"] == 3


def test_a_cancel_stops_a_wait_for_admission(make_gateway, llm):
    """One stream at a time (admitted on trust, before anything is measured): a second
    session's text waits for a slot; its cancel is answered at once and leaves nothing
    queued."""
    gateway = make_gateway(ADMISSION_COLD_STREAMS="1", ADMISSION_QUEUE_S="5")
    llm.control(tokens_per_s=50)
    with (
        ws_connect(f"{gateway.ws_url}{TEXT_IN}") as busy,
        ws_connect(f"{gateway.ws_url}{TEXT_IN}") as waiting,
    ):
        text_in_session(busy)
        say(busy, REPLY)
        frames_until(busy, "audio.start")
        text_in_session(waiting)
        say(waiting, FIRST)
        wait_until(lambda: sample(metrics(gateway), "tts_admission_queue") == 1)
        took, frames = cancel_text_in(waiting)
        assert took < ANSWER_S
        assert frames[-1]["utterance_index"] == 0 and frames[-1]["audio_seconds"] == 0.0
        assert sample(metrics(gateway), "tts_admission_queue") == 0
        cancel_text_in(busy)
        no_stream_is_held(gateway)
        say(waiting, FIRST)  # the session is still usable, and now admitted at once
        assert frames_until(waiting, "session.done")[-1]["utterance_index"] == 1


def test_g711_text_in_cancel_counts_samples_at_the_output_rate(gateway, llm):
    llm.control(tokens_per_s=100)
    with ws_connect(f"{gateway.ws_url}{TEXT_IN}") as ws:
        text_in_session(ws, response_format="mulaw")
        say(ws, REPLY)
        frames = frames_until(ws, "audio.done")
        start = next(f for f in frames if isinstance(f, dict) and f["type"] == "audio.start")
        assert (start["format"], start["sample_rate"]) == ("mulaw", 8000)
        _, answer = cancel_text_in(ws)
        nothing_more(ws)
    assert answer[-1]["audio_seconds"] == audio_bytes(frames + answer) / 8000  # 1 byte each
    assert answer[-1]["spoken_text"].startswith(FIRST)


# -- the seed WebSocket: cancel -----------------------------------------------------


def seed_cancel(ws: ClientConnection, segment_id: object) -> tuple[float, list]:
    sent = time.monotonic()
    ws.send(json.dumps({"type": "cancel", "segment_id": segment_id}))
    frames = frames_until(ws, "cancelled")
    return time.monotonic() - sent, frames


def test_seed_cancel_stops_the_message_at_once(gateway, llm):
    llm.control(tokens_per_s=100)
    before = metrics(gateway)
    with ws_connect(f"{gateway.ws_url}{SEED}") as ws:
        ws.send(json.dumps({"input": REPLY, "voice": "swahili_male", "segment_id": "a"}))
        frames = frames_until(ws, "start")
        while audio_bytes(frames) <= 2 * sentence_samples(FIRST):  # into sentence 2
            frames.append(ws.recv(timeout=30))
        took, answer = seed_cancel(ws, "a")
        frames += answer
        nothing_more(ws)
        assert took < ANSWER_S, took
        assert not any(isinstance(f, dict) and f["type"] == "end" for f in frames)
        assert frames[-1] == {
            "type": "cancelled",
            "segment_id": "a",
            "status": "cancelled",
            "audio_seconds": audio_bytes(frames) / 2 / 16000,
            "spoken_text": FIRST,
            "spoken_until": "sentence",
        }
        assert upstream_all_ended(llm)["aborted"] >= 1
        no_stream_is_held(gateway)
        ws.send(json.dumps({"input": FIRST, "voice": "swahili_male", "segment_id": "b"}))
        after = frames_until(ws, "end")
    assert after[-1]["segment_id"] == "b"
    assert after[-1]["samples"] == sentence_samples(FIRST) == audio_bytes(after) // 2
    labels = {"endpoint": "websocket", "outcome": "cancelled"}
    assert sample(metrics(gateway), "tts_requests_total", **labels) == (
        sample(before, "tts_requests_total", **labels) + 1
    )


def test_seed_cancel_before_any_audio_sends_neither_start_nor_end(gateway, llm):
    llm.control(prefill_s=3.0)
    with ws_connect(f"{gateway.ws_url}{SEED}") as ws:
        ws.send(json.dumps({"input": REPLY, "segment_id": 7}))
        llm.wait_for(lambda s: s["running"] >= 1, 10)
        took, frames = seed_cancel(ws, 7)
        nothing_more(ws)
    assert took < ANSWER_S
    assert frames == [
        {
            "type": "cancelled",
            "segment_id": 7,
            "status": "cancelled",
            "audio_seconds": 0.0,
            "spoken_text": "",
            "spoken_until": "sentence",
        }
    ]
    assert upstream_all_ended(llm)["aborted"] >= 1
    no_stream_is_held(gateway)


def test_seed_cancel_of_a_waiting_message_or_an_unknown_id(gateway, llm):
    llm.control(tokens_per_s=400)
    with ws_connect(f"{gateway.ws_url}{SEED}") as ws:
        ws.send(json.dumps({"input": REPLY, "segment_id": "a"}))
        ws.send(json.dumps({"input": FIRST, "segment_id": "b"}))
        frames = frames_until(ws, "start")
        _, dropped = seed_cancel(ws, "b")
        _, unknown = seed_cancel(ws, "nobody")
        frames += dropped + unknown + frames_until(ws, "end")
        nothing_more(ws)  # b never starts
        _, late = seed_cancel(ws, "a")  # a has ended
    answers = [f for f in frames if isinstance(f, dict) and f["type"] == "cancelled"]
    assert [(f["segment_id"], f["status"], f["audio_seconds"]) for f in answers] == [
        ("b", "dropped", 0.0),
        ("nobody", "not_found", 0.0),
    ]
    assert late[-1]["status"] == "not_found"
    assert frames[-1]["segment_id"] == "a"  # a went on to its end, all of it
    assert frames[-1]["samples"] == audio_bytes(frames) // 2
    assert llm.stats()["started"] == 3  # a's three sentences, none of b
    no_stream_is_held(gateway)


def test_seed_cancel_storm_and_bad_cancels(gateway, llm):
    llm.control(tokens_per_s=100)
    with ws_connect(f"{gateway.ws_url}{SEED}") as ws:
        ws.send(json.dumps({"type": "cancel"}))  # no segment_id: refused
        error = json.loads(ws.recv(timeout=10))
        assert error["type"] == "error" and error["code"] == "invalid_request"
        ws.send(json.dumps({"type": "cancel", "segment_id": True}))
        assert json.loads(ws.recv(timeout=10))["code"] == "invalid_request"
        ws.send(json.dumps({"input": REPLY, "segment_id": 1}))
        frames = frames_until(ws, "start")
        for _ in range(20):
            ws.send(json.dumps({"type": "cancel", "segment_id": 1}))
        while len([f for f in frames if isinstance(f, dict) and f["type"] == "cancelled"]) < 20:
            message = ws.recv(timeout=10)
            frames.append(message if isinstance(message, bytes) else json.loads(message))
        nothing_more(ws)
        answers = [f for f in frames if isinstance(f, dict) and f["type"] == "cancelled"]
        assert sorted(f["status"] for f in answers) == ["cancelled"] + ["not_found"] * 19
        stopped = next(f for f in answers if f["status"] == "cancelled")
        assert stopped["audio_seconds"] == audio_bytes(frames) / 2 / 16000
        last_audio = max(i for i, f in enumerate(frames) if isinstance(f, bytes))
        assert last_audio < frames.index(stopped)
        upstream_all_ended(llm)
        no_stream_is_held(gateway)
        ws.send(json.dumps({"input": FIRST, "segment_id": 2}))
        assert frames_until(ws, "end")[-1]["samples"] == sentence_samples(FIRST, "luganda_female")


def test_a_client_that_leaves_after_a_cancel_is_not_a_problem(gateway, llm):
    llm.control(tokens_per_s=100)
    with ws_connect(f"{gateway.ws_url}{SEED}") as ws:
        ws.send(json.dumps({"input": REPLY, "segment_id": 1}))
        frames_until(ws, "start")
        ws.send(json.dumps({"type": "cancel", "segment_id": 1}))
    upstream_all_ended(llm)
    no_stream_is_held(gateway)


# -- HTTP: closing the response is the cancel -----------------------------------------


def test_closing_an_http_response_aborts_upstream_at_once(gateway, llm):
    warm_up = requests.post(f"{gateway.url}/v1/audio/speech/stream", json={"text": FIRST})
    assert warm_up.status_code == 200  # a cold decoder's first chunk can take a while
    llm.control(tokens_per_s=50)  # real time: the long first sentence takes seconds
    with requests.post(
        f"{gateway.url}/v1/audio/speech/stream",
        json={"text": f"{SECOND} {FIRST}", "voice": "swahili_male"},
        stream=True,
        timeout=30,
    ) as response:
        assert response.status_code == 200
        # Kept: a chunk iterator that is dropped closes the connection (a cancel, early).
        chunks = response.iter_content(chunk_size=None)
        assert next(chunks)
        assert llm.stats()["running"] == 1
        closed = time.monotonic()
    # The stand-in's record of the abort, on the same clock (one host).
    stats = llm.wait_for(lambda s: s["running"] == 0, 10)
    aborts = [e["at"] for e in stats["endings"] if e["end"] == "aborted"]
    assert len(aborts) == 1 and aborts[0] - closed < ANSWER_S, (aborts, closed)
    no_stream_is_held(gateway)


# -- the spoken text, to the word where it can be told ----------------------------------


def test_the_spoken_text_ends_at_the_last_word_within_the_audio_sent():
    assert words_within("Habari yako rafiki yangu", 0.5) == "Habari yako"
    assert words_within("Habari yako rafiki yangu", 0.2) == ""
    assert words_within("Habari yako", 1.0) == "Habari yako"
    sent = SentSentences()
    sent.start(0, "Habari yako?")
    sent.sent(3200)
    sent.end()
    sent.start(1, "Nzuri sana rafiki yangu.")
    sent.sent(16000)
    lengths = {0: 6400, 1: 32000}
    assert sent.spoken(lengths.get) == Spoken("Habari yako? Nzuri sana", "word")
    assert sent.spoken({}.get).text == "Habari yako?"  # sentence 2's length unknown
    sent.sent(16000)
    assert sent.spoken(lengths.get).until == "sentence"
