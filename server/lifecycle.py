"""The serving process's phase, shared by the server that drives it (server.http_server) and the app that reads it.

No web server here: the app only asks "are we draining?" (so /ready answers 503) and "has the drain
deadline passed?" (so requests still waiting on a model are failed with a 503 instead of being cut off)."""

from __future__ import annotations

from typing import Callable


class Lifecycle:
    """On the event loop's thread."""

    def __init__(self) -> None:
        self.draining = False
        # True once the drain deadline has passed: work still queued is failed at once.
        self.expired = False
        self._on_expire: set[Callable[[], object]] = set()

    def start_draining(self) -> None:
        self.draining = True

    def expire(self) -> None:
        self.draining = True
        self.expired = True
        callbacks, self._on_expire = self._on_expire, set()
        for fn in callbacks:
            fn()

    def on_expire(self, fn: Callable[[], object]) -> Callable[[], None]:
        """Call fn() when the drain deadline passes (now, if it has). Returns what forgets it (a callback,
        not a task waiting on an event: one of these comes with every request)."""
        if self.expired:
            fn()
            return lambda: None
        self._on_expire.add(fn)
        return lambda: self._on_expire.discard(fn)
