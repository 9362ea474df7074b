"""The decode worker: batches across streams, most urgent first, off the event loop."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import pytest
import torch

from decoder_gateway.codec import Decoder, Span, StreamingSession, load_decoder
from decoder_gateway.codec.runtime.worker import DecodeWorker
from decoder_gateway.errors import DecoderError
from decoder_gateway.metrics import Metrics
from devtools.gateway_server import GOLDEN_BICODEC


@pytest.fixture(scope="module")
def decoder():
    return load_decoder(GOLDEN_BICODEC)


def batches_decoded(metrics: Metrics) -> float:
    """Decoder passes the worker has run, from its batch-size histogram."""
    return metrics.registry.get_sample_value("tts_decoder_batch_spans_count") or 0.0


def span(decoder, length: int, seed: int) -> Span:
    g = torch.Generator().manual_seed(seed)
    semantic = torch.randint(0, 8192, (length,), generator=g)
    return Span(semantic, torch.randint(0, 4096, (32,), generator=g), 0, length)


async def test_batches_equal_single_decodes(decoder):
    metrics = Metrics()
    worker = DecodeWorker(decoder, max_batch=8, metrics=metrics)
    worker.start()
    try:
        spans = [span(decoder, n, i) for i, n in enumerate((12, 30, 7, 50))]
        results = await asyncio.gather(*(worker.decode([s]) for s in spans))
        for s, (audio,) in zip(spans, results, strict=True):
            assert (audio - decoder.decode_spans([s])[0]).abs().max() <= 1e-5
        assert batches_decoded(metrics) < len(spans)  # some went together
    finally:
        await worker.close()


async def test_streams_share_batches_and_keep_their_audio(decoder, caplog):
    """Chunks of concurrent streams, each span carrying its session's decode state,
    go through shared batches with the audio of their plain window decodes."""
    caplog.set_level("DEBUG", logger="decoder_gateway.codec.runtime.incremental")
    metrics = Metrics()
    worker = DecodeWorker(decoder, max_batch=8, metrics=metrics)
    worker.start()
    g = torch.Generator().manual_seed(5)
    voices = [torch.randint(0, 4096, (32,), generator=g) for _ in range(3)]
    texts = [torch.randint(0, 8192, (n,), generator=g).tolist() for n in (90, 130, 60)]
    decoded: list[tuple[Span, torch.Tensor]] = []

    async def stream(session: StreamingSession, semantic: list[int]) -> None:
        pushes = [semantic[i : i + 7] for i in range(0, len(semantic), 7)]
        for push in [*pushes, None]:
            if push is None:
                session.finish()
            else:
                session.push(push)
            chunks = session.plan()
            audio = await worker.decode([chunk.span for chunk in chunks])
            for chunk, samples in zip(chunks, audio, strict=True):
                decoded.append((chunk.span, samples))
                session.complete(chunk, samples)
        assert session.done

    try:
        sessions = [worker.open_stream(voice) for voice in voices]
        await asyncio.gather(*(stream(s, t) for s, t in zip(sessions, texts, strict=True)))
        assert batches_decoded(metrics) < len(decoded)  # streams went together
        # No span of any session fell back to its plain window: all came from the state.
        assert not [r for r in caplog.records if "plain window" in r.getMessage()]
        plain = decoder.decode_spans([replace(span, stream=None) for span, _ in decoded])
        for (_, samples), expected in zip(decoded, plain, strict=True):
            assert (samples - expected).abs().max() <= 1e-5
    finally:
        await worker.close()


async def test_a_batch_holds_what_fits_the_budget(decoder, monkeypatch):
    """Jobs queued behind a busy worker go in batches of at most the decoder's
    budget of generator tokens (one job alone when it is bigger)."""
    batches: list[list[Span]] = []
    decoder = Decoder(decoder.model, batch_tokens=40)
    decode = decoder.decode_spans

    def recording(spans):
        batches.append(list(spans))
        return decode(spans)

    monkeypatch.setattr(decoder, "decode_spans", recording)
    worker = DecodeWorker(decoder, max_batch=64)
    worker.start()
    try:
        busy = asyncio.create_task(worker.decode([span(decoder, 300, 99)]))
        await asyncio.sleep(0.05)
        lengths = (10, 12, 15, 9, 30, 50, 8, 11)
        queued = [worker.decode([span(decoder, n, i)]) for i, n in enumerate(lengths)]
        results = await asyncio.gather(busy, *queued)
        assert [len(audio[0]) for audio in results[1:]] == [320 * n for n in lengths]
        costs = [[decoder.cost([s]) for s in b] for b in batches[1:]]
        assert sorted(c for batch in costs for c in batch) == sorted(lengths)
        assert all(sum(batch) <= 40 or len(batch) == 1 for batch in costs)
        assert any(len(batch) > 1 for batch in costs)  # small ones still went together
    finally:
        await worker.close()


async def test_most_urgent_first(decoder):
    worker = DecodeWorker(decoder, max_batch=1)
    worker.start()
    order: list[str] = []

    async def run(name: str, deadline: float | None, length: int) -> None:
        await worker.decode([span(decoder, length, len(order))], deadline)
        order.append(name)

    try:
        busy = asyncio.create_task(run("busy", None, 400))  # occupies the worker
        await asyncio.sleep(0.05)
        later = time.monotonic() + 10
        queued = [
            asyncio.create_task(run("ahead-by-10s", later, 20)),
            asyncio.create_task(run("ahead-by-5s", later - 5, 20)),
            asyncio.create_task(run("first-chunk", None, 20)),
        ]
        await asyncio.gather(busy, *queued)
        assert order == ["busy", "first-chunk", "ahead-by-5s", "ahead-by-10s"]
    finally:
        await worker.close()


async def test_event_loop_stays_free_during_decode(decoder):
    worker = DecodeWorker(decoder)
    worker.start()
    try:
        decoding = asyncio.create_task(worker.decode([span(decoder, 600, 1)]))
        ticks = 0
        while not decoding.done():
            await asyncio.sleep(0.005)
            ticks += 1
        assert ticks > 3  # the loop ran while torch worked in the worker thread
    finally:
        await worker.close()


async def test_a_failing_batch_fails_its_callers_not_the_worker(decoder):
    worker = DecodeWorker(decoder)
    worker.start()
    try:
        bad = Span(torch.tensor([1, 2, 3]), torch.zeros(32, dtype=torch.long), 2, 9)
        # Typed for the transports (500, decoder_error), with what torch raised.
        with pytest.raises(DecoderError, match=r"ValueError: span .* outside") as caught:
            await worker.decode([bad])
        assert caught.value.status == 500 and caught.value.code == "decoder_error"
        (audio,) = await worker.decode([span(decoder, 5, 0)])
        assert audio.shape == (5 * 320,)
        assert worker.problem() is None
    finally:
        await worker.close()


async def test_a_dead_worker_is_reported_and_fails_its_callers(decoder, monkeypatch):
    """A bug in the worker loop itself: /health's problem() says so, queued and later
    callers get a DecoderError instead of waiting forever."""
    worker = DecodeWorker(decoder)

    async def broken_serve() -> None:
        await asyncio.sleep(0.05)
        raise RuntimeError("worker bug")

    monkeypatch.setattr(worker, "_serve", broken_serve)
    worker.start()
    try:
        with pytest.raises(DecoderError, match="stopped"):
            await worker.decode([span(decoder, 5, 0)])  # queued when the worker dies
        problem = worker.problem()
        assert problem is not None and "worker bug" in problem
        with pytest.raises(DecoderError, match="stopped"):
            await worker.decode([span(decoder, 5, 0)])
    finally:
        await worker.close()
