"""Closed-loop client threads posting one rerank body until stopped; every answer is kept, so a test can
assert that nothing failed while it killed or restarted servers behind the URL."""

from __future__ import annotations

import threading

import httpx


class Load:
    def __init__(self, url: str, body: dict, *, clients: int = 4, headers: dict | None = None, path: str = "/v2/rerank") -> None:
        self.url, self.body, self.headers, self.path = url, body, headers or {}, path
        # (status code, response headers), or (exception class name, {}) when no answer came back.
        self.results: list[tuple[int | str, httpx.Headers | dict]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30, headers=self.headers) as client:
            while not self._stop.is_set() and len(self.results) < 5000:
                try:
                    r = client.post(self.path, json=self.body)
                    self.results.append((r.status_code, r.headers))
                except httpx.HTTPError as exc:
                    self.results.append((type(exc).__name__, {}))

    def failed(self) -> list:
        return [(status, dict(headers)) for status, headers in self.results if status != 200]

    def __enter__(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)
