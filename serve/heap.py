"""Keep full garbage collections off the serving path: the start-up heap is frozen (:func:`gc.freeze`).

Why: a replica or engine process holds ~500,000 long-lived objects (torch, transformers, Ray, pydantic, FastAPI).
CPython's full (generation-2) collection walks all of them, 0.2-0.3 s on one core, holding the GIL: every
stream, health check and decoding step of the process waits. Allocation bursts set one off -- a reply of ``n=16`` x
``top_logprobs: 20`` makes ~300,000 objects -- so a long pause landed in the middle of serving (CI saw 0.62 s under
load). Frozen objects are skipped by every collection and still freed by reference counting; a collection then
walks only what was made since. vLLM and SGLang do the same after start-up.

The cost: a garbage cycle among frozen objects is never collected. A replaced model version is freed all the same
(reference counting; ``tests/test_serve_versions.py`` checks it with the heap frozen).
"""

from __future__ import annotations

import gc
import logging
import time

logger = logging.getLogger("serve")


def freeze_heap() -> None:
    """Collect, then freeze every object alive: later collections skip them."""
    t0 = time.perf_counter()
    gc.collect()
    gc.freeze()
    logger.debug("froze %d objects in %.2f s", gc.get_freeze_count(), time.perf_counter() - t0)
