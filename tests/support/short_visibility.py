"""``celery -A tests.support.short_visibility worker``: the project's Celery app with a visibility
timeout of ``TEST_VISIBILITY_TIMEOUT`` seconds (default 3) and kombu's sweep for overdue
unacknowledged messages every second, so that a test sees in seconds what production would show
after minutes: whether a message a live worker holds (a retry's countdown) is redelivered."""

from __future__ import annotations

import os

from worker.celery import app

VISIBILITY_TIMEOUT = float(os.environ.get("TEST_VISIBILITY_TIMEOUT", "3"))

app.conf.broker_transport_options = {
    **app.conf.broker_transport_options,
    "visibility_timeout": VISIBILITY_TIMEOUT,
    "unacked_restore_interval": 1,
    "unacked_restore_throttle": 1,
}

__all__ = ["app"]
