"""Admission of a request's database session, waited for in the event loop, never in a thread.

Why: a request's session keeps its connection (and, on SQLite, the database write lock, from its
first statement to its commit) across several thread hops, because FastAPI runs each sync
dependency and the endpoint in a thread of anyio's pool (40 threads) one after the other. A
request thread that blocks waiting for a pooled connection, or for SQLite's write lock, keeps
its thread meanwhile; once every thread waits so, the request that holds the connection or the
lock cannot get a thread to finish, and all of them wait out the timeouts (30 s): the
"database is locked" and "QueuePool limit … timed out" answers seen with 50 clients.

So a request is admitted to the database first, in the event loop, first come first served:

* at most :func:`worker.db.pool_capacity` sessions at once (an admitted session always finds a
  pooled connection free, so no request thread waits on the pool);
* on SQLite, one writing session at a time per process (a request thread then only ever waits
  for the write lock behind another process: a worker, or another API process, whose
  transactions last milliseconds).

A request not admitted within :data:`ADMISSION_TIMEOUT` seconds raises
:class:`~api_stub.errors.DatabaseBusy`: a 503 with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from weakref import WeakKeyDictionary

from sqlalchemy.engine import Engine

from api_stub.errors import DatabaseBusy
from worker.db import api_engine, pool_capacity

# How long a request waits for its turn before it is answered 503.
ADMISSION_TIMEOUT = 10.0


class Gate:
    """A FIFO counting semaphore: :meth:`acquire` waits in the event loop (a waiting request
    holds no thread), :meth:`release` may be called from any thread or event loop."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._free = capacity
        self._lock = threading.Lock()
        self._waiters: deque[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = deque()

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._waiters)

    async def acquire(self, timeout: float) -> bool:
        """True once admitted; False if not within ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._free > 0 and not self._waiters:
                self._free -= 1
                return True
            place = (loop, loop.create_future())
            self._waiters.append(place)
        try:
            await asyncio.wait_for(asyncio.shield(place[1]), max(0.0, timeout))
        except TimeoutError:
            self._withdraw(place)
            return False
        except asyncio.CancelledError:
            self._withdraw(place)
            raise
        return True

    def _withdraw(self, place: tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]) -> None:
        with self._lock:
            queued = place in self._waiters
            if queued:
                self._waiters.remove(place)
        if not queued:
            # The slot was handed over meanwhile: it is this waiter's, so pass it on.
            self.release()

    def release(self) -> None:
        """Hand the slot to the oldest waiter, or free it."""
        with self._lock:
            while self._waiters:
                loop, future = self._waiters.popleft()
                try:
                    loop.call_soon_threadsafe(_grant, future)
                except RuntimeError:  # that waiter's event loop is closed
                    continue
                return
            self._free += 1


def _grant(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


@dataclass
class _Gates:
    sessions: Gate
    writes: Gate | None  # SQLite only


_gates: WeakKeyDictionary[Engine, _Gates] = WeakKeyDictionary()
_gates_lock = threading.Lock()


def _gates_for(engine: Engine) -> _Gates:
    with _gates_lock:
        gates = _gates.get(engine)
        if gates is None:
            sqlite = engine.dialect.name == "sqlite"
            gates = _Gates(Gate(pool_capacity(engine)), Gate(1) if sqlite else None)
            _gates[engine] = gates
        return gates


@asynccontextmanager
async def admitted(*, write: bool) -> AsyncIterator[None]:
    """Hold a database session's admission (see the module) for the duration of the block."""
    gates = _gates_for(api_engine())
    deadline = time.monotonic() + ADMISSION_TIMEOUT
    held: list[Gate] = []
    try:
        for gate in (gates.writes if write else None, gates.sessions):
            if gate is None:
                continue
            if not await gate.acquire(deadline - time.monotonic()):
                what = "write to the database" if gate is gates.writes else "use the database"
                raise DatabaseBusy(f"too many requests waiting to {what}")
            held.append(gate)
        yield
    finally:
        for gate in reversed(held):
            gate.release()
