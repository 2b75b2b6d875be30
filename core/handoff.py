"""Answers from worker threads (inference, the usage ledger) to the asyncio futures their requests await.

Each call_soon_threadsafe writes to the loop's self-pipe and wakes it, so the answers of one batch or one
commit go in one call per loop. A future the loop has cancelled meanwhile (timeout, disconnect) is left as
it is, and a closed loop has nobody waiting."""

from __future__ import annotations

import asyncio
from typing import Any

# (the loop that owns the future, the future, its result, or the error to raise instead)
Answer = tuple[asyncio.AbstractEventLoop, asyncio.Future, Any, "BaseException | None"]


def settle_from_thread(answers: list[Answer]) -> None:
    """Set each future's result or error on its own loop: one call into each loop. Thread-safe."""
    by_loop: dict[asyncio.AbstractEventLoop, list[Answer]] = {}
    for answer in answers:
        by_loop.setdefault(answer[0], []).append(answer)
    for loop, settled in by_loop.items():
        try:
            loop.call_soon_threadsafe(_settle, settled)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass


def _settle(answers: list[Answer]) -> None:
    for _, future, result, error in answers:
        if future.done():  # cancelled by the loop (timeout, disconnect) before the answer arrived
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
