"""The usage ledger: requests, documents, search units and tokens per UTC day, tenant and model, in SQLite.

`record` returns only once the row is committed, and the handler awaits it before it answers, so a
restart, even a crash of the process, loses nothing a client was given. The journal is WAL with
synchronous=NORMAL: a committed transaction survives the process; only an OS crash or power loss can take
the last ones (synchronous=FULL would close that too, at an fsync per commit, measured at up to 350 ms on a
busy disk). Commits are grouped: rows that arrive while one commit runs go into the next. All SQLite work
runs on one thread of its own, off the event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import logging
import queue
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import msgspec

from core.errors import ServiceUnavailable
from core.handoff import settle_from_thread

log = logging.getLogger("rerank_gateway.usage")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    day TEXT NOT NULL,
    tenant TEXT NOT NULL,
    model TEXT NOT NULL,
    requests INTEGER NOT NULL,
    documents INTEGER NOT NULL,
    search_units INTEGER NOT NULL,
    tokens INTEGER NOT NULL,
    PRIMARY KEY (day, tenant, model)
) WITHOUT ROWID
"""

_UPSERT = """
INSERT INTO usage (day, tenant, model, requests, documents, search_units, tokens) VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (day, tenant, model) DO UPDATE SET
    requests = requests + excluded.requests,
    documents = documents + excluded.documents,
    search_units = search_units + excluded.search_units,
    tokens = tokens + excluded.tokens
"""


class UsageRow(msgspec.Struct, kw_only=True):
    date: str  # UTC day, YYYY-MM-DD
    tenant: str
    model: str
    requests: int
    documents: int
    search_units: int
    tokens: int


class UsageTotal(msgspec.Struct, kw_only=True):
    requests: int = 0
    documents: int = 0
    search_units: int = 0
    tokens: int = 0


def total(rows: list[UsageRow]) -> UsageTotal:
    out = UsageTotal()
    for r in rows:
        out.requests += r.requests
        out.documents += r.documents
        out.search_units += r.search_units
        out.tokens += r.tokens
    return out


@dataclass(slots=True)
class _Pending:
    """A request's row, waiting for its commit."""

    key: tuple[str, str, str]
    counts: tuple[int, int, int, int]
    loop: asyncio.AbstractEventLoop
    done: asyncio.Future


@dataclass(slots=True)
class _Call:
    """Other SQLite work for the ledger's thread (connect, a query, close), run in turn with the rows."""

    fn: Callable[..., Any]
    args: tuple
    done: concurrent.futures.Future

    def run(self) -> None:
        try:
            self.done.set_result(self.fn(*self.args))
        except BaseException as exc:  # noqa: BLE001 - the caller awaiting it gets it
            self.done.set_exception(exc)


_last_day: tuple[int, str] = (-1, "")


def utc_day(now_s: float) -> str:
    """YYYY-MM-DD of a time in seconds since the epoch, UTC (formatted once a day, not once a request)."""
    global _last_day
    day = int(now_s // 86400)
    if day != _last_day[0]:
        _last_day = (day, time.strftime("%Y-%m-%d", time.gmtime(day * 86400)))
    return _last_day[1]


class UsageStore:
    """The ledger. `path=None` keeps no ledger (metering off).

    A request's row costs the event loop one future and one queue put: the ledger's thread takes every row
    waiting (a group commit), writes them in one transaction and settles their futures with one call back
    into the loop. (Through an executor, each commit cost a task and executor futures, and each row a
    shield: with the ledger off, the event loop spent ~0.3 ms less of its ~1.9 ms on a 20-document request,
    in-process on a 2-vCPU AMD EPYC.)"""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._jobs: queue.SimpleQueue[_Pending | _Call | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._recording = False  # on the event loop's side: from open until close

    async def open(self) -> UsageStore:
        if self.path is not None:
            self._thread = threading.Thread(target=self._serve, name="usage-ledger", daemon=True)
            self._thread.start()
            try:
                await self._run(self._connect)
            except BaseException:
                self._jobs.put(None)  # the thread ends; nothing else was queued
                raise
            self._recording = True
        return self

    def _connect(self) -> None:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA busy_timeout=5000")
        db.execute(_SCHEMA)
        self._db = db

    async def record(self, tenant: str, model: str, *, documents: int, search_units: int, tokens: int, when: dt.datetime | None = None) -> None:
        """Add one request; returns once it is committed. A client that goes away meanwhile still gets
        billed: its row is queued before this waits, and is written whatever happens to the wait."""
        if not self._recording:
            return
        day = when.strftime("%Y-%m-%d") if when is not None else utc_day(time.time())
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._jobs.put(_Pending((day, tenant, model), (1, documents, search_units, tokens), loop, done))
        await done

    # -- the ledger's thread ------------------------------------------------------------------------------------
    def _serve(self) -> None:
        """Every SQLite call, in the order queued; the rows waiting together go into one commit, before the
        calls queued with them (so close() comes after every row queued before it). None ends the thread."""
        while True:
            jobs = [self._jobs.get()]
            while True:
                try:
                    jobs.append(self._jobs.get_nowait())
                except queue.Empty:
                    break
            rows = [j for j in jobs if isinstance(j, _Pending)]
            if rows:
                self._commit(rows)
            for job in jobs:
                if job is None:
                    return
                if isinstance(job, _Call):
                    job.run()

    def _close_db(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _commit(self, rows: list[_Pending]) -> None:
        error = None
        try:
            self._write(rows)
        except Exception as exc:  # noqa: BLE001 - each waiting request gets the error
            # Unrecorded work is not acknowledged: the requests fail (and their reserved units are refunded).
            log.error("usage ledger %s: write failed: %s", self.path, exc)
            error = f"usage ledger unavailable: {type(exc).__name__}"
        settle_from_thread([(row.loop, row.done, None, ServiceUnavailable(error) if error else None) for row in rows])

    def _write(self, batch: list[_Pending]) -> None:
        sums: dict[tuple[str, str, str], list[int]] = {}
        for p in batch:
            acc = sums.setdefault(p.key, [0, 0, 0, 0])
            for i, v in enumerate(p.counts):
                acc[i] += v
        assert self._db is not None
        with self._db:  # one transaction, one commit
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(_UPSERT, [(*key, *counts) for key, counts in sums.items()])

    async def rows(self, tenant: str | None = None, since: str | None = None, until: str | None = None) -> list[UsageRow]:
        """Totals by day and model, for one tenant or (None) every tenant; dates inclusive, YYYY-MM-DD."""
        if self._db is None:
            return []
        return await self._run(self._select, tenant, since, until)

    def _select(self, tenant: str | None, since: str | None, until: str | None) -> list[UsageRow]:
        where, args = [], []
        for clause, value in (("tenant = ?", tenant), ("day >= ?", since), ("day <= ?", until)):
            if value is not None:
                where.append(clause)
                args.append(value)
        sql = "SELECT day, tenant, model, requests, documents, search_units, tokens FROM usage"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY day, tenant, model"
        assert self._db is not None
        return [
            UsageRow(date=d, tenant=t, model=m, requests=r, documents=n, search_units=u, tokens=k)
            for d, t, m, r, n, u, k in self._db.execute(sql, args).fetchall()
        ]

    async def close(self) -> None:
        """After every row queued so far is written."""
        if self._thread is None:
            return
        self._recording = False  # rows recorded from here on are not kept: the ledger is closing
        await self._run(self._close_db)
        self._jobs.put(None)
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put(_Call(fn, args, done))
        return await asyncio.wrap_future(done)

