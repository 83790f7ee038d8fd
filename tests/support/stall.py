"""A fault proxy that can also hold requests of one HTTP method until the test releases them.

Used to freeze a worker in the middle of an S3 call (so it can be killed there, or so another
job can be started while it holds its locks). Like :class:`FaultyS3Proxy` it forwards real HTTP
to moto; holding a request only delays it. A held request released after its client was killed
is still forwarded (S3 had received it), and the broken connection is not reported.
"""

from __future__ import annotations

import threading

from tests.support.faulty_s3 import FaultyS3Proxy

MAX_HOLD_SECONDS = 120.0


class StallingS3Proxy(FaultyS3Proxy):
    def __init__(self, upstream: str) -> None:
        self._cond = threading.Condition()
        self._stall_method: str | None = None
        self._skip = 0
        self.held = 0  # requests being held right now
        super().__init__(upstream)
        self.server.handle_error = lambda *_: None  # type: ignore[method-assign]

    def stall(self, method: str, skip: int = 0) -> None:
        """Hold every ``method`` request after the first ``skip`` ones, until :meth:`release`."""
        with self._cond:
            self._stall_method, self._skip = method.upper(), skip

    def release(self) -> None:
        with self._cond:
            self._stall_method = None
            self._cond.notify_all()

    def wait_held(self, timeout: float, count: int = 1) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.held >= count, timeout)

    def _take_fault(self, method: str) -> int | None:
        with self._cond:
            if self._stall_method == method:
                if self._skip > 0:
                    self._skip -= 1
                else:
                    self.held += 1
                    self._cond.notify_all()
                    self._cond.wait_for(lambda: self._stall_method != method, MAX_HOLD_SECONDS)
                    self.held -= 1
        return super()._take_fault(method)

    def close(self) -> None:
        self.release()
        super().close()
