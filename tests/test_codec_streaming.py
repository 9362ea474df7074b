"""Streaming decode against the full decode: length, exactness, arrival patterns, batching.

Every test drives a session the way the gateway does: ``plan()``, then
``decoder.decode_spans`` of the planned spans, then ``complete()`` in order
(:func:`run_chunks`). The planned spans carry the session's decode state
(:mod:`decoder_gateway.codec.runtime.incremental`); the same spans without it take the plain
window decode, which every chunk must match. A span that its stream's state cannot
serve is logged as decoded by its plain window (:func:`stream_fallbacks` counts them).
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from decoder_gateway.codec import (
    Decoder,
    PlannedChunk,
    Span,
    StreamingConfig,
    StreamingSession,
    load_decoder,
)
from decoder_gateway.codec.runtime.incremental import Stage

GOLDEN = Path(__file__).parent / "data" / "bicodec" / "golden_small"
HOP = 320


@pytest.fixture(scope="module")
def decoder() -> Decoder:
    return load_decoder(GOLDEN)


@pytest.fixture(scope="module")
def cases() -> list[dict[str, np.ndarray]]:
    npz = np.load(GOLDEN / "cases.npz")
    return [{name: npz[f"{name}_{i}"] for name in ("semantic", "global")} for i in range(3)]


def snr_db(reference: torch.Tensor, estimate: torch.Tensor) -> float:
    error = (estimate - reference).pow(2).sum().clamp_min(1e-30)
    return float(10 * torch.log10(reference.pow(2).sum() / error))


def window_spans(chunks: list[PlannedChunk]) -> list[Span]:
    """The chunks' spans without the stream state: the plain window decode."""
    return [replace(chunk.span, stream=None) for chunk in chunks]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "plain window" in record.getMessage():
            self.records.append(record)


@contextlib.contextmanager
def stream_fallbacks() -> Iterator[list[logging.LogRecord]]:
    """The stream spans decoded as plain windows while the block runs (their stream's
    state could not serve them), as the stream-state decode logs them."""
    logger = logging.getLogger("decoder_gateway.codec.runtime.incremental")
    handler, level = _Records(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture
def fell_back() -> Iterator[list[logging.LogRecord]]:
    with stream_fallbacks() as records:
        yield records


def run_chunks(
    decoder: Decoder, session: StreamingSession, chunks: list[PlannedChunk], plain: bool = False
) -> list[torch.Tensor]:
    """Decode planned chunks in one batch and complete them, as the gateway's worker does."""
    spans = window_spans(chunks) if plain else [chunk.span for chunk in chunks]
    audio = decoder.decode_spans(spans)
    return [session.complete(chunk, samples) for chunk, samples in zip(chunks, audio, strict=True)]


def _stream(decoder, semantic, global_tokens, config, max_push, seed=0, plain=False):
    session = decoder.open_stream(global_tokens, config)
    rng = random.Random(seed)
    chunks, position, first_audio_at = [], 0, None
    with stream_fallbacks() as fell_back:
        while position < len(semantic):
            size = rng.randint(1, max_push)
            session.push(semantic[position : position + size])
            position += size
            ready = run_chunks(decoder, session, session.plan(), plain)
            if ready and first_audio_at is None:
                first_audio_at = position
            chunks += ready
        session.finish()
        chunks += run_chunks(decoder, session, session.plan(), plain)
    assert session.done
    assert len(fell_back) == 0  # every span came from the stream's state
    return chunks, first_audio_at


def test_stream_with_full_lookahead_is_exact(decoder, cases):
    c = cases[2]
    full = decoder.decode(c["semantic"][0], c["global"][0, 0])
    config = StreamingConfig(first_lookahead_tokens=67)
    chunks, _ = _stream(decoder, c["semantic"][0], c["global"][0, 0], config, max_push=5)
    assert len(chunks) > 3
    assert (torch.cat(chunks) - full).abs().max() <= 1e-5


@pytest.mark.parametrize("max_push", [1, 4, 25])
def test_default_stream_starts_early_keeps_length_and_ends_exact(decoder, cases, max_push):
    c = cases[2]
    semantic, global_tokens = c["semantic"][0], c["global"][0, 0]
    full = decoder.decode(semantic, global_tokens)
    chunks, first_audio_at = _stream(decoder, semantic, global_tokens, StreamingConfig(), max_push)
    streamed = torch.cat(chunks)
    assert streamed.shape == full.shape  # no sample twice, none dropped
    if max_push == 1:
        assert first_audio_at == 14  # first chunk 10 tokens + 4 look-ahead
    assert snr_db(full, streamed) > 20
    # From where look-ahead reaches the receptive field on, the stream is exact: the end.
    tail = HOP * 40
    assert (streamed[-tail:] - full[-tail:]).abs().max() <= 1e-5


def test_stream_is_independent_of_arrival_pattern(decoder, cases):
    c = cases[1]
    args = (c["semantic"][0], c["global"][0, 0], StreamingConfig())
    one = torch.cat(_stream(decoder, *args, max_push=1)[0])
    many = torch.cat(_stream(decoder, *args, max_push=9, seed=3)[0])
    assert torch.equal(one, many)


def test_stream_shorter_than_first_chunk(decoder, cases):
    c = cases[0]
    semantic = c["semantic"][0][:3]
    chunks, _ = _stream(decoder, semantic, c["global"][0, 0], StreamingConfig(), 1)
    full = decoder.decode(semantic, c["global"][0, 0])
    assert (torch.cat(chunks) - full).abs().max() <= 1e-5


def test_zero_lookahead_stream_ends_with_its_held_tail(decoder, cases):
    """A chunk without look-ahead ends at the last token so far and holds its crossfade
    tail; when finish() follows, that tail is still owed and must be planned."""
    c = cases[0]
    semantic, voice = c["semantic"][0][:10], c["global"][0, 0]
    session = decoder.open_stream(voice, StreamingConfig(first_lookahead_tokens=0))
    session.push(semantic)
    audio = run_chunks(decoder, session, session.plan())
    assert sum(part.numel() for part in audio) == HOP * 10 - 320  # the tail is held back
    session.finish()
    assert not session.done
    last = session.plan()
    assert len(last) == 1 and last[0].final
    audio += run_chunks(decoder, session, last)
    assert session.done and session.plan() == []
    streamed, full = torch.cat(audio), decoder.decode(semantic, voice)
    assert streamed.shape == full.shape == (HOP * 10,)
    # The chunk's window already ended at the true end: all of it is exact.
    assert (streamed - full).abs().max() <= 1e-5


def test_a_short_buffer_gets_audio_before_look_ahead(decoder, cases):
    """Below the target buffer the tokens past the last chunk go to audio at the quality
    look-ahead; below the minimum, a chunk comes from whatever there is; at or above the
    target, and with no listener yet, the schedule alone decides."""
    voice = cases[0]["global"][0, 0]
    config = StreamingConfig(min_buffer_s=0.3, target_buffer_s=1.0)
    plans = {}
    for buffer_s in (None, 1.0, 0.5, 0.1):
        session = decoder.open_stream(voice, config)
        session.push(list(range(14)))
        first = session.plan()  # the first chunk: 10 tokens, 4 of look-ahead
        assert [(c.span.offset + c.span.end) for c in first] == [10]
        run_chunks(decoder, session, first)
        session.push(list(range(14, 36)))  # 26 tokens past the first chunk
        plans[buffer_s] = [c.span.offset + c.span.end for c in session.plan(buffer_s)]
    # The schedule wants 10 + 4 + 2 * 10 = 34 tokens for a chunk to 20 (look-ahead 14).
    assert plans[None] == plans[1.0] == [20]
    # Short of the target: audio up to 36 - 16 = 20, then the next chunk waits.
    assert plans[0.5] == [20]
    # About to run dry: on from 20 with what is left, its look-ahead the tokens past
    # 10 of them (16 - 10 = 6), so audio up to 30 rather than a wait for 10 more.
    assert plans[0.1] == [20, 30]

    session = decoder.open_stream(voice, config)
    session.push(list(range(14)))
    run_chunks(decoder, session, session.plan())
    session.push(list(range(14, 60)))
    # With 60 tokens: the schedule's chunk ends at 20 (at most 14 + 2 * 10 tokens
    # foreseen); short of the target, audio goes up to 60 - 16 = 44.
    assert [c.span.offset + c.span.end for c in session.plan(0.5)] == [44]
    session.push(list(range(60, 68)))
    assert session.plan(0.5) == []  # 8 new tokens: fewer than a chunk plus its look-ahead
    # About to run dry: 24 tokens past 44, 14 of them look-ahead: audio up to 54.
    assert [c.span.offset + c.span.end for c in session.plan(0.1)] == [54]


def test_max_lookahead_zero_means_none(decoder, cases):
    config = StreamingConfig(first_lookahead_tokens=4, max_lookahead_tokens=0)
    session = decoder.open_stream(cases[0]["global"][0, 0], config)
    assert session.chunk_after(0) == (10, 0)
    assert all(session.chunk_after(start)[1] == 0 for start in (10, 50, 300))
    with pytest.raises(ValueError, match="max_lookahead_tokens"):
        StreamingConfig(max_lookahead_tokens=-1)


def test_stream_rejects_bad_tokens_and_misuse(decoder, cases):
    session = decoder.open_stream(cases[0]["global"][0, 0])
    with pytest.raises(ValueError, match="outside"):
        session.push([8192])
    with pytest.raises(ValueError, match="empty"):
        session.finish()
    session.push([1, 2])
    session.finish()
    with pytest.raises(RuntimeError):
        session.push([3])
    with pytest.raises(ValueError, match="32 global tokens"):
        decoder.open_stream([1, 2, 3])


def test_streams_of_several_sessions_batch_together(decoder, cases):
    """Chunks planned by different sessions decode in one batch, as the gateway does."""
    sessions = [decoder.open_stream(c["global"][0, 0]) for c in cases]
    outputs: list[list[torch.Tensor]] = [[] for _ in cases]
    longest = max(c["semantic"].shape[1] for c in cases)
    for position in range(0, longest + 1, 3):
        planned = []
        for i, (session, c) in enumerate(zip(sessions, cases, strict=True)):
            tokens = c["semantic"][0]
            if position < len(tokens):
                session.push(tokens[position : position + 3])
            elif not session.finished:
                session.finish()
            planned += [(i, chunk) for chunk in session.plan()]
        audio = decoder.decode_spans([chunk.span for _, chunk in planned])
        for (i, chunk), samples in zip(planned, audio, strict=True):
            outputs[i].append(sessions[i].complete(chunk, samples))
    for session, c, out in zip(sessions, cases, outputs, strict=True):
        if not session.done:
            session.finish()
            out += run_chunks(decoder, session, session.plan())
        solo = torch.cat(_stream(decoder, c["semantic"][0], c["global"][0, 0], None, 3)[0])
        assert torch.cat(out).shape == solo.shape
        assert (torch.cat(out) - solo).abs().max() <= 1e-5


# -- property: any settings, any arrival pattern -----------------------------------


def random_config(rng: random.Random) -> StreamingConfig:
    min_chunk = rng.randint(1, 24)
    return StreamingConfig(
        first_chunk_tokens=rng.randint(1, 24),
        first_lookahead_tokens=rng.choice([0, 0, 1, 3, 8, 30, 67, 90]),
        min_chunk_tokens=min_chunk,
        max_chunk_tokens=rng.randint(min_chunk, 60),
        max_lookahead_tokens=rng.choice([None, None, None, 0, 5, 67]),
        assumed_speedup=rng.choice([1.0, 1.0, 1.3, 2.0, 4.0]),
        crossfade_samples=rng.choice([0, 1, 160, 320, 700, 3200]),
    )


def chunk_ends(session: StreamingSession, limit: int) -> list[int]:
    """Where the chunks of a long enough stream end, up to ``limit`` tokens."""
    ends = [session.chunk_after(0)[0]]
    while ends[-1] < limit:
        ends.append(session.chunk_after(ends[-1])[0])
    return [end for end in ends if end <= limit] or [limit]


class ExactnessTracker:
    """Marks the streamed samples that must equal the full decode's.

    A chunk's decode is exact when its window holds the receptive field each side of
    its span, or reaches the sequence's true start or end there. A sample is exact
    when every decode that went into it is: a chunk's first samples are blended with
    the tail that the previous chunk held back, and a chunk that is not final holds
    back ``session.crossfade`` samples for the next one.
    """

    def __init__(self, session: StreamingSession, length: int) -> None:
        self.session, self.length = session, length
        self.emitted = 0  # samples returned so far
        self.held = torch.zeros(0, dtype=torch.bool)  # marks of the held-back tail
        self.marks: list[torch.Tensor] = []
        self.last_exact = False  # whether the last chunk so far decoded exactly

    def add(self, chunk: PlannedChunk, out: torch.Tensor) -> None:
        span, field = chunk.span, self.session.model.receptive_field
        kept = 0 if chunk.final else self.session.crossfade
        end_sample = self.emitted + out.numel() + kept  # the chunk covers audio up to here
        assert end_sample % HOP == 0
        end = end_sample // HOP  # token at the span's end, in the whole sequence
        right = span.semantic.numel() - span.end  # tokens of look-ahead in the window
        left_ok = span.start >= field or end == span.end  # or the window starts at token 0
        right_ok = right >= field or end + right == self.length
        self.last_exact = left_ok and right_ok
        mark = torch.full((out.numel() + kept,), self.last_exact)
        mark[: self.held.numel()] &= self.held
        self.marks.append(mark[: out.numel()])
        self.held = mark[out.numel() :]
        self.emitted += out.numel()


@pytest.mark.parametrize("seed", range(40))
def test_any_stream_has_every_sample_and_an_exact_end(decoder, seed, fell_back):
    """Random settings, length and arrival (pushes of 1..N tokens, plan and decode at
    random times, some plans hurried, chunks still waiting at finish, so a batch may
    hold several chunks of the stream): 320 samples per token, every chunk as the
    window decode gives it, and every sample that only exact decodes went into equals
    the full decode's."""
    rng = random.Random(seed)
    config = random_config(rng)
    hurry_rng = random.Random(-seed)  # apart, so that the other draws stay as they were
    hurried = seed % 2 == 1
    if hurried:
        config = replace(
            config,
            min_buffer_s=0.3,
            target_buffer_s=1.0,
            buffering_lookahead_tokens=hurry_rng.choice([0, 4, 16, 30]),
        )
    voice = [rng.randrange(4096) for _ in range(32)]
    session = decoder.open_stream(voice, config)
    if rng.random() < 0.5:
        length = rng.choice([rng.randint(1, 12), rng.randint(1, 80), rng.randint(1, 300)])
    else:  # ends where a chunk does: a chunk without look-ahead then holds a tail at finish
        length = rng.choice(chunk_ends(session, 300))
    semantic = [rng.randrange(8192) for _ in range(length)]
    max_push = rng.choice([1, 3, 10, 40])

    tracker = ExactnessTracker(session, length)
    out: list[torch.Tensor] = []
    waiting: list[PlannedChunk] = []  # planned, not yet decoded: the worker is busy

    def decode_waiting() -> None:
        if not waiting:
            return
        # The plain window decode first: it leaves the stream's state alone.
        plain = decoder.decode_spans(window_spans(waiting))
        audio = decoder.decode_spans([chunk.span for chunk in waiting])
        for chunk, samples, expected in zip(waiting, audio, plain, strict=True):
            assert (samples - expected).abs().max() <= 1e-5, config
            out_samples = session.complete(chunk, samples)
            tracker.add(chunk, out_samples)
            out.append(out_samples)
        waiting.clear()

    position = 0
    while position < length:
        size = rng.randint(1, max_push)
        session.push(semantic[position : position + size])
        position += size
        if rng.random() < 0.8:
            # Half the seeds also plan for a short buffer at times: a listener below
            # the target, or about to run dry.
            buffer_s = None
            if hurried and hurry_rng.random() < 0.4:
                buffer_s = hurry_rng.choice([0.0, 0.5, 2.0])
            waiting += session.plan(buffer_s=buffer_s)
        if rng.random() < 0.7:
            decode_waiting()
    session.finish()
    assert not session.done
    waiting += session.plan()
    decode_waiting()
    assert session.done and session.plan() == []
    assert len(fell_back) == 0, config

    streamed, full = torch.cat(out), decoder.decode(semantic, voice)
    assert streamed.shape == full.shape == (HOP * length,), config
    exact = torch.cat(tracker.marks)
    # The last chunk's window reaches the true end (it may be final or, without
    # crossfade, one that ended at the last token), so the last token is always exact,
    # and so is everything after the last sample that an approximate decode went into.
    assert tracker.last_exact, config
    assert exact[-HOP:].all(), config
    error = (streamed - full).abs()
    assert error[exact].max() <= 1e-5, config
    field = decoder.model.receptive_field
    if config.first_lookahead_tokens >= field and session.max_lookahead >= field:
        assert exact.all(), config  # look-ahead is the whole receptive field throughout


# -- the stream's state: the same audio, each settled sample computed once -----------

# The settings of the SNR table in benchmarks/bench_decoder.py.
BENCH_SETTINGS = {
    "exact": StreamingConfig(first_lookahead_tokens=67),
    "default": StreamingConfig(),
    "no-crossfade": StreamingConfig(crossfade_samples=0),
    "crossfade-640": StreamingConfig(crossfade_samples=640),
    "10+0": StreamingConfig(first_lookahead_tokens=0),
    "10+8": StreamingConfig(first_lookahead_tokens=8),
    "10+16": StreamingConfig(first_lookahead_tokens=16),
    "speed-up-4": StreamingConfig(assumed_speedup=4.0),
    "speed-up-1": StreamingConfig(assumed_speedup=1.0),
}


@pytest.mark.parametrize("name", list(BENCH_SETTINGS))
@pytest.mark.parametrize("max_push", [1, 9])
def test_stream_state_gives_the_window_decodes_audio(decoder, cases, name, max_push):
    """Reusing the stream's settled state changes nothing: the stream equals the one
    that decodes every chunk's window from scratch (the scheme before the state)."""
    c = cases[2]
    args = (decoder, c["semantic"][0], c["global"][0, 0], BENCH_SETTINGS[name], max_push)
    reused = torch.cat(_stream(*args)[0])
    from_scratch = torch.cat(_stream(*args, plain=True)[0])
    assert reused.shape == from_scratch.shape == (HOP * c["semantic"].shape[1],)
    assert (reused - from_scratch).abs().max() <= 1e-5


def _count_outputs(monkeypatch) -> dict[int, int]:
    """Outputs each stage computes (by the stage's id), counted from now on."""
    counts: dict[int, int] = {}
    run = Stage.run

    def counting_run(self, pieces, cond):
        counts[id(self)] = counts.get(id(self), 0) + sum(p.hi - p.lo for p in pieces)
        return run(self, pieces, cond)

    monkeypatch.setattr(Stage, "run", counting_run)
    return counts


def test_exact_stream_computes_every_output_once(decoder, cases, monkeypatch):
    """With look-ahead covering the receptive field, no chunk is approximate: every
    stage computes each of its outputs once, as one full decode does."""
    c = cases[2]
    length = c["semantic"].shape[1]
    counts = _count_outputs(monkeypatch)
    _stream(decoder, c["semantic"][0], c["global"][0, 0], BENCH_SETTINGS["exact"], 1)
    for stage in decoder.streaming_stages():
        assert counts[id(stage)] == length * stage.rate_in * stage.up


def test_approximate_chunks_recompute_only_their_own_samples(decoder, cases, monkeypatch):
    """Default settings: the audio samples computed beyond one full decode's are those
    of the approximate chunks (each with its re-decoded crossfade token), no more."""
    c = cases[2]
    semantic, voice = c["semantic"][0], c["global"][0, 0]
    session = decoder.open_stream(voice)
    approximate, start = 0, 0
    while True:
        end, lookahead = session.chunk_after(start)
        if lookahead >= decoder.model.receptive_field:
            break
        approximate += end - max(0, start - 1)
        start = end
    counts = _count_outputs(monkeypatch)
    _stream(decoder, semantic, voice, StreamingConfig(), 1)
    last = decoder.streaming_stages()[-1]
    assert HOP * len(semantic) < counts[id(last)] <= HOP * (len(semantic) + approximate)


def test_a_span_decoded_out_of_order_falls_back_to_its_window(decoder, cases, fell_back):
    """The state cannot go back: an earlier chunk decoded after a later one takes the
    plain window decode, with the same audio, and the stream carries on."""
    c = cases[2]
    semantic, voice = c["semantic"][0], c["global"][0, 0]
    session = decoder.open_stream(voice)
    session.push(semantic[:120])
    chunks = session.plan()
    assert len(chunks) >= 3
    expected = decoder.decode_spans(window_spans(chunks))
    later = decoder.decode_spans([chunks[1].span])[0]
    earlier = decoder.decode_spans([chunks[0].span])[0]
    assert len(fell_back) == 1
    rest = decoder.decode_spans([chunk.span for chunk in chunks[2:]])
    for got, want in zip([earlier, later, *rest], expected, strict=True):
        assert (got - want).abs().max() <= 1e-5
    assert len(fell_back) == 1


def test_a_failed_batch_leaves_the_stream_state_as_it_was(decoder, cases, fell_back):
    c = cases[1]
    session = decoder.open_stream(c["global"][0, 0])
    session.push(c["semantic"][0][:60])
    chunks = session.plan()
    before = session.stream.state
    bad = Span(torch.tensor([1, 2, 3]), torch.zeros(32, dtype=torch.long), 2, 9)
    with pytest.raises(ValueError, match="outside"):
        decoder.decode_spans([*(chunk.span for chunk in chunks), bad])
    assert session.stream.state is before
    audio = decoder.decode_spans([chunk.span for chunk in chunks])
    for got, want in zip(audio, decoder.decode_spans(window_spans(chunks)), strict=True):
        assert (got - want).abs().max() <= 1e-5
    assert len(fell_back) == 0


# -- the first chunk chosen by time --------------------------------------------------

BUDGET = StreamingConfig(first_audio_budget_s=0.1)


def _first_window(decoder, voice, semantic, rate: float) -> tuple[PlannedChunk, int]:
    """Push one token every 1/rate s; the first chunk and the tokens seen when planned."""
    session = decoder.open_stream(voice, BUDGET)
    for position, token in enumerate(semantic, start=1):
        session.push([token], at=1000.0 + (position - 1) / rate)
        chunks = session.plan()
        if chunks:
            return chunks[0], position
    raise AssertionError("no first chunk")


@pytest.mark.parametrize("rate", [50, 200, 400, 3000])
def test_first_chunk_by_time_takes_what_arrives_within_the_budget(decoder, cases, rate):
    c = cases[2]
    first, seen = _first_window(decoder, c["global"][0, 0], c["semantic"][0], rate)
    window = first.span.semantic.numel()  # the first window starts at token 0
    assert window == seen  # planned as its last token came, with every token so far
    lookahead = window - BUDGET.first_chunk_tokens
    if rate * BUDGET.first_audio_budget_s < BUDGET.first_chunk_tokens:
        assert lookahead == 0  # too slow for the budget: the first chunk, at once
    elif lookahead < decoder.model.receptive_field:
        # Its last token came within the budget; the next one would have come after it.
        assert (window - 1) / rate <= 0.1 + 1e-9 < window / rate + 1e-9
    else:
        assert lookahead == decoder.model.receptive_field  # more would change nothing


def test_first_chunk_by_time_waits_for_a_rate(decoder, cases):
    """Tokens in one burst give no rate: the first chunk waits for the next push, or
    for the budget to pass."""
    c = cases[2]
    session = decoder.open_stream(c["global"][0, 0], BUDGET)
    session.push(c["semantic"][0][:30], at=5.0)
    assert session.plan() == []
    session.push(c["semantic"][0][30:31], at=5.25)  # after the budget: take what is there
    (first,) = session.plan()
    assert first.span.semantic.numel() == 31
    assert session.chunk_after(0) == (BUDGET.first_chunk_tokens, 21)


@pytest.mark.parametrize("rate", [50, 400])
def test_stream_with_a_first_audio_budget_keeps_length_and_exact_end(
    decoder, cases, rate, fell_back
):
    c = cases[2]
    semantic, voice = c["semantic"][0], c["global"][0, 0]
    session = decoder.open_stream(voice, BUDGET)
    out, window_ends = [], []
    for position, token in enumerate(semantic, start=1):
        session.push([token], at=(position - 1) / rate)
        chunks = session.plan()
        window_ends += [chunk.span.offset + chunk.span.semantic.numel() for chunk in chunks]
        out += run_chunks(decoder, session, chunks)
    session.finish()
    out += run_chunks(decoder, session, session.plan())
    streamed, full = torch.cat(out), decoder.decode(semantic, voice)
    assert streamed.shape == full.shape
    assert window_ends == sorted(window_ends)  # look-ahead never shrinks
    assert (streamed[-HOP * 40 :] - full[-HOP * 40 :]).abs().max() <= 1e-5
    assert len(fell_back) == 0


def test_first_audio_budget_must_be_positive():
    with pytest.raises(ValueError, match="first_audio_budget_s"):
        StreamingConfig(first_audio_budget_s=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_stream_state_on_cuda_gives_the_window_decodes_audio(cases):
    cuda = load_decoder(GOLDEN, device="cuda")
    c = cases[2]
    args = (cuda, c["semantic"][0], c["global"][0, 0], StreamingConfig(), 4)
    reused = torch.cat(_stream(*args)[0])
    from_scratch = torch.cat(_stream(*args, plain=True)[0])
    assert (reused - from_scratch).abs().max() <= 1e-4
