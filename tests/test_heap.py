"""Freed heap goes back to the OS once the engine is quiet (core.heap), with the real C library: not while
batches keep coming, once after they stop, and after a request served through the app."""

from __future__ import annotations

import ctypes
import time

import pytest

from core.heap import HEAP, IdleTrim, rss_bytes
from tests.conftest import app_client, minilm_registry

# Serial (`make test` runs these after the parallel part, alone): the idle trim waits for quiet periods
# and RSS is read as the process's own figure while another worker allocates beside it.
pytestmark = pytest.mark.serial

libc = ctypes.CDLL(None)
if not hasattr(libc, "malloc_trim"):
    pytest.skip("this C library has no malloc_trim (not glibc)", allow_module_level=True)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

BLOCK = 32 * 1024  # under glibc's mmap threshold: kept in the heap when freed
BLOCKS = 4096  # 128 MiB


def _kept_garbage() -> list[int]:
    """128 MiB written and freed between small blocks still in use: glibc keeps the freed blocks (it gives
    back by itself only what reaches the top of a heap). Returns the small blocks, to free later."""
    blocks, pins = [], []
    for _ in range(BLOCKS):
        blocks.append(libc.malloc(BLOCK))
        pins.append(libc.malloc(64))
    for b in blocks:
        ctypes.memset(b, 1, BLOCK)
    for b in blocks:
        libc.free(b)
    return pins


def test_trims_once_after_work_stops_and_never_while_it_goes_on() -> None:
    trim = IdleTrim(quiet_s=0.3)
    pins = _kept_garbage()
    try:
        kept = rss_bytes()
        # Batches every 50 ms for a second: never quiet for 0.3 s, so no trim.
        for _ in range(20):
            trim.worked()
            time.sleep(0.05)
        assert trim.trims == 0
        assert rss_bytes() > kept - 32 * 2**20
        # Then quiet: one trim gives the freed memory back.
        deadline = time.monotonic() + 5
        while trim.trims == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert trim.trims == 1
        assert trim.released_bytes > 64 * 2**20, trim.released_bytes
        assert rss_bytes() < kept - 64 * 2**20
        # Quiet on: nothing more to do, no more trims.
        time.sleep(1.0)
        assert trim.trims == 1
    finally:
        for p in pins:
            libc.free(p)


def test_a_served_request_is_followed_by_a_trim() -> None:
    with app_client(minilm_registry()) as client:
        before = HEAP.trims
        r = client.post("/v1/rerank", json={"query": "what is a river bank", "documents": ["the bank of the river", "a loan from the bank"]})
        assert r.status_code == 200
        deadline = time.monotonic() + HEAP.quiet_s + 5
        while HEAP.trims == before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert HEAP.trims > before
