"""A fault proxy in front of moto whose faults are switched on and off in time, not by count.

Like :class:`~tests.support.faulty_s3.FaultyS3Proxy` (which it extends) every request is real
HTTP forwarded to a real S3 server, except while a fault is switched on:

* :meth:`OutageS3Proxy.outage` — every request is answered ``503 SlowDown`` (nothing forwarded)
  until :meth:`OutageS3Proxy.restore`: S3 unavailable for as long as the test says;
* :meth:`OutageS3Proxy.deny` — requests of the given methods are answered ``403 AccessDenied``,
  a permanent error (a revoked IAM permission), until :meth:`OutageS3Proxy.restore`;
* :meth:`OutageS3Proxy.slow` — every forwarded request waits ``seconds`` first, so that work is
  still in flight when a fault is injected.

:attr:`OutageS3Proxy.injected` counts the answers it made up.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable

from tests.support.faulty_s3 import FaultyS3Proxy


class OutageS3Proxy(FaultyS3Proxy):
    def __init__(self, upstream: str) -> None:
        self._switch = threading.Lock()
        self._down = False
        self._denied: frozenset[str] = frozenset()
        self._delay = 0.0
        self.injected = 0
        super().__init__(upstream)

    def outage(self) -> None:
        with self._switch:
            self._down = True

    def deny(self, methods: Iterable[str]) -> None:
        with self._switch:
            self._denied = frozenset(m.upper() for m in methods)

    def restore(self) -> None:
        with self._switch:
            self._down, self._denied = False, frozenset()

    def slow(self, seconds: float) -> None:
        with self._switch:
            self._delay = seconds

    def _take_fault(self, method: str) -> int | None:
        with self._switch:
            fault = 503 if self._down else 403 if method in self._denied else None
            delay = self._delay
            if fault is not None:
                self.injected += 1
        if fault is not None:
            return fault
        if delay:
            time.sleep(delay)
        return super()._take_fault(method)


class StallS3Proxy(OutageS3Proxy):
    """:class:`OutageS3Proxy` that can also **stall**: :meth:`stall` makes it accept every
    request and hold it unanswered until :meth:`restore` (at most ``MAX_STALL_SECONDS``); held
    requests are then forwarded (S3 had received them; their client may have given up long ago,
    and its broken connection is not reported). :attr:`stalled` counts the requests held."""

    MAX_STALL_SECONDS = 120.0

    def __init__(self, upstream: str) -> None:
        self._stall = threading.Condition()
        self._stalling = False
        self.stalled = 0  # requests held by a stall, in total
        self.holding = 0  # requests being held right now
        super().__init__(upstream)
        self.server.handle_error = lambda *_: None  # type: ignore[method-assign]

    def stall(self) -> None:
        with self._stall:
            self._stalling = True

    def restore(self) -> None:
        with self._stall:
            self._stalling = False
            self._stall.notify_all()
        super().restore()

    def _take_fault(self, method: str) -> int | None:
        with self._stall:
            if self._stalling:
                self.stalled += 1
                self.holding += 1
                try:
                    self._stall.wait_for(lambda: not self._stalling, self.MAX_STALL_SECONDS)
                finally:
                    self.holding -= 1
        return super()._take_fault(method)

    def close(self) -> None:
        self.restore()
        super().close()
