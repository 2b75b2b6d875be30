"""The serving process's phase, shared by the server that drives it (server.http_server) and the app that reads it.

No web server here: the app only asks "are we draining?" (so /ready answers 503) and "has the drain
deadline passed?" (so requests still waiting on a model are failed with a 503 instead of being cut off)."""

from __future__ import annotations

import asyncio


class Lifecycle:
    def __init__(self) -> None:
        self.draining = False
        # Set when the drain deadline has passed: work still queued is failed at once.
        self.expired = asyncio.Event()

    def start_draining(self) -> None:
        self.draining = True

    def expire(self) -> None:
        self.draining = True
        self.expired.set()
