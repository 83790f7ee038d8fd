"""Exactly one celery beat: a lease on the broker held by the running beat.

Two beats would send every periodic task twice. ``celery -A worker beat`` takes the lease when it
loads its configuration (:mod:`worker.celery`), before its banner; a second beat exits with one
line naming the holder.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from typing import Any

import redis

from worker import constants as c
from worker.settings import get_settings

log = logging.getLogger(__name__)

BEAT_LOCK_KEY = "widgets:beat:lock"
BEAT_LOCK_TTL = 60
BEAT_LOCK_REFRESH = 15
BEAT_LOCK_START_TIMEOUT = 10.0
# Extend the lock if it is still ours; take it again if it expired (e.g. during a broker
# outage) and nobody took it; 0 if another beat holds it.
_REFRESH_LOCK = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  return 2
end
return 0
"""
_RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class BeatLock:
    """A lease on the broker (``SET key token NX EX ttl``) held by the one running beat and
    refreshed by a daemon thread; a beat killed outright frees it within ``ttl`` seconds."""

    def __init__(self, url: str, key: str = BEAT_LOCK_KEY, ttl: int = BEAT_LOCK_TTL) -> None:
        self.key, self.ttl = key, ttl
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"
        self.client = redis.Redis.from_url(
            url,
            socket_timeout=c.BROKER_SOCKET_TIMEOUT,
            socket_connect_timeout=c.BROKER_CONNECT_TIMEOUT,
            socket_keepalive=True,
        )
        self._stop = threading.Event()

    def acquire(self) -> bool:
        return bool(self.client.set(self.key, self.token, nx=True, ex=self.ttl))

    def holder(self) -> str | None:
        value = self.client.get(self.key)
        return value.decode() if isinstance(value, bytes) else value

    def refresh(self) -> bool:
        """False if another beat holds the lock now."""
        return int(self.client.eval(_REFRESH_LOCK, 1, self.key, self.token, self.ttl)) != 0

    def release(self) -> None:
        self._stop.set()
        try:
            self.client.eval(_RELEASE_LOCK, 1, self.key, self.token)
        except (redis.RedisError, OSError):  # it expires by itself
            log.debug("could not release the beat lock", exc_info=True)

    def keep(self, on_lost: Any, interval: float = BEAT_LOCK_REFRESH) -> threading.Thread:
        def run() -> None:
            while not self._stop.wait(interval):
                try:
                    if not self.refresh():
                        on_lost()
                        return
                except (redis.RedisError, OSError) as exc:  # a broker outage: try again
                    log.warning("could not refresh the beat lock: %r", exc)

        thread = threading.Thread(target=run, name="beat-lock", daemon=True)
        thread.start()
        return thread


def _stop_this_beat() -> None:
    log.error("another celery beat took the beat lock; stopping this one")
    os.kill(os.getpid(), signal.SIGTERM)


def _take_beat_lock() -> BeatLock:
    lock = BeatLock(str(get_settings().celery_broker_url))
    deadline = time.monotonic() + BEAT_LOCK_START_TIMEOUT
    while True:
        try:
            if lock.acquire():
                return lock
            holder = lock.holder()
        except (redis.RedisError, OSError) as exc:  # the broker may still be starting
            if time.monotonic() < deadline:
                time.sleep(1)
                continue
            print(f"error: celery beat cannot take its lock on the broker: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        print(
            f"error: another celery beat is running ({holder or 'unknown'} holds "
            f"{BEAT_LOCK_KEY} on the broker); only one may run, exiting",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(1)


_beat_lock: BeatLock | None = None
_beat_lock_keeper: int | None = None  # pid whose thread refreshes it (beat --detach forks)


def hold_beat_lock() -> None:
    """Take the lease (or exit) and keep it refreshed from this process."""
    global _beat_lock, _beat_lock_keeper
    if _beat_lock is None:
        _beat_lock = _take_beat_lock()
        atexit.register(_beat_lock.release)
    if _beat_lock_keeper != os.getpid():
        _beat_lock.keep(on_lost=_stop_this_beat)
        _beat_lock_keeper = os.getpid()
