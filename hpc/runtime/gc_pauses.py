"""Fewer and shorter pauses of Python's cyclic garbage collector in a long-running process.

A full collection walks every object the collector tracks. Right after start-up that is mostly the imported
libraries: about 77,000 objects in a frontend, 200,000 in a worker that imports torch; one walk took 28-39 ms and
123 ms on the 2-core VM. Under load, the objects of requests in flight are alive whenever a young collection runs,
so they are promoted, and enough promotions start a full collection every few seconds: each stalls every stream
the process serves. `settle()`, once start-up is over, freezes what exists (`gc.freeze`: never walked again) and
runs young collections less often, so fewer in-flight objects are promoted."""

from __future__ import annotations

import gc

# Net container allocations between young collections (CPython's default: 700). Most objects of a request die
# with it, before the next collection.
YOUNG_THRESHOLD = 10_000


def settle() -> None:
    """Call once start-up is over (imports done, model loaded): collects, then freezes what is left."""
    gc.collect()
    gc.freeze()
    young, older, oldest = gc.get_threshold()
    gc.set_threshold(max(young, YOUNG_THRESHOLD), older, oldest)
