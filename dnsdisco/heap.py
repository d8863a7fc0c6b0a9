"""The catalog's place in the heap: kept out of the cyclic garbage collector's full passes.

A catalog in memory (the store's rows, the answer table, a mirror's copy) is some twenty
long-lived objects per instance, and every full (generation 2) collection walks all of them:
100-250 ms at 20,000 instances, during which neither DNS nor HTTP answers anything. Nothing in
the catalog is cyclic garbage-to-be - values are frozen dataclasses, replaced and freed by
reference counting - so ``gc.freeze()`` moves what is alive into the permanent generation,
which collections skip. This module owns when that happens: once the first load is in, and
again each time the catalog has grown by a quarter since (registrations through the API, a
mirrored cluster that grows), counting from where it stood after a shrink: a rolling deploy
replaces frozen instances with unfrozen ones, which full passes would walk again. A freeze
also keeps whatever cyclic garbage-to-be is alive at that moment (a pending task, an exception
and its frames) out of reach for good: a few objects per freeze, and freezes follow the
catalog's growth, not time.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable

__all__ = ["keep_frozen"]

log = logging.getLogger("dnsdisco.heap")

# Freeze again once the catalog has this much more in it than at the last freeze...
GROWTH = 0.25
# ... and at least this many more instances (small catalogs cost full passes nothing).
MIN_GROWTH = 2000
# How often the size is looked at (a freeze itself costs nothing: it relinks two lists).
CHECK_EVERY = 5.0


def should_freeze(frozen_at: int, size: int) -> bool:
    """Whether a catalog of *size* has grown enough since a freeze at *frozen_at*."""
    return size - frozen_at >= max(MIN_GROWTH, frozen_at * GROWTH)


async def keep_frozen(size: Callable[[], int], *, every: float = CHECK_EVERY) -> None:
    """Freeze now, then whenever ``size()`` (instances in the catalog) has grown enough since
    the last freeze; runs until cancelled."""
    gc.freeze()
    frozen_at = size()
    while True:
        await asyncio.sleep(every)
        now = size()
        if should_freeze(frozen_at, now):
            gc.freeze()
            log.debug("catalog grew from %d to %d instances: frozen out of full GC passes", frozen_at, now)
            frozen_at = now
        elif now < frozen_at:
            # Shrunk: growth is counted from here, or re-filling it would never freeze again.
            frozen_at = now
