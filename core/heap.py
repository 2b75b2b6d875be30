"""The process's C heap: memory freed by inference is handed back to the OS once the engine goes quiet.

glibc keeps what a program frees inside its heaps for reuse, and gives back only what sits at the top of
a heap. Once a large block has been freed, glibc raises its mmap threshold to that block's size, so the
next activations of that size come from the heaps too and stay there when freed: what it keeps grows with
the largest batches seen, while nothing is in use. On a 2-core AMD EPYC, a gateway serving the bench's
MiniLM cross-encoder (runtime torch) went from 497 MB at ready to 1,114 MB after 512 requests of 20
documents, with no growth in Python's objects; 2.5 s after the last batch this had trimmed it to 567 MB.
To a container's memory limit and to an operator reading RSS, kept memory is used memory.

A fixed mmap threshold (MALLOC_MMAP_THRESHOLD_=131072) keeps RSS flat between batches instead, and lowers
the peak as well (the same MiniLM gateway, peak RSS 1,183 MB against 1,972 through big requests, 16 clients
x 20 documents and 16,384-token batches), but every large tensor is then mapped and faulted in afresh:
pairs/s at 0.75-0.95x of glibc's default on that model, and 0.54-0.80x on the host-path bench's tiny model
with 16,384-token batches. Speed is what a user sizes a server by, so the threshold is left to glibc and the
heap is trimmed when quiet; an operator who needs the lower peak can set that variable.

Trimming walks the heaps and the memory it gives back is faulted in again when it is next used, so it
runs once the engine has been quiet for QUIET_S after some work: never between batches under load, once
after a burst. Where the C library has no malloc_trim (musl, macOS) this does nothing.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from typing import Callable

log = logging.getLogger("rerank_gateway.heap")

# Seconds without a batch after which the heap is trimmed: long enough that a steady stream of requests
# never pays for it, short enough that memory is back before an operator (or a memory limit) looks.
QUIET_S = 2.0


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def rss_bytes() -> int:
    """This process's resident set now (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class IdleTrim:
    """`worked()` after each batch (cheap: a clock read and an event); a daemon thread, started by the
    first call, trims once the batches have stopped for `quiet_s`."""

    def __init__(self, quiet_s: float = QUIET_S) -> None:
        self.quiet_s = quiet_s
        self._trim = _malloc_trim()
        self._last_work = 0.0
        self._work = threading.Event()
        self._start = threading.Lock()
        self._thread: threading.Thread | None = None
        self.trims = 0
        self.released_bytes = 0  # RSS given back over all trims (as /proc saw it before and after)

    def worked(self) -> None:
        if self._trim is None:
            return
        self._last_work = time.monotonic()
        self._work.set()
        if self._thread is None:
            with self._start:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._loop, name="heap-trim", daemon=True)
                    self._thread.start()

    def _loop(self) -> None:
        while True:
            self._work.wait()
            quiet_for = time.monotonic() - self._last_work
            if quiet_for < self.quiet_s:
                time.sleep(self.quiet_s - quiet_for)
                continue
            # Cleared before trimming: a batch from here on sets it again and earns another trim.
            self._work.clear()
            self.trim_now()

    def trim_now(self) -> int:
        """Trim the heap now; the bytes of RSS it gave back."""
        if self._trim is None:
            return 0
        before = rss_bytes()
        self._trim(0)
        released = max(0, before - rss_bytes())
        self.trims += 1
        self.released_bytes += released
        log.debug("heap trimmed after %.1f s without a batch: %.1f MB given back", self.quiet_s, released / 2**20)
        return released


# The heap is the process's, whatever model freed into it: one trimmer for every model's batches.
HEAP = IdleTrim()
