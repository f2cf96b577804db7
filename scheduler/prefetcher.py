"""Prefetcher: promotes queued requests' blocks toward the GPU in the background.

A thread owned by the OffloadManager. It wakes when a request is queued or a promotion lands, asks
the decision half for the next promotions (queue order, look-ahead window, byte budget) and submits
them to the byte half. `close()` stops and joins it. Decisions (which blocks, where to) live in the
Decider; this module only drives them.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

log = logging.getLogger(__name__)


class Prefetcher:
    """Runs `prefetch_round()` (decide the next promotions and submit them, as one step) whenever `wake()`
    is called, until closed."""

    def __init__(self, prefetch_round: Callable[[], None], idle_timeout_s: float = 0.5) -> None:
        self._round = prefetch_round
        self._idle_timeout_s = idle_timeout_s
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvtier-prefetch", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Asks for another look at the queue."""
        self._wake.set()

    def _run(self) -> None:
        while not self._closed.is_set():
            self._wake.wait(self._idle_timeout_s)
            self._wake.clear()
            if self._closed.is_set():
                return
            try:
                self._round()
            except Exception:  # a failed round must not kill the thread; the next wake retries
                log.exception("prefetch round failed")

    def close(self, timeout: float = 10.0) -> None:
        """Stops the thread and joins it (idempotent)."""
        self._closed.set()
        self._wake.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
