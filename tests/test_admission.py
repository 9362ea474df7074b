"""Admission by measured capacity: the model, the playback clock and the slots, on a
clock the tests move by hand (serving/capacity.py, serving/admission.py)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time

import httpx
import pytest
import requests

from decoder_gateway.client import GatewayClient, ServerError
from decoder_gateway.errors import Overloaded, ShuttingDown
from decoder_gateway.serving.admission import AdmissionPolicy, StreamSlots
from decoder_gateway.serving.capacity import CapacityModel, PlaybackClock, RateMeter
from devtools.metrics import sample

TOKENS_PER_AUDIO_S = 50


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def feed(model: CapacityModel, clock: Clock, segments: int, rate: float, seconds: float) -> None:
    """``segments`` generating together, each receiving ``rate`` tokens/s, for ``seconds``."""
    for _ in range(segments):
        model.segment_started()
    for _ in range(round(seconds * 10)):
        clock.now += 0.1
        for _ in range(segments):
            model.llm_tokens(round(rate * 0.1))
    for _ in range(segments):
        model.segment_ended()


def test_a_rate_meter_counts_a_cold_start_over_the_time_so_far():
    meter = RateMeter(window_s=5.0)
    meter.add(100, at=0.0)
    meter.add(100, at=1.0)
    assert meter.rate(1.0) == pytest.approx(200)  # not 200 / 5: nothing came before
    assert meter.rate(10.0) == 0  # the window has passed


def test_nothing_is_known_before_anything_is_measured():
    model = CapacityModel(TOKENS_PER_AUDIO_S, headroom=0.25, clock=Clock())
    estimate = model.estimate()
    assert estimate.streams is None and estimate.llm_tokens_per_s is None


def test_an_llm_with_room_is_at_least_what_it_delivers():
    clock = Clock()
    model = CapacityModel(TOKENS_PER_AUDIO_S, headroom=0.25, clock=clock)
    feed(model, clock, segments=2, rate=180, seconds=3)
    estimate = model.estimate()
    assert not estimate.llm_saturated and estimate.lower_bound  # admission may probe
    assert estimate.llm_tokens_per_s == pytest.approx(360, rel=0.05)
    assert estimate.streams == pytest.approx(360 / (50 * 1.25), rel=0.05)


def test_a_segment_fed_slower_than_a_stream_needs_is_no_lower_bound():
    clock = Clock()
    model = CapacityModel(TOKENS_PER_AUDIO_S, headroom=0.25, clock=clock)
    feed(model, clock, segments=1, rate=40, seconds=3)  # alone, and still under 62.5
    estimate = model.estimate()
    assert not estimate.llm_saturated and not estimate.lower_bound


def test_an_llm_shared_out_is_at_its_capacity_and_the_estimate_comes_down_to_it():
    clock = Clock()
    model = CapacityModel(TOKENS_PER_AUDIO_S, headroom=0.25, clock=clock)
    feed(model, clock, segments=4, rate=180, seconds=3)  # 720 tokens/s: room left
    assert model.estimate().llm_tokens_per_s == pytest.approx(720, rel=0.05)
    feed(model, clock, segments=12, rate=40, seconds=6)  # 480 in all: each far below its peak
    estimate = model.estimate()
    assert estimate.llm_saturated and not estimate.lower_bound
    assert estimate.llm_tokens_per_s == pytest.approx(480, rel=0.05)
    assert estimate.streams == pytest.approx(480 / 62.5, rel=0.05)


def test_the_slower_of_llm_and_decoder_sets_the_streams():
    clock = Clock()
    model = CapacityModel(TOKENS_PER_AUDIO_S, headroom=0.0, clock=clock)
    feed(model, clock, segments=2, rate=200, seconds=2)
    for _ in range(10):  # busy a third of the time, 200 tokens per busy second: at least
        clock.now += 0.3
        model.decoded(tokens=20, busy_s=0.1)
    estimate = model.estimate()
    assert estimate.decoder_tokens_per_s == pytest.approx(200, rel=0.05)
    assert estimate.decoder_busy == pytest.approx(1 / 3, abs=0.05)
    assert estimate.streams == pytest.approx(4.0, rel=0.05) and estimate.lower_bound
    for _ in range(50):  # busy all the time, a window long: 100 tokens/s is all it does
        clock.now += 0.1
        model.decoded(tokens=10, busy_s=0.1)
    estimate = model.estimate()
    assert estimate.decoder_tokens_per_s == pytest.approx(100, rel=0.05)
    assert estimate.streams == pytest.approx(2.0, rel=0.05)
    assert not estimate.lower_bound  # the decoder bounds it, and is busy: no probing
    for _ in range(60):  # busy 90% of the time: 100 per second, 111 per busy second
        clock.now += 0.1
        model.decoded(tokens=10, busy_s=0.09)
    assert model.estimate().decoder_tokens_per_s == pytest.approx(111, rel=0.05)


def test_an_estimate_fades_when_nothing_confirms_it():
    clock = Clock()
    model = CapacityModel(TOKENS_PER_AUDIO_S, headroom=0.0, clock=clock)
    feed(model, clock, segments=4, rate=200, seconds=2)
    before = model.estimate().llm_tokens_per_s
    clock.now += 60  # one half-life later, nothing measured meanwhile
    model.llm_tokens(0)
    assert model.estimate().llm_tokens_per_s == pytest.approx(before / 2, rel=0.05)


def test_the_playback_clock_counts_what_a_listener_waits_for():
    clock = Clock()
    playback = PlaybackClock(clock)
    assert playback.buffer_ahead() is None
    playback.sent(0.2)  # first audio: the listener starts playing
    clock.now += 0.1
    playback.sent(0.2)
    assert playback.buffer_ahead() == pytest.approx(0.3)
    clock.now += 0.8  # 0.3 s ahead, 0.8 s later: it waited 0.5 s
    playback.sent(0.5)
    assert playback.underruns == 1 and playback.underrun_s == pytest.approx(0.5)
    assert playback.buffer_ahead() == pytest.approx(0.5)  # its clock waited with it
    clock.now += 0.51  # within the tolerance: jitter, not a stall
    playback.sent(0.1)
    assert playback.underruns == 1


def slots_of(clock: Clock, **policy) -> tuple[StreamSlots, CapacityModel]:
    model = CapacityModel(TOKENS_PER_AUDIO_S, headroom=0.25, clock=clock)
    options = {"limit": 8, "queue_s": 0.3, "cold_streams": 2, "margin_s": 0.3, **policy}
    return StreamSlots(AdmissionPolicy(**options), model), model


async def test_a_cold_start_admits_its_allowance_then_queues_then_refuses_with_a_retry():
    slots, _ = slots_of(Clock())
    await slots.acquire(PlaybackClock())
    await slots.acquire(PlaybackClock())
    with pytest.raises(Overloaded) as refused:
        await slots.acquire(PlaybackClock())  # waits queue_s for capacity that never comes
    assert refused.value.retry_after == 1
    assert slots.active == 2 and slots.queued == 0


async def test_a_queued_request_is_admitted_when_a_stream_ends():
    slots, _ = slots_of(Clock())
    first, second = PlaybackClock(), PlaybackClock()
    await slots.acquire(first)
    await slots.acquire(second)
    waiting = asyncio.create_task(slots.acquire(PlaybackClock()))
    await asyncio.sleep(0.1)
    assert slots.queued == 1
    slots.release(first)
    waited = await waiting
    assert 0 < waited < 0.3 and slots.active == 2 and slots.queued == 0


async def test_the_queue_is_first_come_first_served():
    slots, _ = slots_of(Clock(), cold_streams=1, queue_s=2.0)
    running = PlaybackClock()
    await slots.acquire(running)
    order: list[str] = []

    async def request(name: str) -> None:
        stream = PlaybackClock()
        await slots.acquire(stream)
        order.append(name)
        await asyncio.sleep(0.1)
        slots.release(stream)

    tasks = [asyncio.create_task(request(name)) for name in ("a", "b", "c")]
    await asyncio.sleep(0.1)
    slots.release(running)
    await asyncio.gather(*tasks)
    assert order == ["a", "b", "c"]


async def test_the_hard_limit_refuses_at_once_and_draining_says_shutting_down():
    slots, _ = slots_of(Clock(), limit=1, by_capacity=False, queue_s=5.0)
    await slots.acquire(PlaybackClock())
    with pytest.raises(Overloaded, match="limit of 1"):
        await asyncio.wait_for(slots.acquire(PlaybackClock()), 0.5)  # no wait
    slots.draining = True
    with pytest.raises(ShuttingDown):
        await slots.acquire(PlaybackClock())


async def test_admission_follows_the_measured_capacity():
    clock = Clock()
    slots, model = slots_of(clock, cold_streams=1, queue_s=0.0)
    feed(model, clock, segments=1, rate=150, seconds=1)  # alone: 150 tokens/s
    feed(model, clock, segments=3, rate=50, seconds=5)  # shared out: 2.4 streams at 1.25x
    assert model.estimate().streams == pytest.approx(2.4, rel=0.05)
    assert model.estimate().llm_saturated
    await slots.acquire(PlaybackClock())
    await slots.acquire(PlaybackClock())  # past the cold allowance: measured now
    with pytest.raises(Overloaded, match="about 2 in real time"):
        await slots.acquire(PlaybackClock())


async def test_past_a_lower_bound_admission_probes_one_stream_at_a_time():
    """An LLM that has shared nothing out may give more: one stream past the estimate
    is let in per probe interval, the next waits for it."""
    clock = Clock()
    slots, model = slots_of(clock, cold_streams=1, queue_s=0.0)
    feed(model, clock, segments=1, rate=180, seconds=2)  # alone at 180: 2.9 streams, or more
    assert model.estimate().lower_bound
    streams = [PlaybackClock(clock) for _ in range(5)]
    for stream in streams[:2]:
        await slots.acquire(stream)
    with pytest.raises(Overloaded):
        await slots.acquire(streams[2])  # no probe while a stream waits for its first audio
    for stream in streams[:2]:
        stream.sent(3.0)  # both play, with audio to spare...
    with pytest.raises(Overloaded):
        await slots.acquire(streams[2])  # ... but for less than a second: no proof yet
    clock.now += 1.0
    await slots.acquire(streams[2])  # the third: a probe
    streams[2].sent(3.0)
    clock.now += 1.0
    with pytest.raises(Overloaded):
        await slots.acquire(streams[3])  # the fourth: the probe just made must show first
    slots.policy = AdmissionPolicy(limit=8, queue_s=2.0, cold_streams=1, margin_s=0.3)
    waited = await slots.acquire(streams[3])  # the next probe, an interval later
    assert 0.2 < waited <= StreamSlots.PROBE_INTERVAL_S + 0.2
    assert slots.active == 4


async def test_a_stream_running_short_of_audio_stops_admission():
    clock = Clock()
    slots, model = slots_of(clock, cold_streams=1, queue_s=0.0)
    feed(model, clock, segments=2, rate=400, seconds=2)  # plenty: 12.8 streams
    short = PlaybackClock(clock)
    await slots.acquire(short)
    short.sent(1.0)
    clock.now += 0.95  # playing for 0.95 s, 0.05 s left: under the 0.3 s margin...
    await slots.acquire(PlaybackClock())  # ... but a stream in its first second is spared
    clock.now += 0.1
    with pytest.raises(Overloaded):
        await slots.acquire(PlaybackClock())


async def test_without_admission_control_only_the_limit_counts():
    clock = Clock()
    slots, _ = slots_of(clock, by_capacity=False, limit=3, cold_streams=1, queue_s=0.0)
    for _ in range(3):
        await slots.acquire(PlaybackClock())
    with pytest.raises(Overloaded, match="limit of 3"):
        await slots.acquire(PlaybackClock())


# -- through a real gateway and real clients ------------------------------------------

TEXT = "Oli otya leero mukwano gwange wange nnyo nnyo?"


def scrape(gateway) -> str:
    return requests.get(f"{gateway.url}/metrics", timeout=10).text


def wait_until(check, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_refusals_for_capacity_say_when_to_retry_on_every_transport(make_gateway, llm):
    """One stream holds the only capacity the cold start trusts and the slow LLM shows:
    the others wait ADMISSION_QUEUE_S, then get 429 with Retry-After (HTTP, OpenAI),
    or an error frame with retry_after on a WebSocket that stays usable."""
    gateway = make_gateway(ADMISSION_COLD_STREAMS="1", ADMISSION_QUEUE_S="0.3")
    llm.control(tokens_per_s=25)  # half of real time: no room for a second stream
    with httpx.Client(timeout=60) as client:
        with client.stream(
            "POST", f"{gateway.url}/v1/audio/speech/stream", json={"text": TEXT}
        ) as first:
            assert first.status_code == 200
            chunks = first.iter_bytes()  # kept: a dropped iterator closes the response
            next(chunks)
            started = time.monotonic()
            native = client.post(f"{gateway.url}/v1/audio/speech/stream", json={"text": "Ki?"})
            assert time.monotonic() - started >= 0.3  # it waited in the queue first
            assert native.status_code == 429 and native.headers["Retry-After"] == "1"
            assert native.json()["error"]["code"] == "too_many_streams"
            openai = client.post(
                f"{gateway.url}/v1/audio/speech",
                json={"model": "tts-1", "input": "Ki?", "voice": "luganda_female"},
            )
            assert openai.status_code == 429 and openai.headers["Retry-After"] == "1"
            assert openai.json() == {
                "error": {
                    "message": openai.json()["error"]["message"],
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "too_many_streams",
                }
            }

            async def over_websocket() -> tuple[dict, list[dict]]:
                async with GatewayClient(gateway.url) as gateway_client:
                    with pytest.raises(ServerError) as refused_http:
                        async with gateway_client.speech_stream("Ki?"):
                            pass
                    assert refused_http.value.status == 429
                    assert refused_http.value.retry_after == 1  # the client reads it too
                    async with gateway_client.speech_socket() as socket:
                        refused, _ = await socket.exchange({"input": "Ki?", "segment_id": 1})
                        first.close()  # the stream holding the capacity goes away
                        await asyncio.to_thread(
                            wait_until,
                            lambda: sample(scrape(gateway), "tts_active_streams") == 0,
                        )
                        llm.control(tokens_per_s=2000)
                        served, audio = await socket.exchange({"input": "Ki?", "segment_id": 2})
                        assert audio
                        return refused[-1], served

            refusal, served = asyncio.run(over_websocket())
    assert refusal["type"] == "error" and refusal["code"] == "too_many_streams"
    assert refusal["retry_after"] == 1 and refusal["segment_id"] == 1
    assert [frame["type"] for frame in served] == ["start", "end"]
    assert sample(scrape(gateway), "tts_admissions_total", decision="refused") == 4


def test_a_queued_request_plays_once_capacity_frees(make_gateway, llm):
    gateway = make_gateway(ADMISSION_COLD_STREAMS="1", ADMISSION_QUEUE_S="30")
    llm.control(tokens_per_s=400)

    def speak(text: str) -> requests.Response:
        return requests.post(
            f"{gateway.url}/v1/audio/speech/stream", json={"text": text}, timeout=60
        )

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(speak, [TEXT, "Oli otya?"]))
    assert [a.status_code for a in answers] == [200, 200]
    assert all(len(a.content) > 0 for a in answers)
    text = scrape(gateway)
    assert sample(text, "tts_admissions_total", decision="admitted") == 1
    assert sample(text, "tts_admissions_total", decision="queued") == 1
    assert sample(text, "tts_admission_wait_seconds_sum") > 0


def test_underruns_and_capacity_are_measured_and_shown(make_gateway, llm):
    """An LLM slower than real time makes its listener wait: counted per stream. /health
    and /metrics show the capacity measured from it."""
    gateway = make_gateway()
    llm.control(tokens_per_s=30)
    assert (
        requests.post(
            f"{gateway.url}/v1/audio/speech/stream", json={"text": TEXT}, timeout=60
        ).status_code
        == 200
    )
    text = scrape(gateway)
    assert sample(text, "tts_stream_underruns_total", endpoint="stream") >= 1
    assert sample(text, "tts_stream_underrun_seconds_count", endpoint="stream") == 1
    assert sample(text, "tts_stream_underrun_seconds_sum", endpoint="stream") > 0.1
    capacity = requests.get(f"{gateway.url}/health", timeout=10).json()["capacity"]
    assert 10 < capacity["llm_tokens_per_s"] < 40  # the stand-in's 30 tokens/s
    assert capacity["streams"] < 1 and capacity["active_streams"] == 0
    assert 10 < sample(text, "tts_capacity_tokens_per_second", stage="llm") < 40

    llm.control(tokens_per_s=2000)  # far ahead of real time: nobody waits
    before = sample(text, "tts_stream_underruns_total", endpoint="stream")
    assert (
        requests.post(
            f"{gateway.url}/v1/audio/speech/stream", json={"text": "Oli otya?"}, timeout=60
        ).status_code
        == 200
    )
    after = scrape(gateway)
    assert sample(after, "tts_stream_underruns_total", endpoint="stream") == before
    assert sample(after, "tts_stream_underrun_seconds_count", endpoint="stream") == 2
