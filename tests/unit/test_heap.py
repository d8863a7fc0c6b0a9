"""dnsdisco.heap: when the catalog is frozen out of the cyclic GC's full passes."""

from __future__ import annotations

import asyncio
import gc

from dnsdisco import heap


def test_freezes_again_after_a_quarter_more_and_at_least_min_growth():
    assert not heap.should_freeze(0, heap.MIN_GROWTH - 1)
    assert heap.should_freeze(0, heap.MIN_GROWTH)
    assert not heap.should_freeze(100_000, 124_999)
    assert heap.should_freeze(100_000, 125_000)


async def test_keep_frozen_freezes_what_the_catalog_grew_by():
    size = [0]
    task = asyncio.create_task(heap.keep_frozen(lambda: size[0], every=0.01))
    try:
        await asyncio.sleep(0.05)
        before = gc.get_freeze_count()
        grown = [[i] for i in range(5000)]  # long-lived: the catalog grew by these
        size[0] = len(grown)
        await asyncio.sleep(0.05)
        assert gc.get_freeze_count() >= before + len(grown)
        # Shrunk, then grown back past the threshold from the smaller size: frozen again.
        size[0] = 10
        await asyncio.sleep(0.05)
        more = [[i] for i in range(3000)]
        size[0] = 10 + len(more)
        frozen = gc.get_freeze_count()
        await asyncio.sleep(0.05)
        assert gc.get_freeze_count() >= frozen + len(more)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        gc.unfreeze()
