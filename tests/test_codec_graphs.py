"""Bucketed window decodes (codec/runtime/graphs.py): the audio of the eager window decode.

Without CUDA the buckets run eagerly, which checks everything but the capture: the
padding of batches and windows, the gather of the generator windows, the masks.
With CUDA the graphs themselves are checked against the eager decode.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import torch

from decoder_gateway.codec import (
    Decoder,
    Span,
    StreamingConfig,
    WindowGraphs,
    decode_pass,
    load_decoder,
)
from decoder_gateway.codec.runtime.graphs import LENGTH_STEP
from devtools import GOLDEN_BICODEC

GRAPHS_LOGGER = "decoder_gateway.codec.runtime.graphs"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def decoder():
    return load_decoder(GOLDEN_BICODEC)


def chunk_spans(count: int, seed: int = 0) -> list[Span]:
    """Chunk-sized spans at the start, middle and end of sequences, several voices."""
    g = torch.Generator().manual_seed(seed)
    spans = []
    for i in range(count):
        length = (12, 40, 90, 200)[i % 4]
        semantic = torch.randint(0, 8192, (length,), generator=g)
        size = 1 + (5 * i) % 11
        start = min((0, length // 2, length - size)[i % 3], length - size)
        voice = torch.randint(0, 4096, (32,), generator=g)
        spans.append(Span(semantic, voice, start, start + size))
    return spans


@pytest.fixture
def passes(caplog) -> Callable[[], tuple[int, int]]:
    """How the graphed passes went so far, read from graphs.py's debug log: (passes a
    bucket served, spans that went the eager window decode)."""
    caplog.set_level(logging.DEBUG, logger=GRAPHS_LOGGER)

    def count() -> tuple[int, int]:
        records = [r for r in caplog.records if r.name == GRAPHS_LOGGER]
        served = sum("served a pass" in r.getMessage() for r in records)
        eager = sum(int(r.args[0]) for r in records if r.getMessage().startswith("eager"))
        return served, eager

    return count


def graphed(decoder: Decoder, **options) -> tuple[Decoder, WindowGraphs]:
    """A decoder of the same model whose window decodes go through bucketed graphs."""
    graphs = WindowGraphs(decoder.model, capture=False, **options)
    return Decoder(decoder.model, graphs=graphs), graphs


def assert_same_audio(expected: list[torch.Tensor], got: list[torch.Tensor]) -> None:
    assert len(expected) == len(got)
    for x, y in zip(expected, got, strict=True):
        assert x.shape == y.shape
        assert (x - y).abs().max() <= 1e-5


@pytest.mark.parametrize("count", [1, 3, 7, 20])
def test_buckets_give_the_eager_audio(decoder, count, passes):
    spans = chunk_spans(count, seed=count)
    through, _ = graphed(decoder)
    assert_same_audio(decode_pass(decoder.model, spans), through.decode_spans(spans))
    served, eager = passes()
    assert eager == 0 and served >= 1


def test_a_bucket_is_reused_with_new_contents(decoder):
    """The same bucket twice: the second pass sees only its own spans."""
    through, graphs = graphed(decoder)
    first, second = chunk_spans(3, seed=1), chunk_spans(3, seed=2)
    through.decode_spans(first)
    buckets = len(graphs._buckets)
    assert_same_audio(decode_pass(decoder.model, second), through.decode_spans(second))
    assert len(graphs._buckets) == buckets


def test_long_windows_and_full_buckets_go_eager(decoder, passes):
    g = torch.Generator().manual_seed(3)
    whole = torch.randint(0, 8192, (400,), generator=g)
    voice = torch.randint(0, 4096, (32,), generator=g)
    long_span = Span(whole, voice, 0, 400)  # a whole utterance: longer than max_tokens
    through, graphs = graphed(decoder, max_tokens=8 * LENGTH_STEP, max_graphs=1)
    assert_same_audio(decode_pass(decoder.model, [long_span]), through.decode_spans([long_span]))
    assert passes()[1] == 1
    through.decode_spans(chunk_spans(1))  # takes the one bucket allowed
    other = chunk_spans(9, seed=4)  # another bucket shape: eager
    assert_same_audio(decode_pass(decoder.model, other), through.decode_spans(other))
    assert len(graphs._buckets) == 1


def test_streams_through_the_buckets_get_their_audio(decoder, passes):
    """A decoder with graphs serves streaming sessions by window decodes: the same
    audio as the stream-state path."""

    def stream(decoder: Decoder, semantic: list[int], voice: torch.Tensor) -> torch.Tensor:
        session = decoder.open_stream(voice, StreamingConfig())
        out = []
        for i in range(0, len(semantic), 3):
            session.push(semantic[i : i + 3])
            chunks = session.plan()
            audio = decoder.decode_spans([chunk.span for chunk in chunks])
            out += [session.complete(c, a) for c, a in zip(chunks, audio, strict=True)]
        session.finish()
        chunks = session.plan()
        audio = decoder.decode_spans([chunk.span for chunk in chunks])
        out += [session.complete(c, a) for c, a in zip(chunks, audio, strict=True)]
        return torch.cat(out)

    g = torch.Generator().manual_seed(6)
    semantic = torch.randint(0, 8192, (150,), generator=g).tolist()
    voice = torch.randint(0, 4096, (32,), generator=g)
    plain = stream(decoder, semantic, voice)
    through, _ = graphed(decoder)
    replayed = stream(through, semantic, voice)
    assert replayed.shape == plain.shape == (320 * 150,)
    assert (replayed - plain).abs().max() <= 1e-5
    assert passes()[0] > 5


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graphs_replay_the_eager_audio(dtype):
    decoder = load_decoder(GOLDEN_BICODEC, device="cuda", dtype=dtype, cuda_graphs=True)
    graphs = decoder.graphs
    assert graphs is not None and graphs.capture
    for seed, count in ((1, 1), (2, 3), (3, 16), (4, 3)):  # seed 4: bucket of seed 2 again
        spans = chunk_spans(count, seed)
        expected = decode_pass(decoder.model, spans)
        got = decoder.decode_spans(spans)
        tolerance = 1e-4 if dtype == torch.float32 else 2e-2
        for x, y in zip(expected, got, strict=True):
            assert x.shape == y.shape and (x - y).abs().max() <= tolerance
    assert graphs.failure is None
    assert all(bucket.graph is not None for bucket in graphs._buckets.values())
