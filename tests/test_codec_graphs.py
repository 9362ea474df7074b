"""Bucketed window decodes (codec/graphs.py): the audio of the eager window decode.

Without CUDA the buckets run eagerly, which checks everything but the capture: the
padding of batches and windows, the gather of the generator windows, the masks.
With CUDA the graphs themselves are checked against the eager decode.
"""

from __future__ import annotations

import pytest
import torch

from decoder_gateway.codec import (
    Span,
    StreamingConfig,
    StreamingSession,
    WindowGraphs,
    decode_spans,
    load_decoder,
)
from decoder_gateway.codec.runtime.graphs import LENGTH_STEP
from devtools import GOLDEN_BICODEC

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


def assert_same_audio(expected: list[torch.Tensor], got: list[torch.Tensor]) -> None:
    assert len(expected) == len(got)
    for x, y in zip(expected, got, strict=True):
        assert x.shape == y.shape
        assert (x - y).abs().max() <= 1e-5


@pytest.mark.parametrize("count", [1, 3, 7, 20])
def test_buckets_give_the_eager_audio(decoder, count):
    spans = chunk_spans(count, seed=count)
    graphs = WindowGraphs(decoder, capture=False)
    assert_same_audio(decode_spans(decoder, spans), graphs.decode(spans))
    assert graphs.eager_spans == 0 and graphs.replays >= 1


def test_a_bucket_is_reused_with_new_contents(decoder):
    """The same bucket twice: the second pass sees only its own spans."""
    graphs = WindowGraphs(decoder, capture=False)
    first, second = chunk_spans(3, seed=1), chunk_spans(3, seed=2)
    graphs.decode(first)
    buckets = len(graphs._buckets)
    assert_same_audio(decode_spans(decoder, second), graphs.decode(second))
    assert len(graphs._buckets) == buckets


def test_long_windows_and_full_buckets_go_eager(decoder):
    g = torch.Generator().manual_seed(3)
    whole = torch.randint(0, 8192, (400,), generator=g)
    voice = torch.randint(0, 4096, (32,), generator=g)
    long_span = Span(whole, voice, 0, 400)  # a whole utterance: longer than max_tokens
    graphs = WindowGraphs(decoder, capture=False, max_tokens=8 * LENGTH_STEP, max_graphs=1)
    assert_same_audio(decode_spans(decoder, [long_span]), graphs.decode([long_span]))
    assert graphs.eager_spans == 1
    graphs.decode(chunk_spans(1))  # takes the one bucket allowed
    other = chunk_spans(9, seed=4)  # another bucket shape: eager
    assert_same_audio(decode_spans(decoder, other), graphs.decode(other))
    assert len(graphs._buckets) == 1


def test_streams_through_the_buckets_get_their_audio(decoder, monkeypatch):
    """A decoder with graphs serves streaming sessions by window decodes: the same
    audio as the stream-state path."""

    def stream(semantic: list[int], voice: torch.Tensor) -> torch.Tensor:
        session = StreamingSession(decoder, voice, StreamingConfig())
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
    plain = stream(semantic, voice)
    graphs = WindowGraphs(decoder, capture=False)
    monkeypatch.setattr(decoder, "graphs", graphs)
    graphed = stream(semantic, voice)
    assert graphed.shape == plain.shape == (320 * 150,)
    assert (graphed - plain).abs().max() <= 1e-5
    assert graphs.replays > 5


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graphs_replay_the_eager_audio(dtype):
    model = load_decoder(GOLDEN_BICODEC, device="cuda", dtype=dtype)
    graphs = WindowGraphs(model)
    assert graphs.capture
    for seed, count in ((1, 1), (2, 3), (3, 16), (4, 3)):  # seed 4: bucket of seed 2 again
        spans = chunk_spans(count, seed)
        expected = decode_spans(model, spans)
        got = graphs.decode(spans)
        tolerance = 1e-4 if dtype == torch.float32 else 2e-2
        for x, y in zip(expected, got, strict=True):
            assert x.shape == y.shape and (x - y).abs().max() <= tolerance
    assert graphs.failure is None
    assert all(bucket.graph is not None for bucket in graphs._buckets.values())
