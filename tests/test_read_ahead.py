"""A segment reads its LLM stream ahead while a chunk decodes (serving/segment.py):
the next chunk is planned from every token that came meanwhile, not from the first few."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from decoder_gateway.serving.segment import read_ahead


class Source:
    """An async stream of items that says whether it was closed."""

    def __init__(self, items: list[int], error: Exception | None = None, pause_s: float = 0.0):
        self.items, self.error, self.pause_s = items, error, pause_s
        self.closed = False

    async def stream(self) -> AsyncIterator[int]:
        try:
            for item in self.items:
                await asyncio.sleep(self.pause_s)
                yield item
            if self.error is not None:
                raise self.error
            await asyncio.sleep(self.pause_s)
        finally:
            self.closed = True


async def test_what_arrives_during_a_slow_step_comes_in_one_batch():
    source, ends = Source(list(range(6)), pause_s=0.01), []
    batches = []
    async with contextlib.aclosing(read_ahead(source.stream(), lambda: ends.append(1))) as it:
        async for batch in it:
            batches.append([item for _, item in batch])
            await asyncio.sleep(0.2)  # a decode: every later item arrives meanwhile
    assert batches == [[0], [1, 2, 3, 4, 5]]
    assert ends == [1] and source.closed


async def test_arrival_times_are_when_each_item_came_not_when_it_was_taken():
    source = Source([1, 2, 3], pause_s=0.05)
    loop = asyncio.get_running_loop()
    async with contextlib.aclosing(read_ahead(source.stream(), lambda: None)) as it:
        first = await anext(it)
        await asyncio.sleep(0.3)
        taken_at = loop.time()
        rest = await anext(it)
    times = [at for at, _ in first + rest]
    assert times == sorted(times) and times[-1] - times[0] >= 0.09
    assert taken_at - times[-1] >= 0.15  # stamped on arrival, long before it was taken


async def test_an_error_comes_after_the_items_before_it():
    source = Source([1, 2], error=RuntimeError("upstream broke"))
    seen = []
    with pytest.raises(RuntimeError, match="upstream broke"):
        async with contextlib.aclosing(read_ahead(source.stream(), lambda: None)) as it:
            async for batch in it:
                seen += [item for _, item in batch]
    assert seen == [1, 2] and source.closed


async def test_leaving_early_stops_the_reader_and_closes_the_source():
    source, ends = Source(list(range(1000)), pause_s=0.01), []
    async with contextlib.aclosing(read_ahead(source.stream(), lambda: ends.append(1))) as it:
        async for _ in it:
            break
    assert source.closed and ends == [1]
