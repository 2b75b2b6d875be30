"""Freed heap goes back to the OS once the engine is quiet (core.heap), with the real C library: not while
batches keep coming, once after they stop, and after a request served through the app."""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
import time

import pytest

from core.heap import HEAP
from tests.conftest import REPO, app_client, minilm_registry

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
    """In a process of its own: a fresh C heap, as a gateway's is. In the suite's serial process, after other
    tests had run there, the trim gave back 10-13 MB of the 128 MiB freed twice in a row (2026-12-07, Intel
    Xeon), and the full amount whenever the test ran first: what glibc can give back depends on the heap's
    history, which is not what is tested here."""
    script = f"""
import json, sys, time
sys.path.insert(0, {str(REPO)!r})
from tests.test_heap import _kept_garbage, libc
from core.heap import IdleTrim, rss_bytes
trim = IdleTrim(quiet_s=0.3)
pins = _kept_garbage()
out = {{"kept": rss_bytes()}}
# Batches every 50 ms for a second: never quiet for 0.3 s, so no trim.
for _ in range(20):
    trim.worked()
    time.sleep(0.05)
out |= {{"trims_while_working": trim.trims, "rss_while_working": rss_bytes()}}
# Then quiet: one trim gives the freed memory back.
deadline = time.monotonic() + 5
while trim.trims == 0 and time.monotonic() < deadline:
    time.sleep(0.05)
out |= {{"trims": trim.trims, "released": trim.released_bytes, "rss_after": rss_bytes()}}
# Quiet on: nothing more to do, no more trims.
time.sleep(1.0)
out["trims_later"] = trim.trims
print(json.dumps(out))
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    kept = out["kept"]
    assert out["trims_while_working"] == 0
    assert out["rss_while_working"] > kept - 32 * 2**20
    assert out["trims"] == 1
    assert out["released"] > 64 * 2**20, out
    assert out["rss_after"] < kept - 64 * 2**20
    assert out["trims_later"] == 1


def test_a_served_request_is_followed_by_a_trim() -> None:
    with app_client(minilm_registry()) as client:
        before = HEAP.trims
        r = client.post("/v1/rerank", json={"query": "what is a river bank", "documents": ["the bank of the river", "a loan from the bank"]})
        assert r.status_code == 200
        deadline = time.monotonic() + HEAP.quiet_s + 5
        while HEAP.trims == before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert HEAP.trims > before
